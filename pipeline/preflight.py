"""Pre-flight: what depends only on the recipe and the things it names, checked before any stage runs.

`pipeline.recipe.load_recipe` checks every value and the rules between sections. `check` looks at what the recipe
names, cheaply and without writing anything: the model fine-tuning will adapt (built on the meta device, no
weights), the tokenizer and model folders, the data's columns and size (a built-in corpus is built, a local file is
read up to its first row; Hub datasets and models are not fetched, so their checks stay with the stages), and the
launch (the environment `accelerate launch` exports). Every problem comes back at once in one `RecipeError`, in the
recipe's own format (key path, what is wrong, the fix), so that a typo never costs a pretraining run.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.artifacts import base_key, model_folder_problem, tokenizer_folder_problem
from pipeline.recipe import DataSection, Recipe, RecipeError, SourceSection
from pipeline.recipe.schema import STAGES, Problem

__all__ = ["check", "launch_problems", "problems"]



def check(recipe: Recipe, stages: Sequence[str] | None = None) -> None:
    """Raise `RecipeError` listing every problem `problems` finds for the ``stages`` that will run (default: all)."""
    found = problems(recipe, stages)
    if found:
        raise RecipeError(found, source="(pre-flight: nothing was run or written)")


def problems(recipe: Recipe, stages: Sequence[str] | None = None) -> list[Problem]:
    """Every pre-flight problem of the selected stages that the recipe switches on, each once."""
    selected = set(stages or STAGES)

    def runs(stage: str) -> bool:
        return stage in selected and recipe.runs(stage)

    found: list[Problem] = []
    for group in (_tokenizer_problems(recipe, runs), _model_problems(recipe, runs), _data_problems(recipe, runs),
                  launch_problems(recipe, runs)):
        found += [problem for problem in group if problem not in found]
    return found


# ------------------------------------------------------------------------------------------ tokenizer and models


def _tokenizer_problems(recipe: Recipe, runs: Any) -> Iterator[Problem]:
    if not runs("tokenizer"):
        return
    section = recipe.tokenizer
    if section.path is not None:
        problem = tokenizer_folder_problem(section.path)
        if problem:
            yield "tokenizer.path", problem
        return
    from tokenizers import pre_tokenizers

    from pipeline.loading import DEFAULT_SPECIAL_TOKENS

    n_bytes, specials = len(pre_tokenizers.ByteLevel.alphabet()), list(DEFAULT_SPECIAL_TOKENS.values())
    if section.vocab_size < n_bytes + len(specials):
        yield "tokenizer.vocab_size", (
            f"({section.vocab_size}) cannot hold the {n_bytes} byte symbols and the {len(specials)} special tokens "
            f"{specials} of byte-level BPE: the smallest vocabulary is {n_bytes + len(specials)}. Fix: use e.g. 4096."
        )


def _model_problems(recipe: Recipe, runs: Any) -> Iterator[Problem]:
    """The model folders the recipe names, the LoRA targets against the model fine-tuning adapts, and the block
    sizes against the positions of a given model."""
    model_used = runs("pretrain") or runs("evaluate") or (runs("finetune") and recipe.finetune.base is None)
    folders = [("model.path", recipe.model.path, model_used)]
    if recipe.finetune.base != recipe.model.path:  # else it was filled from model.path: reported under that key
        folders.append(("finetune.base", recipe.finetune.base, runs("finetune") or runs("evaluate")))
    broken = set()
    for key, location, used in folders:
        problem = model_folder_problem(location, weights=True) if location is not None and used else None
        if problem:
            broken.add(key)
            yield key, problem
    yield from _position_problems(recipe, runs, broken)
    yield from _vocabulary_problems(recipe, runs, broken)
    if runs("finetune") and base_key(recipe) not in broken:
        model = _finetune_model(recipe)
        if model is not None:
            from pipeline.loading import lora_config, lora_target_problems

            yield from lora_target_problems(model, lora_config(recipe.finetune.lora, recipe.finetune.task))


def _given_config(location: str | None) -> Any:
    """The config of an existing model: a local folder's, or a Hub id's already in the local cache; None when it
    cannot be had without a download or remote code (the stage reports those)."""
    if location is None:
        return None
    try:
        from transformers import AutoConfig

        import pipeline.models.quill  # noqa: F401  (AutoConfig must know Quill)

        return AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _position_problems(recipe: Recipe, runs: Any, broken: set[str]) -> Iterator[Problem]:
    """Blocks longer than a given model's positions (the loader checks the model it builds itself)."""
    pairs = []  # (model key, the model's location, block size keys that model sees)
    if recipe.model.path is not None and "model.path" not in broken:
        keys = ["data.block_size"] if runs("pretrain") or runs("evaluate") else []
        if runs("finetune") and recipe.finetune.base in (None, recipe.model.path):
            keys.append("finetune.data.block_size")
        pairs.append(("model.path", recipe.model.path, keys))
    base = recipe.finetune.base
    if base is not None and base != recipe.model.path and "finetune.base" not in broken and runs("finetune"):
        keys = ["finetune.data.block_size"] + (["data.block_size"] if runs("evaluate") else [])
        pairs.append(("finetune.base", base, keys))
    sizes = {"data.block_size": recipe.data.block_size, "finetune.data.block_size": recipe.finetune.data.block_size}
    for model_key, location, keys in pairs:
        limit = getattr(_given_config(location) if keys else None, "max_position_embeddings", None)
        for key in keys:
            if limit is not None and sizes[key] > limit:
                yield key, (
                    f"({sizes[key]}) exceeds the max_position_embeddings ({limit}) of the model in {model_key}. "
                    f"Fix: set {key} to at most {limit}."
                )


def _vocabulary_problems(recipe: Recipe, runs: Any, broken: set[str]) -> Iterator[Problem]:
    """A tokenizer trained by this run for a given model must fit the model's embedding table."""
    if recipe.tokenizer.path is not None or not runs("pretrain") or recipe.model.path is None or "model.path" in broken:
        return
    embedded = getattr(_given_config(recipe.model.path), "vocab_size", None)
    if embedded is not None and recipe.tokenizer.vocab_size > embedded:
        yield "tokenizer.vocab_size", (
            f"({recipe.tokenizer.vocab_size}) exceeds the {embedded} tokens the model in model.path embeds, and "
            "pretraining continues that model with the tokenizer this run trains. Fix: set tokenizer.path to the "
            "model's own tokenizer (usually model.path itself)."
        )


def _finetune_model(recipe: Recipe) -> Any:
    """The model fine-tuning adapts, on the meta device (module names only, no memory); None when unknown here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.loading import quill_config

    given = recipe.finetune.base or recipe.model.path  # None: the Quill pretraining builds from recipe.model
    config = quill_config(recipe.model, recipe.tokenizer.vocab_size) if given is None else _given_config(given)
    if config is None:
        return None
    auto = AutoModelForSequenceClassification if recipe.finetune.task == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError):  # e.g. an architecture without that head
        return None


# ------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class _Peek:
    """What a data section gives, as far as is known without loading it: its columns (name -> `datasets`
    feature, None when only the name is known) and an upper bound on its documents per source."""

    columns: dict[str, Any] | None  # None: unknown (a Hub source)
    sizes: list[int | None]


def _data_problems(recipe: Recipe, runs: Any) -> Iterator[Problem]:
    finetune, evaluate = recipe.finetune, recipe.evaluate
    sections = []  # (key, data section, whether a running stage reads it)
    sections.append(("data", recipe.data, runs("pretrain") or runs("evaluate")))
    sections.append(("finetune.data", finetune.data, runs("finetune") or runs("evaluate")))
    peeks: dict[str, _Peek] = {}
    found: list[Problem] = []
    seen: list[SourceSection] = []  # copies of data.sources (the defaults of the others) report once
    for key, section, used in sections:
        if used:
            peeks[key] = _peek(key, section, found, seen)
    for key, sources, used in (("tokenizer.sources", recipe.tokenizer.sources, runs("tokenizer")),
                               ("evaluate.general", evaluate.general, runs("evaluate")),
                               ("evaluate.domain", evaluate.domain, runs("evaluate"))):
        if used and sources:
            _peek(key, DataSection(sources=sources), found, seen, source_key=key)
    yield from found
    rows = peeks.get("finetune.data")
    if rows is None or rows.columns is None:
        return
    columns, task, label = rows.columns, finetune.task, finetune.label_column
    tuning = runs("finetune")
    generation = runs("evaluate") and ("generation" in evaluate.tasks or (tuning and task == "instruction"))
    wanted: list[str] = []
    if (tuning and task in ("instruction", "classification")) or generation:
        wanted.append(label)
    if finetune.prompt_template is not None and (tuning and task == "instruction" or generation):
        yield from _template_problems(finetune.prompt_template, columns)
    elif task in ("instruction", "classification") and (tuning or generation):
        wanted.append("text")
    missing = [c for c in dict.fromkeys(wanted) if c not in columns]
    if label in missing:
        shared = "; the columns all its sources share" if len(finetune.data.sources) > 1 else ""
        yield "finetune.label_column", (
            f"{label!r} is not a column of finetune.data (its columns: {sorted(columns)}{shared}). Fix: set "
            "finetune.label_column to one of them."
        )
    if tuning and task == "classification" and label in columns:
        yield from _label_type_problems(label, columns[label])
    if generation and evaluate.few_shot:
        yield from _few_shot_problems(recipe, rows)


def _peek(key: str, section: DataSection, found: list[Problem], seen: list[SourceSection],
          source_key: str | None = None) -> _Peek:
    """The columns the stages will see (a mixture keeps the columns its sources share) and each source's size
    bound; problems with a source's ``text_column`` or its size go into ``found``."""
    shared: dict[str, Any] | None = None
    known = True
    sizes: list[int | None] = []
    for index, source in enumerate(section.sources):
        where = f"{source_key or key + '.sources'}[{index}]"
        peeked = _source_columns(source)
        if peeked is None:
            known, size = False, None
        else:
            columns, size = peeked
            if source.text_column not in columns:
                found += [] if source in seen else [(f"{where}.text_column", (
                    f"{source.text_column!r} is not a column of {source.name!r} (its columns: {sorted(columns)}). "
                    "Fix: set text_column to the column that holds the text."
                ))]
                known = False
            else:
                if source.text_column != "text":  # as `sources.load_source` renames it
                    columns = {("text" if c == source.text_column else c): f for c, f in columns.items() if c != "text"}
                shared = columns if shared is None else {
                    c: f for c, f in shared.items() if c in columns and (c == "text" or f == columns[c])}
        seen.append(source)
        caps = [n for n in (size, source.max_documents, section.max_documents) if n is not None]
        sizes.append(min(caps) if caps else None)
        bound = sizes[-1]
        if source_key is None and bound is not None:
            held = section.validation_documents
            if bound < 2:
                found.append((f"{where}.name", (
                    f"{source.name!r} gives at most {bound} document(s); at least 2 are needed (1 held out, 1 to "
                    "train on). Fix: add data or raise max_documents."
                )))
            elif held is not None and held >= bound:
                found.append((f"{key}.validation_documents", (
                    f"({held}) leaves no document of {source.name!r} for training: it gives at most {bound}. Fix: "
                    f"use at most {bound - 1}."
                )))
    return _Peek(shared if known else None, sizes)


def _source_columns(source: SourceSection) -> tuple[dict[str, Any], int | None] | None:
    """(columns, number of documents or None) of one source: a built-in corpus is built (cached per process), a
    local file read up to its first row; None for a Hub dataset (not fetched) or a source that fails to open (the
    loader and the stage say why)."""
    from pipeline.sources import CORPORA

    if source.name in CORPORA:
        return _corpus_columns(source.name)
    name = os.path.expanduser(source.name)
    if not (Path(name).exists() or any(c in name for c in "*?[")):
        return None
    from pipeline.sources import SourceSpec, load_source

    spec = SourceSpec(name=source.name, split=source.split, sample_by=source.sample_by, streaming=True)
    try:
        stream = load_source(spec)
        first = next(iter(stream), None)
    except (ValueError, OSError, TypeError):
        return None
    if first is None:
        return None
    features = stream.features or {}
    return {column: features.get(column) for column in first}, None


@cache
def _corpus_columns(name: str) -> tuple[dict[str, Any], int]:
    from pipeline.sources import CORPORA

    corpus = CORPORA[name]()
    return dict(corpus.features), len(corpus)


def _template_problems(template: str, columns: dict[str, Any]) -> Iterator[Problem]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        yield "finetune.prompt_template", (
            f"{template!r} is not a valid format string ({error}). Fix: write '{{column}}' for a column, double "
            "braces for literal ones."
        )
        return
    unknown = [f for f in fields if not f or f.split(".")[0].split("[")[0] not in columns]
    if unknown:
        yield "finetune.prompt_template", (
            f"uses fields {unknown} that are not columns of finetune.data ({sorted(columns)}). Fix: write '{{column}}' "
            "with one of those columns (positional '{}' is not allowed); double braces for literal ones."
        )


def _label_type_problems(label: str, feature: Any) -> Iterator[Problem]:
    from datasets import ClassLabel, Value

    if feature is None or isinstance(feature, ClassLabel):
        return
    if not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        yield "finetune.label_column", (
            f"{label!r} holds {feature}, but classification labels are integer class ids. Fix: name a column of ids "
            "0 .. num_labels-1 (or a datasets ClassLabel)."
        )


def _few_shot_problems(recipe: Recipe, rows: _Peek) -> Iterator[Problem]:
    """few_shot solved examples come from at most `generation.FEW_SHOT_POOL` training rows of finetune.data."""
    from pipeline.generation import FEW_SHOT_POOL

    k, data = recipe.evaluate.few_shot, recipe.finetune.data
    available = FEW_SHOT_POOL
    if len(rows.sizes) == 1 and rows.sizes[0] is not None:  # a mixture repeats small sources: no exact bound
        n = rows.sizes[0]
        held = data.validation_documents or min(max(1, round(data.validation_fraction * n)), n - 1)
        available = min(available, max(0, n - held))
    if k > available:
        yield "evaluate.few_shot", (
            f"({k}) asks for more solved examples than the fine-tuning data can give: at most {available} training "
            "rows. Fix: lower evaluate.few_shot (or give finetune.data more documents)."
        )


# ------------------------------------------------------------------------------------------ launch


def launch_problems(recipe: Recipe, runs: Any = None) -> Iterator[Problem]:
    """A launch configuration this hardware cannot apply, read from what `accelerate launch` exports: FSDP or
    DeepSpeed on CPUs (accelerate would silently train plain data-parallel instead), and a mixed precision other
    than the recipe's (the recipe's would silently replace it)."""
    runs = runs or recipe.runs
    from accelerate.utils import parse_flag_from_env

    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not _has_accelerator()
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if on_cpu and parse_flag_from_env(flag) and (runs("pretrain") or runs("finetune")):
            yield flag, (
                f"is set (the accelerate config asks for {name}), but this process runs on the CPU, where accelerate "
                f"ignores {name} and trains plain data-parallel (MULTI_CPU) instead. Fix: launch on GPUs, or for CPU "
                "ranks use `ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m "
                "pipeline run RECIPE`."
            )
    for stage, key, train in (("pretrain", "pretrain", recipe.pretrain), ("finetune", "finetune.train", recipe.finetune.train)):
        if on_cpu and runs(stage) and train.mixed_precision == "fp16":
            yield f"{key}.mixed_precision", (
                "is 'fp16', which accelerate does not apply on the CPU (it trains in float32, without autocast or "
                f"loss scaling). Fix: {key}.mixed_precision=bf16 (autocast on CPUs) or no, or train on GPUs."
            )
    # `accelerate launch` exports "no" when neither a config file nor --mixed_precision says otherwise: then the
    # recipe's value applies. Any other launch value differing from the recipe's would be silently overridden.
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched == "no":
        return
    stages = (("pretrain", "pretrain", recipe.pretrain), ("finetune", "finetune.train", recipe.finetune.train))
    for stage, key, train in stages:
        if runs(stage) and launched != train.mixed_precision:
            yield f"{key}.mixed_precision", (
                f"is {train.mixed_precision!r} but the accelerate launch asks for {launched!r} "
                "(ACCELERATE_MIXED_PRECISION, from its config file or --mixed_precision); the recipe's value would "
                f"silently win. Fix: add {key}.mixed_precision={launched} to the command, or launch with "
                f"--mixed_precision {train.mixed_precision}."
            )


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
