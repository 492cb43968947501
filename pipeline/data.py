"""Data stage: sources -> mixed documents -> held-out validation -> token blocks -> batches.

    load_splits(section, seed,    THE held-out split of a recipe: a data section, whole, -> load_corpus, its training
                held_out_by)      documents also without the texts the recipe's other sections hold out; every stage
                                  calls it (held_out_sections, tokenizer_section: which sections a recipe splits)
    load_corpus(sources)          validate every source, load them, hold out validation DOCUMENTS, mix by weight
    tokenize_and_pack(ds, tok)    [bos] + tokens + [eos] per document, concatenated and cut into fixed blocks
    block_loaders(section, tok)   load_splits + tokenize_and_pack -> training and validation DataLoaders of blocks
                                  (pretraining, and fine-tuning with task causal_lm)
    collate(examples)             LongTensor batches; pads only unpacked (variable-length) examples
    cached_map(ds, fn, ...)       a batched `datasets.map` cached under a fingerprint of what decides its output
    tokenizer_fingerprint(tok)    a hash of everything that decides a tokenizer's ids, part of that fingerprint
    token_byte_lengths(tok)       UTF-8 bytes behind every token id, for bits per byte

Caching. `datasets.map` names its cache file after a fingerprint that does not hash the body of an imported
function, so an edited preprocessing function would silently reuse stale blocks. `cached_map` (used by
`tokenize_and_pack` and by fine-tuning's instruction and classification examples) builds the fingerprint itself
from the input's fingerprint, `tokenizer_fingerprint`, the caller's settings and `PREPROCESSING_VERSION`, and
always writes a cache file (in-memory datasets such as the built-in corpora have none of their own, and
`datasets` would otherwise redo the work on every run). A second run loads the blocks from disk without calling
the tokenizer; any change to what decides the tokens writes new blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from pipeline.sources import (
    SourceSpec,
    as_source_spec,
    evenly_spaced,
    load_source,
    source_identity,
    validate_source,
)

if TYPE_CHECKING:  # type hints only: the data stage reads a section's fields, it does not need the recipe
    from accelerate import Accelerator

    from pipeline.recipe import DataSection, Recipe, SourceSection

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "EvaluationSet",
    "PREPROCESSING_VERSION",
    "block_loaders",
    "cached_map",
    "evaluation_sets",
    "collate",
    "held_out_sections",
    "load_corpus",
    "load_splits",
    "sections_read",
    "split_settings",
    "token_byte_lengths",
    "tokenize_and_pack",
    "tokenizer_fingerprint",
    "tokenizer_section",
]

PREPROCESSING_VERSION = "1"
"""Part of every `cached_map` fingerprint (the packed blocks, fine-tuning's examples): bump it whenever a function
mapped through it (`_Packer`, fine-tuning's encoders) changes what it writes."""

IGNORE_INDEX = -100
"""Label that `torch.nn.functional.cross_entropy` (and every transformers model) skips."""

_MAP_BATCH_SIZE = 1_000  # documents per `map` call; the blocks do not depend on it (see _Packer)
# `cached_map` hashes these itself: a caller's settings must not shadow them.
_RESERVED_SETTINGS = ("dataset", "tokenizer", "preprocessing_version")


# ------------------------------------------------------------------------------------------ corpus


def load_splits(
    section: DataSection, seed: int, held_out_by: Sequence[DataSection] = ()
) -> tuple[Dataset | IterableDataset, Dataset]:
    """(train, validation) documents of a data section (``data``, ``finetune.data`` or `tokenizer_section`): the
    one function that decides which documents of a recipe are held out. Every stage calls it.

    The section whole (``sources``, ``validation_fraction``, ``max_documents``, ``streaming``,
    ``validation_documents``) and the recipe's ``seed`` go to `load_corpus`, so every stage and every rerun get
    the same split. `held_out_by` (a recipe's `held_out_sections`) are the sections whose held-out documents the
    recipe evaluates: the training documents also leave out every text that one of them holds out, when it shares
    a source with `section` (`sections_read`). So the tokenizer, pretraining and fine-tuning never see a document
    that evaluation scores as held out, even when their sections split the same source differently. The
    validation split is the section's own and does not depend on `held_out_by`.
    """
    elsewhere: set[str] = set()
    for other in sections_read(section, held_out_by)[1:]:
        elsewhere.update(_split(other, seed)[1]["text"])
    return _split(section, seed, elsewhere)


def held_out_sections(recipe: Recipe) -> tuple[DataSection, ...]:
    """The data sections whose held-out documents a recipe evaluates: ``data`` (the general set, pretraining's
    validation) and ``finetune.data`` (the domain set, the generation and classification rows). Pass them as
    `held_out_by` to `load_splits` / `block_loaders`."""
    return tuple(section for section in (recipe.data, recipe.finetune.data) if section is not None)


@dataclasses.dataclass(frozen=True)
class EvaluationSet:
    """A held-out set the evaluate stage scores: ``general`` or ``domain``."""

    name: str
    sources: list[SourceSection]
    held_out: bool  # the validation split of `section` (True), or evaluation-only sources (``evaluate.<name>``)
    section: DataSection  # the training data it stands beside: its block size, and its split when held out
    key: str  # that section's recipe key

    @property
    def description(self) -> str:
        names = ", ".join(source.name for source in self.sources)
        return f"validation split of {self.key} ({names})" if self.held_out else f"evaluate sources ({names})"

    def load(self, recipe: Recipe, cap: int | None) -> Dataset:
        """The documents: at most ``cap``, evenly spaced (over the sources' concatenation, so each keeps its
        share, for evaluation-only sources)."""
        if self.held_out:
            return evenly_spaced(load_splits(self.section, recipe.seed, held_out_sections(recipe))[1], cap)
        parts = [load_source(source).select_columns(["text"]) for source in self.sources]
        return evenly_spaced(datasets.concatenate_datasets(parts), cap)


def evaluation_sets(recipe: Recipe) -> list[EvaluationSet]:
    """The language-modelling sets of a recipe's evaluate stage, the one place that chooses them (the stage and
    `pipeline eval --recipe` both ask): ``general`` (``evaluate.general``, else the validation split of ``data``) and,
    when fine-tuning runs or ``evaluate.domain`` is set, ``domain`` (``evaluate.domain``, else the validation split
    of ``finetune.data``)."""
    section = recipe.evaluate
    wanted = [("general", section.general, recipe.data, "data")]
    if section.domain is not None or recipe.runs("finetune"):
        wanted.append(("domain", section.domain, recipe.finetune.data, "finetune.data"))
    return [EvaluationSet(name, dedicated or data.sources, dedicated is None, data, key)
            for name, dedicated, data, key in wanted]


def tokenizer_section(recipe: Recipe) -> DataSection | None:
    """The data section the tokenizer trains on (None with ``tokenizer.path``): ``data`` with the tokenizer's
    ``sources`` and, when set, its ``max_documents``, so that with the default sources it is split exactly as
    pretraining splits ``data``."""
    section = recipe.tokenizer
    if section.path is not None:
        return None
    cap = recipe.data.max_documents if section.max_documents is None else section.max_documents
    return recipe.data.model_copy(update={"sources": section.sources or recipe.data.sources, "max_documents": cap})


def split_settings(section: DataSection) -> dict[str, Any]:
    """Everything of a section that decides its split, besides the seed (JSON-able, for stage markers)."""
    return {
        "sources": [dataclasses.asdict(as_source_spec(source)) for source in section.sources],
        **{field: getattr(section, field) for field in _SPLIT_FIELDS},
    }


def sections_read(section: DataSection, held_out_by: Sequence[DataSection] = ()) -> list[DataSection]:
    """`section`, then the sections of `held_out_by` whose held-out texts its training split leaves out: those
    split differently that share a source with it (`pipeline.sources.source_identity`: a corpus, a file, a Hub
    dataset). Nothing is loaded."""
    own = split_settings(section)
    documents = _identities(section)
    read, seen = [section], [own]
    for other in held_out_by:
        settings = split_settings(other)
        if settings not in seen and documents & _identities(other):
            read.append(other)
            seen.append(settings)
    return read


_SPLIT_FIELDS = ("validation_fraction", "validation_documents", "max_documents", "streaming")


def _identities(section: DataSection) -> frozenset[str]:
    return frozenset().union(*(source_identity(source) for source in section.sources))


def _split(
    section: DataSection, seed: int, elsewhere: Collection[str] = ()
) -> tuple[Dataset | IterableDataset, Dataset]:
    return load_corpus(
        section.sources,
        seed=seed,
        validation_fraction=section.validation_fraction,
        max_documents=section.max_documents,
        streaming=section.streaming,
        validation_documents=section.validation_documents,
        held_out_elsewhere=elsewhere,
    )


def load_corpus(
    sources: Sequence[SourceSpec | str | Mapping[str, Any]],
    *,
    seed: int,
    validation_fraction: float,
    max_documents: int | None = None,
    streaming: bool = False,
    validation_documents: int | None = None,
    held_out_elsewhere: Collection[str] = (),
) -> tuple[Dataset | IterableDataset, Dataset]:
    """Load and mix `sources` into (train, validation), split by whole documents.

    Args:
        sources: `SourceSpec`s, names or mappings (see `pipeline.sources`). Each is validated before any is
            loaded, so a typo in the last one fails in a second, not after loading the first.
        seed: decides the held-out documents (map-style) and the mixing order.
        validation_fraction: share of each source's documents held out, in (0, 1); at least one document
            is held out and at least one is left for training.
        max_documents: cap on the documents read from each source (a source's own, smaller cap wins).
        streaming: read every source lazily and return an `IterableDataset` for training.
        validation_documents: hold out exactly this many documents per source instead of a fraction.
            Streaming needs it unless the size of each source is known (`max_documents` or the Hub split size).
        held_out_elsewhere: texts that another data section holds out (see `load_splits`): never trained on.

    Returns:
        `train`: the documents not held out (a `Dataset`, or an `IterableDataset` when streaming), mixed
        with probabilities proportional to the weights; a single source is returned in its own order
        (the training loader shuffles). The mixture keeps drawing until every document of every source has
        been seen at least once (`interleave_datasets`' "all_exhausted"), so the weights hold over the whole
        epoch and a small, heavily weighted source is repeated (upsampled).
        `validation`: a small map-style `Dataset` of the held-out documents of all sources, concatenated
        (unweighted).
        Both have a `text` column; with one source its other columns are kept, with several only the
        columns that all sources share with the same type.

    Held-out documents: map-style sources hold out a seeded random sample of documents; streamed sources
    hold out their first documents (the only ones that can be read without reading everything). Membership is
    by document: the validation split holds exactly the documents picked (an exact duplicate picked twice is
    scored twice, as it occurs in the data). No text of it occurs in `train`: a training document whose text
    equals a held-out text, of any source of the mixture or of `held_out_elsewhere`, is left out, and the
    number left out is logged (a warning, map-style sources; a stream cannot be counted without reading it).
    """
    if isinstance(sources, (str, SourceSpec, Mapping)):
        sources = [sources]  # one source given bare
    specs = [as_source_spec(source) for source in sources]
    _check_corpus_arguments(specs, validation_fraction, validation_documents, max_documents)
    for spec in specs:
        validate_source(spec)  # all of them, before anything is loaded
    specs = [_with_overrides(spec, max_documents, streaming) for spec in specs]

    held_out_parts = []
    for index, spec in enumerate(specs):
        documents = load_source(spec)
        if isinstance(documents, IterableDataset):
            n_held_out = _streamed_validation_size(documents, spec, validation_fraction, validation_documents)
            held_out_parts.append(_hold_out_first(documents, n_held_out, spec.name))
        else:
            rng = np.random.default_rng((seed, index))  # one stream per source: equal sizes, different picks
            part = _hold_out_sample(documents, rng, validation_fraction, validation_documents, spec.name)
            held_out_parts.append(part)
    # Compare by content: a text held out anywhere is trained on nowhere (duplicates within and across sources).
    held_out = set(held_out_elsewhere)
    for part in held_out_parts:
        held_out.update(part.validation["text"])
    train_parts = [part.train(held_out) for part in held_out_parts]
    validation_parts = [part.validation for part in held_out_parts]

    if len(specs) == 1:
        return train_parts[0], validation_parts[0]
    columns = _shared_columns(train_parts)
    weights = np.array([spec.weight for spec in specs], dtype=float)
    train = datasets.interleave_datasets(
        [part.select_columns(columns) for part in train_parts],
        probabilities=(weights / weights.sum()).tolist(),
        seed=seed,
        stopping_strategy="all_exhausted",
    )
    validation = datasets.concatenate_datasets([part.select_columns(columns) for part in validation_parts])
    return train, validation


def _with_overrides(spec: SourceSpec, max_documents: int | None, streaming: bool) -> SourceSpec:
    # One mixture is all map-style or all streamed: interleave_datasets cannot mix the two.
    cap = spec.max_documents
    if max_documents is not None:
        cap = max_documents if cap is None else min(cap, max_documents)
    return dataclasses.replace(spec, max_documents=cap, streaming=streaming)


def _check_corpus_arguments(
    specs: list[SourceSpec], fraction: float, count: int | None, max_documents: int | None
) -> None:
    if not specs:
        raise ValueError("no data sources given: list at least one (a corpus name, a path or a Hub dataset id)")
    if count is None and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction!r}; 0.01 holds out 1% of documents")
    _check_positive_int("validation_documents", count, optional=True)
    _check_positive_int("max_documents", max_documents, optional=True)


def _check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


@dataclasses.dataclass
class _HeldOut:
    """One source's held-out documents, and how to get its training documents once every held-out text of the
    mixture (and of other sections) is known."""

    validation: Dataset
    train: Callable[[set[str]], Dataset | IterableDataset]


def _hold_out_sample(
    documents: Dataset, rng: np.random.Generator, fraction: float, count: int | None, name: str
) -> _HeldOut:
    """A seeded random sample of documents for validation; training keeps every other document whose text is not
    held out."""
    texts = documents.with_format("arrow")[:]["text"]  # Arrow column: no Python strings for the whole corpus
    non_empty = pc.fill_null(pc.greater(pc.binary_length(texts), 0), False)
    usable = np.flatnonzero(non_empty.to_numpy(zero_copy_only=False))
    n = len(usable)
    if n < 2:
        raise ValueError(
            f"source {name!r} has {n} non-empty document(s); at least 2 are needed (1 for validation, 1 for "
            "training). Add data or raise max_documents."
        )
    n_held_out = min(max(1, round(fraction * n)), n - 1) if count is None else count
    if n_held_out >= n:
        raise ValueError(
            f"source {name!r} has {n} documents: validation_documents={count} leaves none for training; "
            f"use at most {n - 1}"
        )
    picked = np.sort(rng.choice(usable, size=n_held_out, replace=False))

    def train(held_out: set[str]) -> Dataset:
        own = pc.is_in(texts, value_set=pc.unique(texts.take(pa.array(picked)))).to_numpy(zero_copy_only=False)
        anywhere = pc.is_in(texts, value_set=pa.array(sorted(held_out), type=texts.type))
        anywhere = anywhere.to_numpy(zero_copy_only=False)
        train_rows = usable[~anywhere[usable]]
        if len(train_rows) == 0:
            raise ValueError(
                f"source {name!r}: its {n} documents are copies of the held-out text(s) (held out by this source, "
                "another source of the mixture or another data section that reads it); deduplicate it"
            )
        copies = int(own[usable].sum()) - n_held_out
        elsewhere = int((anywhere[usable] & ~own[usable]).sum())
        if copies or elsewhere:
            logger.warning(
                "source %r: %d training document(s) left out: %d exact copies of its own held-out texts, %d copies "
                "of texts held out by another source or data section (held-out documents are never trained on; "
                "deduplicate the source to keep them)", name, copies + elsewhere, copies, elsewhere,
            )
        return documents.select(train_rows)

    return _HeldOut(validation=documents.select(picked), train=train)


def _streamed_validation_size(stream: IterableDataset, spec: SourceSpec, fraction: float, count: int | None) -> int:
    if count is not None:
        return count
    split = spec.split.split("[")[0]
    known = spec.max_documents
    if known is None and stream.info.splits and split in stream.info.splits:
        known = stream.info.splits[split].num_examples or None
    if known is None:
        raise ValueError(
            f"streamed source {spec.name!r} has no known size, so validation_fraction cannot be turned into a number "
            "of documents: set validation_documents (documents held out per source) or max_documents"
        )
    return max(1, round(fraction * known))


def _hold_out_first(stream: IterableDataset, n_held_out: int, name: str) -> _HeldOut:
    """The first `n_held_out` non-empty documents for validation; training filters every held-out text out."""
    stream = stream.filter(_has_text)
    head = list(stream.take(n_held_out))
    if not head:
        raise ValueError(f"streamed source {name!r} has no non-empty document; check the files / text_column / split")

    def train(held_out: set[str]) -> IterableDataset:
        # Filter by content rather than `.skip(n)`: `skip` is split across shards when the stream is later
        # sharded (DataLoader workers, ranks), so it would drop other documents and keep held-out ones.
        rest = stream.filter(_not_held_out, fn_kwargs={"held_out": frozenset(held_out)})
        if next(iter(rest.take(1)), None) is None:
            raise ValueError(
                f"streamed source {name!r}: its documents are all held out for validation (its first {len(head)}, "
                "and copies of texts held out by another source or data section): at least 1 must be left for "
                "training; add data or lower validation_documents"
            )
        return rest

    return _HeldOut(validation=Dataset.from_list(head, features=stream.features), train=train)


def _has_text(example: dict[str, Any]) -> bool:
    return bool(example["text"])


def _not_held_out(example: dict[str, Any], held_out: frozenset[str]) -> bool:
    return example["text"] not in held_out


def _shared_columns(parts: list[Dataset | IterableDataset]) -> list[str]:
    """`text` plus the columns that every part has with the same type (interleaving needs equal features)."""
    if any(part.features is None for part in parts):
        return ["text"]
    first = parts[0].features
    return [c for c in first if c == "text" or all(c in p.features and p.features[c] == first[c] for p in parts[1:])]


# ------------------------------------------------------------------------------- tokenize and pack


def tokenize_and_pack(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    packing: bool = True,
    document_masking: bool = False,
    num_proc: int = 1,
    preprocessing_version: str = PREPROCESSING_VERSION,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset | IterableDataset:
    """Turn the `text` column into training examples with a batched `datasets.map`.

    Every document becomes `[bos] + tokens + [eos]` (empty documents are skipped).

    * `packing=True`: documents are concatenated and cut into blocks of exactly `block_size` tokens; a
      document may span blocks and the tail shorter than a block is dropped (one tail per `num_proc` worker).
      Columns: `input_ids`; `labels`, equal to `input_ids` except `IGNORE_INDEX` on the first token of each
      document that follows another document in the same block (its "prediction" from the previous
      document is noise); with `document_masking`, `position_ids` that restart at 0 at each document start
      and at the start of each block, which Quill (and transformers' flash-attention path) read as document
      boundaries when no `attention_mask` is given, so documents do not attend to each other.
    * `packing=False`: one document per example, truncated to `block_size`, unpadded (`collate` pads).

    `num_proc` worker processes tokenize a map-style dataset (a stream is mapped lazily in the reading process).
    Map-style input is written to (and on later runs read from) `cache_dir`, default
    `<HF_DATASETS_CACHE>/pipeline/tokenized`, under a fingerprint of the input dataset, the tokenizer, these
    settings and `preprocessing_version`. Streamed input is mapped lazily, uncached.

    Raises `ValueError` for `block_size < 2`, a tokenizer without BOS/EOS, a dataset without `text`, and
    when no block comes out (the corpus is shorter than one block: the message gives its token count).
    """
    _check_pack_arguments(dataset, tokenizer, block_size, packing, document_masking, num_proc)
    packer = _Packer(tokenizer, block_size, packing, document_masking)
    if isinstance(dataset, IterableDataset):
        examples = dataset.select_columns(["text"]).map(
            packer, batched=True, batch_size=_MAP_BATCH_SIZE, with_indices=True, remove_columns=["text"],
            features=packer.features,
        )
        if next(iter(examples.take(1)), None) is None:  # reads at most one block's worth of documents
            _raise_no_examples(dataset, tokenizer, block_size, packing, num_proc=1)
        return examples

    examples = cached_map(
        dataset,
        packer,
        tokenizer=tokenizer,
        settings={"block_size": block_size, "packing": packing, "document_masking": document_masking},
        features=packer.features,
        kind="tokenized",
        columns=["text"],  # label columns would not survive packing anyway
        cache_dir=cache_dir,
        preprocessing_version=preprocessing_version,
        with_indices=True,
        num_proc=num_proc,
        desc="Packing" if packing else "Tokenizing",
    )
    if len(examples) == 0:
        _raise_no_examples(dataset, tokenizer, block_size, packing, num_proc)
    return examples


def cached_map(
    dataset: Dataset,
    function: Callable[..., dict[str, Any]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    settings: Mapping[str, Any],
    features: datasets.Features,
    kind: str,
    columns: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    preprocessing_version: str = PREPROCESSING_VERSION,
    num_proc: int = 1,
    **map_kwargs: Any,
) -> Dataset:
    """A batched `dataset.map(function)` whose output has exactly `features` (the input columns are removed), cached
    in ``<cache_dir>/<kind>-<fingerprint>.arrow`` and read back from there on every later run.

    The fingerprint hashes everything that decides the output, since `datasets` does not hash the body of an
    imported function: the input dataset's own fingerprint (which follows the content for in-memory data and the
    file timestamps for files), `tokenizer_fingerprint(tokenizer)`, `preprocessing_version` and `settings`, a
    JSON-serializable mapping of the function's own arguments. `settings` must tell different functions apart
    (fine-tuning puts its ``task`` in it): `kind` only names the file.

    Args:
        columns: the input columns `function` reads (default all); the others are dropped before mapping, and the
            fingerprint is still the whole `dataset`'s.
        cache_dir: default ``<HF_DATASETS_CACHE>/pipeline/tokenized``; the file is written even for in-memory
            datasets, which have no cache of their own.
        num_proc: worker processes (1: none started).
        map_kwargs: passed on to `Dataset.map` (``with_indices``, ``desc``, ...); ``batch_size`` defaults to 1000.
    """
    shadowed = sorted(set(settings) & set(_RESERVED_SETTINGS))
    if shadowed:
        raise ValueError(f"cached_map settings {shadowed} would shadow what it hashes itself; rename them")
    payload = json.dumps(
        {
            "dataset": dataset._fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "preprocessing_version": preprocessing_version,
            **settings,
        },
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
    directory = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "pipeline" / "tokenized")
    directory.mkdir(parents=True, exist_ok=True)
    inputs = dataset if columns is None else dataset.select_columns(list(columns))
    map_kwargs.setdefault("batch_size", _MAP_BATCH_SIZE)
    return inputs.map(
        function,
        batched=True,
        remove_columns=inputs.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,  # num_proc=1 would still start a worker pool
        new_fingerprint=fingerprint,
        cache_file_name=str(directory / f"{kind}-{fingerprint}.arrow"),
        **map_kwargs,
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 hex digest of everything that decides the token ids a tokenizer produces.

    Covers the backend's full `tokenizer.json` (vocab, merges, pre-tokenizer, post-processor, added tokens),
    the special tokens, the chat template and `model_max_length`. It is the same for a tokenizer and its
    `save_pretrained`/`from_pretrained` copy, and for two trainings on the same texts, so `cached_map` can
    put it into its `datasets` cache fingerprint.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    # transformers leaves the last call's padding/truncation settings on the backend: they are call
    # arguments, not part of the tokenizer, and save_pretrained drops them too.
    state.pop("padding", None)
    state.pop("truncation", None)
    payload = {
        "tokenizer.json": state,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
        "model_max_length": tokenizer.model_max_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_pack_arguments(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    packing: bool,
    document_masking: bool,
    num_proc: int,
) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (a token and the token it predicts), got {block_size!r}")
    if document_masking and not packing:
        raise ValueError("document_masking=True needs packing=True: an unpacked example holds a single document")
    _check_positive_int("num_proc", num_proc)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs bos_token and eos_token (documents become [bos] + tokens + [eos])")
    if dataset.column_names is not None and "text" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'text' column (its columns: {dataset.column_names}); use load_corpus")


class _Packer:
    """The batched `map` function: texts -> [bos] + ids + [eos] -> examples.

    When packing, the tokens left over after the last full block of a batch are carried into the next batch,
    so the blocks are the corpus's token stream cut every `block_size` tokens, whatever the map batch size,
    and only the final tail is dropped (per worker with num_proc > 1). `datasets` calls the function on
    consecutive batches in order within a worker; a batch whose first index does not follow the previous
    batch (a new worker, a new pass over a stream) starts afresh.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, block_size: int, packing: bool, document_masking: bool):
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.packing = packing
        self.document_masking = document_masking
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._reset(next_index=0)

    @property
    def features(self) -> datasets.Features:
        ids = datasets.Sequence(datasets.Value("int32"))
        columns = ["input_ids", "labels"] + (["position_ids"] if self.document_masking else [])
        return datasets.Features({column: ids for column in columns})

    def _reset(self, next_index: int) -> None:
        self._next_index = next_index
        self._carry_ids = np.empty(0, dtype=np.int32)
        self._carry_starts = np.empty(0, dtype=bool)  # True where a document starts

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        if indices and indices[0] != self._next_index:
            self._reset(indices[0])
        self._next_index += len(indices)
        documents = self.encode(batch["text"])
        return self._pack(documents) if self.packing else self._truncate(documents)

    def encode(self, texts: list[str | None]) -> list[list[int]]:
        texts = [text for text in texts if text]
        if not texts:
            return []
        # verbose=False: documents longer than model_max_length are expected here; packing cuts them.
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return [[self.bos, *ids, self.eos] for ids in encoded["input_ids"]]

    def _truncate(self, documents: list[list[int]]) -> dict[str, list[list[int]]]:
        input_ids = [ids[: self.block_size] for ids in documents]
        return {"input_ids": input_ids, "labels": input_ids}

    def _pack(self, documents: list[list[int]]) -> dict[str, list[list[int]]]:
        lengths = np.fromiter((len(ids) for ids in documents), dtype=np.int64, count=len(documents))
        new_ids = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int32, count=int(lengths.sum()))
        new_starts = np.zeros(len(new_ids), dtype=bool)
        new_starts[np.cumsum(lengths) - lengths] = True
        ids = np.concatenate([self._carry_ids, new_ids])
        starts = np.concatenate([self._carry_starts, new_starts])

        n_blocks = len(ids) // self.block_size
        cut = n_blocks * self.block_size
        self._carry_ids, self._carry_starts = ids[cut:], starts[cut:]
        input_ids = ids[:cut].reshape(n_blocks, self.block_size)  # (N, T)
        starts = starts[:cut].reshape(n_blocks, self.block_size)  # (N, T)

        follows_document = starts.copy()
        follows_document[:, 0] = False  # a block's first token has no preceding document in its block
        labels = np.where(follows_document, IGNORE_INDEX, input_ids)
        examples = {"input_ids": input_ids, "labels": labels}
        if self.document_masking:
            column = np.arange(self.block_size)
            last_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)  # block start counts as one
            examples["position_ids"] = column - last_start
        # Lists, not arrays: a streamed map yields the function's output as is, and should match map-style rows.
        return {name: rows.tolist() for name, rows in examples.items()}


def _raise_no_examples(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    packing: bool,
    num_proc: int,
) -> None:
    if not packing:
        raise ValueError("tokenization produced no example: every document is empty; check the text column")
    # Only reached for corpora shorter than a block (per worker), so counting their tokens is cheap.
    encode = _Packer(tokenizer, block_size, packing=True, document_masking=False).encode
    n_tokens = sum(len(ids) for batch in dataset.iter(batch_size=_MAP_BATCH_SIZE) for ids in encode(batch["text"]))
    per_worker = f" ({num_proc} workers pack separately: ~{n_tokens // num_proc} tokens each)" if num_proc > 1 else ""
    raise ValueError(
        f"packing produced no block: the corpus has {n_tokens} tokens (with BOS/EOS){per_worker}, fewer than "
        f"block_size={block_size}. Use a smaller block_size (at most {max(2, n_tokens // num_proc)}) or more data."
    )


# ------------------------------------------------------------------------------------------ loaders


def block_loaders(
    section: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    eval_batch_size: int | None = None,
    held_out_by: Sequence[DataSection] = (),
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of packed (or single-document) blocks of a data section: `load_splits`
    (with `held_out_by`, the recipe's `held_out_sections`), then `tokenize_and_pack` with the section's
    ``block_size``, ``packing``, ``document_masking`` and ``num_proc``.

    Tokenization runs on the main process first; the other ranks then read its cache files instead of tokenizing
    again. The training loader shuffles (a streamed section is read in order) and drops the last partial batch;
    the validation loader batches by `eval_batch_size`, default `batch_size`.
    """
    with accelerator.main_process_first():
        train_docs, validation_docs = load_splits(section, seed, held_out_by)
        pack = partial(
            tokenize_and_pack, tokenizer=tokenizer, block_size=section.block_size, packing=section.packing,
            document_masking=section.document_masking, num_proc=section.num_proc,
        )
        train_blocks, validation_blocks = pack(train_docs), pack(validation_docs)
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    shuffle = not section.streaming  # an IterableDataset is read in order (shuffle it with a buffer upstream)
    train_loader = DataLoader(
        train_blocks, batch_size=batch_size, shuffle=shuffle, drop_last=True, collate_fn=collate_fn
    )
    validation_loader = DataLoader(validation_blocks, batch_size=eval_batch_size or batch_size, collate_fn=collate_fn)
    return train_loader, validation_loader


# --------------------------------------------------------------------------------- batches, metrics


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into LongTensors: `input_ids`, `labels` (copied from `input_ids` when absent) and
    `position_ids` when the examples have them.

    Examples of different lengths (unpacked documents) are right-padded: `pad_token_id` in `input_ids`,
    `IGNORE_INDEX` in `labels`, and an `attention_mask` of 1 (token) / 0 (padding) is added. Equal-length
    examples (packed blocks) get no `attention_mask`: it would be all ones, and its absence lets the model
    use the fused causal kernel and read restarting `position_ids` as document boundaries.
    """
    if not examples:
        raise ValueError("collate got no examples")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (the tokenizer's pad_token_id); it must differ from eos")

    def tensors(column: str) -> list[torch.Tensor]:
        return [torch.as_tensor(ex[column] if column in ex else ex["input_ids"], dtype=torch.long) for ex in examples]

    input_ids = tensors("input_ids")
    columns = {"input_ids": (input_ids, pad_token_id), "labels": (tensors("labels"), IGNORE_INDEX)}  # (rows, pad)
    if "position_ids" in examples[0]:
        columns["position_ids"] = (tensors("position_ids"), 0)

    lengths = torch.tensor([len(ids) for ids in input_ids])
    if bool((lengths == lengths[0]).all()):
        return {name: torch.stack(rows) for name, (rows, _) in columns.items()}
    batch = {
        name: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)  # pads on the right
        for name, (rows, value) in columns.items()
    }
    batch["attention_mask"] = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    return batch


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """(len(tokenizer),) LongTensor: how many UTF-8 bytes of text each token id stands for; 0 for special tokens.

    For bits per byte, bpb = Σ NLL of the target tokens that stand for at least one byte (nats) / (ln 2 · Σ byte
    lengths of those tokens), which is comparable across tokenizers; zero-byte targets (a closing EOS) are left
    out. Exact for byte-level BPE, where every character of a vocabulary entry stands for one byte: the bytes of
    a text's tokens sum to `len(text.encode("utf-8"))`.
    """
    backend = tokenizer.backend_tokenizer
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(
            f"token_byte_lengths needs a byte-level BPE tokenizer (decoder 'ByteLevel'), got {decoder.get('type')!r}"
        )
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        lengths[index] = len(token)
    for index, added in tokenizer.added_tokens_decoder.items():  # matched on raw text, not byte symbols
        lengths[index] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths
