"""The recipe: one YAML file that says what the pipeline builds, checked completely before anything runs.

A recipe is a tree of typed sections (the dataclasses below; each knob is documented where it is declared).
`load_recipe` reads the YAML, applies ``KEY.SUB=VALUE`` command-line overrides, converts every value to its
declared type, checks values and cross-field constraints, fills the defaults that refer to other sections,
checks the files it names, and returns a `Recipe`. Every problem is reported at once in one `RecipeError`,
each with its key path (``pretrain.learning_rate``), what was expected, what was found and the fix.

YAML rules. The recipe loader is PyYAML's safe loader with the YAML 1.1 surprises removed:

* Numbers follow YAML 1.2: ``1e-4`` is the float 0.0001 (plain PyYAML: the string '1e-4'); ``042`` is the
  decimal 42 (plain PyYAML: octal 34); hex and octal need ``0x``/``0o``; ``1:30`` is a string (PyYAML: 90,
  base 60). Dates stay strings. ``_`` between digits is allowed (``1_000``).
* A repeated key is an error (PyYAML silently keeps the last one).
* ``yes/no/on/off/true/false`` are booleans, as in PyYAML. A choice field whose options include ``"no"``
  reads a false there as ``"no"`` (``mixed_precision: no``); a true there is an error.
* An int field takes a float only when it is integral (``max_steps: 1e5``); ``2.5`` is an error. Number
  fields also take numeric strings (``'1e-4'``, which plain ``yaml.safe_load`` produces). A string field
  never takes a number or a boolean: quote it (``revision: '0123'``).

Relative paths (``output_dir``, local data sources, a local tokenizer, model or checkpoint) are resolved
against the current working directory when the recipe is loaded, as every command-line tool does, and ``~``
is expanded: the returned recipe holds absolute paths, so stages may change directory freely.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "DataSection",
    "EvaluateSection",
    "FinetuneSection",
    "GenerationSection",
    "HubSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "SourceSection",
    "TokenizerSection",
    "TrainSection",
    "dump_recipe",
    "from_dict",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "section_hash",
]

Problem = tuple[str, str]  # (key path, what is wrong and how to fix it)


class RecipeError(ValueError):
    """A recipe that cannot run. ``problems`` holds every (key path, message) found; str() lists them all."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = [f"Invalid recipe{f' {source}' if source else ''} ({count} problem{'s' * (count != 1)}):"]
        lines += [f"  - {path or '<recipe>'}: {message}" for path, message in self.problems]
        super().__init__("\n".join(lines))


# Field metadata. Knobs that cannot change what a stage produces stay out of `section_hash`, so editing them
# does not re-run a finished stage; secrets also stay out of `recipe_to_dict` (and so out of dumped files).
_NO_HASH = {"hash": False}
_SECRET = {"hash": False, "secret": True}
_section = dataclass(kw_only=True)


# ------------------------------------------------------------------------------------------ sections


@_section
class SourceSection:
    """One text source (see `pipeline.sources`): a built-in corpus, local files or a Hub dataset."""

    name: str
    """A built-in corpus (``icd10cm``, ``shakespeare``), a file / directory / glob, or a Hub id ``owner/name``."""
    weight: float = 1.0
    """Relative weight of this source when the sources are mixed (> 0)."""
    split: str = "train"
    """Split to read (local files accept slices such as ``train[:10%]``)."""
    text_column: str = "text"
    """Column that holds the text."""
    subset: str | None = None
    """Hub dataset configuration (the ``name`` argument of `datasets.load_dataset`)."""
    max_documents: int | None = None
    """Read at most this many documents from this source (None: all)."""
    sample_by: Literal["paragraph", "document", "line"] = "paragraph"
    """How a local .txt file is cut into documents."""

    def problems(self) -> Iterator[Problem]:
        if not self.name.strip():
            yield "name", "must not be empty. Fix: give a built-in corpus, a local path or a Hub dataset id."
        yield from _check_range(self, "weight", low=0, open_low=True)
        if not self.text_column:
            yield "text_column", "must not be empty. Fix: name the column that holds the text (default 'text')."
        yield from _check_range(self, "max_documents", low=1)


@_section
class TokenizerSection:
    """The tokenizer stage: train a byte-level BPE tokenizer, or reuse an existing one."""

    path: str | None = None
    """An existing tokenizer (local folder or Hub id): training is skipped."""
    vocab_size: int = 4096
    """Size of the trained vocabulary, special tokens included."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    sources: list[SourceSection] | None = None
    """Text to train on (None: ``data.sources``)."""
    max_documents: int | None = None
    """Train on at most this many documents in total (None: all)."""

    def problems(self) -> Iterator[Problem]:
        if self.vocab_size <= 256:
            yield "vocab_size", (
                f"must be more than 256, got {self.vocab_size}: byte-level BPE starts from 256 byte symbols plus "
                "special tokens. Fix: use e.g. 4096."
            )
        yield from _check_range(self, "min_frequency", low=1)
        yield from _check_range(self, "max_documents", low=1)
        yield from _check_not_empty_list(self, "sources", "leave the key out to train on data.sources")


@_section
class ModelSection:
    """The model: a Quill built from these hyper-parameters, or an existing causal LM."""

    path: str | None = None
    """An existing model (local folder or Hub id): no from-scratch init; pretrain continues training it or is disabled."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_hidden_layers: int = 4
    """Number of decoder blocks."""
    num_attention_heads: int = 4
    """Query heads per block; must divide hidden_size."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide num_attention_heads (None: one per query head)."""
    intermediate_size: int | None = None
    """Width of the MLP (None: the model config's rule, about 8/3 of hidden_size)."""
    hidden_act: str = "silu"
    """Activation of the MLP (silu gives SwiGLU)."""
    position_embedding_type: Literal["rope", "sinusoidal", "learned"] = "rope"
    """How positions enter: rotary, fixed sinusoidal, or a learned table."""
    max_position_embeddings: int = 512
    """Longest sequence the positions are built for; data.block_size may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    dropout: float = 0.0
    """Dropout probability of embeddings, attention and residual branches."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with lm_head."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel (transformers' ``attn_implementation``)."""

    def problems(self) -> Iterator[Problem]:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            yield from _check_range(self, name, low=1)
        heads, kv_heads, width = self.num_attention_heads, self.num_key_value_heads, self.hidden_size
        if heads >= 1 and width >= 1:
            if width % heads:
                yield "num_attention_heads", (
                    f"must divide hidden_size ({width}), got {heads}. Fix: pick a divisor of {width}, e.g. "
                    f"{_nearest_divisor(width, heads)}."
                )
            elif self.position_embedding_type == "rope" and (width // heads) % 2:
                yield "num_attention_heads", (
                    f"gives an odd head size {width // heads} (hidden_size / num_attention_heads), which rotary "
                    "embeddings cannot rotate in pairs. Fix: choose sizes with an even quotient."
                )
        if kv_heads is not None and kv_heads >= 1 and heads >= 1 and heads % kv_heads:
            yield "num_key_value_heads", (
                f"must divide num_attention_heads ({heads}), got {kv_heads}. Fix: pick a divisor of {heads}, e.g. "
                f"{_nearest_divisor(heads, kv_heads)} (1 = multi-query attention)."
            )
        if self.position_embedding_type == "sinusoidal" and width % 2:
            yield "hidden_size", f"must be even for sinusoidal positions, got {width}."
        from pipeline.models.quill.configuration_quill import HIDDEN_ACTS  # already imported by `pipeline`

        if self.hidden_act not in HIDDEN_ACTS:
            suggestion = _suggest(self.hidden_act, HIDDEN_ACTS)
            yield "hidden_act", f"expected one of {_choices(HIDDEN_ACTS)}, got {self.hidden_act!r}.{suggestion}"
        yield from _check_range(self, "rope_theta", low=0, open_low=True)
        yield from _check_range(self, "rms_norm_eps", low=0, open_low=True)
        yield from _check_range(self, "dropout", low=0, high=1, open_high=True)
        yield from _check_range(self, "initializer_range", low=0, open_low=True)
        if self.attn_implementation == "flex_attention" and self.dropout > 0:
            yield "dropout", "must be 0 with flex_attention (transformers' flex path has no attention dropout). Fix: use sdpa."


@_section
class DataSection:
    """Where the training text comes from and how it becomes fixed-length blocks."""

    sources: list[SourceSection]
    """The sources to mix (at least one)."""
    validation_fraction: float = 0.05
    """Share of the documents held out for validation, in (0, 1)."""
    block_size: int = 256
    """Tokens per training sequence."""
    packing: bool = True
    """Concatenate documents into full blocks (False: one document per sequence, padded)."""
    document_masking: bool = False
    """In packed blocks, stop attention at document boundaries."""
    streaming: bool = False
    """Stream the sources instead of loading them into memory."""
    num_proc: int = field(default=1, metadata=_NO_HASH)
    """Processes for tokenisation (`datasets.map`)."""
    max_documents: int | None = None
    """Use at most this many documents in total (None: all)."""
    validation_documents: int | None = None
    """Hold out exactly this many documents per source instead of validation_fraction (needed when streaming a
    source of unknown size)."""

    def problems(self) -> Iterator[Problem]:
        if not self.sources:
            yield "sources", "must list at least one source. Fix: e.g. sources: [{name: icd10cm}]."
        yield from _check_range(self, "validation_fraction", low=0, high=1, open_low=True, open_high=True)
        yield from _check_range(self, "block_size", low=2)
        yield from _check_range(self, "num_proc", low=1)
        yield from _check_range(self, "max_documents", low=1)
        yield from _check_range(self, "validation_documents", low=1)
        if self.streaming and not self.packing:
            yield "streaming", (
                "needs packing: true (accelerate dispatches streamed batches from the main process by concatenating "
                "them, which only works for fixed-length blocks). Fix: set packing: true or streaming: false."
            )
        if self.document_masking and not self.packing:
            yield "document_masking", (
                "only applies to packed blocks (each unpacked sequence is one document). Fix: set packing: true "
                "or remove document_masking."
            )


@_section
class TrainSection:
    """One run of the shared training loop (pretraining, or the fine-tuning's own copy)."""

    enabled: bool = True
    """Run this stage."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    num_epochs: int | None = None
    """Also stop after this many passes over the data, whichever comes first (None: max_steps alone)."""
    batch_size: int = 8
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the learning-rate decay after warmup."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to learning_rate (at most max_steps)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of learning_rate (cosine and linear)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (Accelerate's ``mixed_precision``)."""
    compile: bool = False
    """torch.compile the model."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_every: int = field(default=200, metadata=_NO_HASH)
    """Evaluate on the validation split every this many steps."""
    eval_batches: int | None = field(default=20, metadata=_NO_HASH)
    """Validation batches per evaluation (None: the whole split)."""
    log_every: int = field(default=10, metadata=_NO_HASH)
    """Log the training loss every this many steps."""
    save_every: int = field(default=500, metadata=_NO_HASH)
    """Save a resumable checkpoint every this many steps."""
    keep_last: int = field(default=2, metadata=_NO_HASH)
    """Checkpoints kept on disk, older ones are deleted (0: keep them all)."""
    resume: str = field(default="auto", metadata=_NO_HASH)
    """``auto`` (from the latest checkpoint, if any), ``never``, or the path of a checkpoint."""
    trackers: list[str] = field(default_factory=lambda: ["jsonl"], metadata=_NO_HASH)
    """Where metrics go: ``jsonl`` plus any Accelerate tracker (``tensorboard``, ``wandb``, ...)."""

    def problems(self) -> Iterator[Problem]:
        for name in ("max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "eval_every",
                     "eval_batches", "log_every", "save_every"):
            yield from _check_range(self, name, low=1)
        yield from _check_range(self, "keep_last", low=0)
        yield from _check_range(self, "learning_rate", low=0, open_low=True, fix="typical values are 1e-4 to 1e-3")
        yield from _check_range(self, "weight_decay", low=0)
        yield from _check_range(self, "adam_beta1", low=0, high=1, open_high=True)
        yield from _check_range(self, "adam_beta2", low=0, high=1, open_high=True)
        yield from _check_range(self, "adam_epsilon", low=0, open_low=True)
        yield from _check_range(self, "warmup_steps", low=0)
        if self.warmup_steps > self.max_steps >= 1:
            yield "warmup_steps", (
                f"({self.warmup_steps}) exceeds max_steps ({self.max_steps}): the learning rate would never reach its "
                f"peak. Fix: lower warmup_steps (e.g. {max(self.max_steps // 10, 0)}) or raise max_steps."
            )
        yield from _check_range(self, "min_lr_ratio", low=0, high=1)
        yield from _check_range(self, "max_grad_norm", low=0, open_low=True, fix="use null to disable clipping")
        if not self.resume.strip():
            yield "resume", "must be 'auto', 'never' or a checkpoint path, got ''."
        if len(set(self.trackers)) != len(self.trackers) or not all(self.trackers):
            yield "trackers", f"must name each tracker once, got {self.trackers}."


@_section
class LoraSection:
    """LoRA adapter settings (PEFT ``LoraConfig``)."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the linear layers that get adapters."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classification head)."""

    def problems(self) -> Iterator[Problem]:
        yield from _check_range(self, "r", low=1)
        yield from _check_range(self, "alpha", low=1)
        yield from _check_range(self, "dropout", low=0, high=1, open_high=True)
        yield from _check_not_empty_list(self, "target_modules", "name the layers, e.g. [q_proj, v_proj]")
        yield from _check_not_empty_list(self, "modules_to_save", "use null for none")


@_section
class FinetuneSection:
    """The fine-tuning stage: LoRA on a base model, on domain data."""

    enabled: bool = True
    """Run this stage."""
    base: str | None = None
    """Model to adapt: a local folder or Hub id of any causal LM (None: the pretrain output, else model.path)."""
    task: Literal["causal_lm", "instruction", "classification"] = "causal_lm"
    """What to train: next-token prediction, prompt -> response, or sequence classification."""
    data: DataSection | None = None
    """Fine-tuning data (None: the top-level data section)."""
    prompt_template: str | None = None
    """Python format string over a row's columns. instruction: the training prompt (None: the chat template); causal_lm: the prompt of the generation evaluation (e.g. "{code} " -> title)."""
    label_column: str = "label"
    """Column with the class label (task classification)."""
    num_labels: int | None = None
    """Number of classes (task classification; None: read from the data)."""
    lora: LoraSection = field(default_factory=LoraSection)
    """The adapter."""
    train: TrainSection = field(default_factory=TrainSection)
    """The training loop settings of this stage."""
    merge: bool = False
    """Also save the base with the adapter merged in (merged in float32, then cast)."""

    def problems(self) -> Iterator[Problem]:
        if self.num_labels is not None:
            if self.task != "classification":
                yield "num_labels", f"is only used by task 'classification' (task is {self.task!r}). Fix: remove it."
            yield from _check_range(self, "num_labels", low=2)
        if self.prompt_template is not None and self.task == "classification":
            yield "prompt_template", (
                "is used by the 'instruction' task (training prompts) and by 'causal_lm' (prompts of the generation "
                "evaluation), not by 'classification'. Fix: remove it."
            )
        if not self.label_column:
            yield "label_column", "must not be empty."


@_section
class GenerationSection:
    """Sample generations shown in the evaluation report."""

    prompts: list[str] = field(default_factory=list)
    """Prompts to complete."""
    max_new_tokens: int = 40
    """Tokens generated per prompt."""
    do_sample: bool = False
    """Sample (True) or decode greedily (False)."""
    temperature: float = 1.0
    """Sampling temperature (do_sample only)."""
    top_k: int | None = None
    """Sample from the k most likely tokens (do_sample only)."""
    top_p: float | None = None
    """Nucleus sampling probability mass in (0, 1] (do_sample only)."""
    num_return_sequences: int = 1
    """Completions per prompt (more than 1 needs do_sample)."""

    def problems(self) -> Iterator[Problem]:
        yield from _check_range(self, "max_new_tokens", low=1)
        if self.do_sample:
            yield from _check_range(self, "temperature", low=0, open_low=True, fix="do_sample: false decodes greedily")
        yield from _check_range(self, "top_k", low=1)
        yield from _check_range(self, "top_p", low=0, high=1, open_low=True)
        yield from _check_range(self, "num_return_sequences", low=1)
        if self.num_return_sequences > 1 and not self.do_sample:
            yield "num_return_sequences", (
                f"is {self.num_return_sequences} but greedy decoding returns one completion. Fix: set "
                "do_sample: true or num_return_sequences: 1."
            )


@_section
class EvaluateSection:
    """The evaluation stage: the base and the tuned model on general and domain text."""

    enabled: bool = True
    """Run this stage."""
    general: list[SourceSection] | None = None
    """General-text sources (None: the validation split of the pretraining data)."""
    domain: list[SourceSection] | None = None
    """Domain-text sources (None: the validation split of the fine-tuning data)."""
    max_documents: int | None = 200
    """Documents per evaluation set (None: all)."""
    batch_size: int = 8
    """Sequences per evaluation batch."""
    few_shot: int = 0
    """Solved training examples placed before each held-out prompt of the generation task (in-context evaluation)."""
    tasks: list[Literal["perplexity", "classification", "generation"]] = field(default_factory=lambda: ["perplexity"])
    """What to measure."""
    generation: GenerationSection = field(default_factory=GenerationSection)
    """Settings of the generation task."""

    def problems(self) -> Iterator[Problem]:
        yield from _check_not_empty_list(self, "general", "leave the key out to use the pretraining data")
        yield from _check_not_empty_list(self, "domain", "leave the key out to use the fine-tuning data")
        yield from _check_range(self, "max_documents", low=1)
        yield from _check_range(self, "batch_size", low=1)
        yield from _check_range(self, "few_shot", low=0)
        if self.enabled and not self.tasks:
            yield "tasks", "must list at least one task, e.g. [perplexity]. Fix: add one, or set enabled: false."
        if len(set(self.tasks)) != len(self.tasks):
            yield "tasks", f"lists a task twice: {self.tasks}."


@_section
class HubSection:
    """Pushing the results to the Hugging Face Hub."""

    push: bool = False
    """Upload the final model, tokenizer, card and recipe."""
    repo_id: str | None = None
    """Target repository ``owner/name`` (required to push)."""
    private: bool = False
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push to (None: main)."""
    create_pr: bool = False
    """Open a pull request instead of committing to the branch."""
    token: str | None = field(default=None, metadata=_SECRET)
    """Access token (None: HF_TOKEN or the cached login). Never written to dumped recipes."""
    commit_message: str = "Upload with pipeline"
    """Message of the upload commit."""

    def problems(self) -> Iterator[Problem]:
        if self.push and not self.repo_id:
            yield "repo_id", "is required when push is true. Fix: set repo_id: your-name/model-name, or push: false."
        if self.repo_id:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.repo_id)
            except HFValidationError as error:
                yield "repo_id", f"{self.repo_id!r} is not a valid Hub repo id: {error} Fix: use 'owner/name'."
        if not self.commit_message.strip():
            yield "commit_message", "must not be empty."


@_section
class Recipe:
    """Everything one pipeline run builds: tokenizer -> pretrain -> finetune -> evaluate -> hub."""

    output_dir: Path
    """Folder that receives every stage's artefacts (relative to the current directory)."""
    seed: int = 42
    """Seed of every random choice (init, data order, splits, sampling)."""
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    """The tokenizer stage."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model architecture, or an existing model."""
    data: DataSection
    """The pretraining data."""
    pretrain: TrainSection = field(default_factory=TrainSection)
    """The pretraining stage."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    """The LoRA fine-tuning stage."""
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    """The evaluation stage."""
    hub: HubSection = field(default_factory=HubSection)
    """The push to the Hub."""


# ------------------------------------------------------------------------------------------ public API


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``KEY.SUB=VALUE`` overrides and return it validated and resolved.

    Raises `RecipeError` listing every problem (a missing file, invalid YAML, wrong types or values, missing data
    files) before anything is created on disk.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        problem = f"recipe file not found (relative paths start at the current directory {Path.cwd()}). Fix: check the path."
        raise RecipeError([("", problem)], source=str(path))
    try:
        with path.open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        raise RecipeError([("", f"is not valid YAML: {error}")], source=str(path)) from None
    return _build(data, overrides, source=str(path))


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Like `load_recipe`, for a recipe already parsed into a mapping (e.g. `recipe_to_dict` output)."""
    return _build(data, overrides, source=None)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Convert ``data`` to ``cls`` (a section dataclass), type-checking every field and running its checks.

    ``path`` prefixes the key paths in error messages. Cross-section defaults are not resolved: use
    `recipe_from_dict` for a whole recipe.
    """
    problems: list[Problem] = []
    value = _convert(cls, data, path, problems)
    if problems:
        raise RecipeError(problems)
    return value


def recipe_to_dict(recipe: Any, *, secrets: bool = False) -> dict[str, Any]:
    """The resolved recipe (or a section) as plain YAML/JSON data; paths become strings.

    Secrets (``hub.token``) come out as None unless ``secrets=True``, so printed and dumped recipes never leak them.
    """
    return _to_plain(recipe, for_hash=False, secrets=secrets)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (without secrets) to ``path``, atomically; it loads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)
    header = "# Resolved recipe (every default filled in). Re-run it with: pipeline run <this file>\n"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(header + body, encoding="utf-8")
    os.replace(partial, path)  # readers never see half a file


def section_hash(recipe: Recipe, *sections: str) -> str:
    """sha256 of the named resolved sections (dotted paths such as ``"finetune.lora"``; none: the whole recipe).

    A stage stores it with its artefact and skips itself on a rerun when it matches. Knobs that cannot change
    the artefact (logging and checkpoint cadence, trackers, resume, num_proc, the token) are left out. Include
    ``"seed"`` for stages whose result depends on it.
    """
    resolved = _to_plain(recipe, for_hash=True, secrets=False)
    payload = {name: _lookup(resolved, name) for name in sections} if sections else resolved
    blob = json.dumps({"version": _HASH_VERSION, "sections": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_HASH_VERSION = 1  # bump when the meaning of a hashed field changes, so old artefacts are rebuilt


# ------------------------------------------------------------------------------------------ building


def _build(data: Any, overrides: Sequence[str], source: str | None) -> Recipe:
    if data is None:
        raise RecipeError([("", "is empty. Fix: give at least output_dir and data.sources.")], source)
    if not isinstance(data, Mapping):
        raise RecipeError([("", f"must be a mapping of sections, got {_describe(data)}.")], source)
    raw = copy.deepcopy(dict(data))
    problems: list[Problem] = []
    for override in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(raw, override, problems)
    recipe = _convert(Recipe, raw, "", problems)
    if recipe is not _INVALID:
        _resolve(recipe)
        problems += _cross_section_problems(recipe)
        problems += _environment_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _resolve(recipe: Recipe) -> None:
    """Fill the defaults that refer to other sections and make local paths absolute. Idempotent."""
    recipe.output_dir = _absolute(recipe.output_dir)
    if recipe.tokenizer.path is None and recipe.tokenizer.sources is None:
        recipe.tokenizer.sources = copy.deepcopy(recipe.data.sources)
    finetune = recipe.finetune
    if finetune.enabled and finetune.data is None:
        finetune.data = copy.deepcopy(recipe.data)
    if finetune.enabled and finetune.base is None and not recipe.pretrain.enabled:
        finetune.base = recipe.model.path
    for section, name in ((recipe.tokenizer, "path"), (recipe.model, "path"), (finetune, "base")):
        location = getattr(section, name)
        if location is not None and Path(location).expanduser().exists():
            setattr(section, name, str(_absolute(location)))
    for train in (recipe.pretrain, finetune.train):
        if train.resume not in ("auto", "never"):
            train.resume = str(_absolute(train.resume))
    for _, source in _all_sources(recipe):
        source.name = _resolve_source_name(source.name)


def _cross_section_problems(recipe: Recipe) -> Iterator[Problem]:
    yield from _check_range(recipe, "seed", low=0, high=2**32 - 1)
    model, finetune = recipe.model, recipe.finetune
    if model.attn_implementation == "flash_attention_2":
        for key, train in (("pretrain", recipe.pretrain), ("finetune.train", finetune.train)):
            if train.enabled and train.mixed_precision == "no":
                yield f"{key}.mixed_precision", (
                    "is 'no' but flash_attention_2 runs only in bf16/fp16. Fix: set mixed_precision: bf16, or use sdpa."
                )
        for key, data, train in (("data", recipe.data, recipe.pretrain), ("finetune.data", finetune.data, finetune.train)):
            if data is not None and data.document_masking and train.batch_size > 1:
                yield f"{key}.document_masking", (
                    "with flash_attention_2 separates packed documents only at batch_size 1 (transformers reads "
                    "document starts from position_ids for a single row). Fix: use sdpa, or batch_size: 1."
                )
    if model.path is None:  # our own model: its position table limits the sequence length
        limit = model.max_position_embeddings
        blocks = [("data.block_size", recipe.data.block_size)]
        if finetune.enabled and finetune.base is None and finetune.data is not None:
            blocks.append(("finetune.data.block_size", finetune.data.block_size))
        for key, size in blocks:
            if size > limit:
                yield key, (
                    f"({size}) exceeds model.max_position_embeddings ({limit}). Fix: lower {key} or raise "
                    "model.max_position_embeddings."
                )
    if finetune.enabled and finetune.base is None and not recipe.pretrain.enabled:
        yield "finetune.base", (
            "is not set and there is nothing to fine-tune (pretrain is disabled and model.path is empty). Fix: set "
            "finetune.base to a model folder or Hub id, set model.path, enable pretrain, or set finetune.enabled: false."
        )
    if recipe.evaluate.enabled and not (recipe.pretrain.enabled or finetune.enabled or model.path):
        yield "evaluate.enabled", (
            "is true but no model is trained or given. Fix: set model.path, enable pretrain or finetune, or set "
            "evaluate.enabled: false."
        )


def _environment_problems(recipe: Recipe) -> Iterator[Problem]:
    """What depends on this machine: files, Hub ids, installed trackers. Nothing is loaded or downloaded."""
    if recipe.output_dir.exists() and not recipe.output_dir.is_dir():
        yield "output_dir", f"{str(recipe.output_dir)!r} is a file. Fix: point output_dir at a folder."
    from pipeline.sources import SourceSpec, validate_source

    spec_fields = {f.name for f in dataclasses.fields(SourceSpec)}
    checked = set()
    for key, source in _all_sources(recipe):
        spec = {k: v for k, v in _to_plain(source, for_hash=False, secrets=False).items() if k in spec_fields}
        fingerprint = json.dumps(spec, sort_keys=True)
        if not source.name.strip() or fingerprint in checked:
            continue  # already reported (copies of data.sources, e.g. in tokenizer.sources, report once)
        checked.add(fingerprint)
        try:
            validate_source(spec)
        except (ValueError, FileNotFoundError) as error:
            yield f"{key}.name", str(error)
    for key, location in (("tokenizer.path", recipe.tokenizer.path), ("model.path", recipe.model.path),
                          ("finetune.base", recipe.finetune.base)):
        if location is not None:
            yield from _check_model_location(key, location)
    finetune = recipe.finetune
    for key, train, runs in (("pretrain", recipe.pretrain, recipe.pretrain.enabled),
                             ("finetune.train", finetune.train, finetune.enabled and finetune.train.enabled)):
        if not runs:
            continue
        if train.resume not in ("auto", "never") and not Path(train.resume).exists():
            yield f"{key}.resume", (
                f"checkpoint {train.resume!r} does not exist. Fix: use 'auto', 'never' or an existing checkpoint folder."
            )
        yield from _check_trackers(f"{key}.trackers", train.trackers)


def _all_sources(recipe: Recipe) -> Iterator[tuple[str, SourceSection]]:
    lists = [("data.sources", recipe.data.sources), ("tokenizer.sources", recipe.tokenizer.sources),
             ("evaluate.general", recipe.evaluate.general), ("evaluate.domain", recipe.evaluate.domain)]
    if recipe.finetune.data is not None:
        lists.append(("finetune.data.sources", recipe.finetune.data.sources))
    for key, sources in lists:
        for index, source in enumerate(sources or []):
            yield f"{key}[{index}]", source


def _resolve_source_name(name: str) -> str:
    """Existing local paths and globs become absolute; corpus names and Hub ids stay as they are."""
    from pipeline.sources import CORPORA

    if name in CORPORA or name.startswith("hub:"):
        return name
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded) or glob.has_magic(expanded):
        return os.path.abspath(expanded)
    return name


def _check_model_location(key: str, location: str) -> Iterator[Problem]:
    """A tokenizer/model is an existing local folder or a Hub id; anything else is a typo'd path."""
    if Path(location).expanduser().exists():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(location)
    except HFValidationError:
        yield key, (
            f"{location!r} is neither an existing local folder (working directory {Path.cwd()}) nor a Hub repo id. "
            "Fix: check the path, or write the Hub id as 'owner/name'."
        )


def _check_trackers(key: str, trackers: list[str]) -> Iterator[Problem]:
    others = [t for t in trackers if t != "jsonl"]
    if not others:
        return
    import importlib.util

    from accelerate.utils import LoggerType  # only when a tracker beyond our own jsonl is asked for

    known = ["jsonl"] + [t.value for t in LoggerType]
    for index, tracker in enumerate(trackers):
        if tracker not in known:
            yield f"{key}[{index}]", f"expected one of {_choices(known)}, got {tracker!r}.{_suggest(tracker, known)}"
        elif tracker != "all" and tracker in others and importlib.util.find_spec(tracker) is None:
            yield f"{key}[{index}]", f"tracker {tracker!r} is not installed. Fix: pip install {tracker}, or remove it."


# ------------------------------------------------------------------------------------------ overrides

_KEY_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")


def _apply_override(raw: dict[str, Any], override: str, problems: list[Problem]) -> None:
    """Set ``a.b[1].c=VALUE`` in the raw recipe; VALUE is YAML. The key is checked against the schema here."""
    key, equals, text = override.partition("=")
    key = key.strip()
    example = "Fix: write KEY=VALUE, e.g. pretrain.learning_rate=1e-3."
    if not equals or not key:
        problems.append((key, f"override {override!r} is not KEY=VALUE. {example}"))
        return
    steps: list[str | int] = []
    for part in key.split("."):
        match = _KEY_STEP.fullmatch(part)
        if not match:
            problems.append((key, f"override {override!r}: {part!r} is not a key. {example}"))
            return
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\d+", match.group(2))]
    try:
        value = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        problems.append((key, f"override value {text!r} is not valid YAML ({error}). Fix: quote it."))
        return

    tp, node, where = Recipe, raw, ""
    for n, step in enumerate(steps):
        tp = _unwrap_optional(tp)
        if isinstance(step, str):  # a key of a section (or of a dict field)
            if dataclasses.is_dataclass(tp):
                names = [f.name for f in dataclasses.fields(tp)]
                if step not in names:
                    suggestion = _suggest(step, names, list_all=True)
                    problems.append((_join(where, step), f"unknown key in override {override!r}.{suggestion}"))
                    return
                child_tp = _hints(tp)[step]
            elif get_origin(tp) is dict:
                child_tp = get_args(tp)[1]
            else:
                problems.append((where, f"override {override!r}: {where} is {_type_name(tp)}, it has no key {step!r}."))
                return
            child = node.get(step)
            where = _join(where, step)
        else:  # an index into a list field
            if get_origin(tp) is not list:
                problems.append((where, f"override {override!r}: {where} is {_type_name(tp)}, not a list."))
                return
            if step >= len(node):
                problems.append((f"{where}[{step}]", f"override {override!r}: index out of range, the recipe lists {len(node)} "
                                 f"entries. Fix: override the whole list, e.g. {where}=[...]."))
                return
            child_tp, child = get_args(tp)[0], node[step]
            where = f"{where}[{step}]"
        if n == len(steps) - 1:
            node[step] = value
            return
        wants_key = isinstance(steps[n + 1], str)
        if wants_key and child is None:
            child = node[step] = {}  # an absent or empty section: the override creates it
        if not isinstance(child, dict if wants_key else list):
            kind = "a section" if wants_key else "a list"
            problems.append((where, f"override {override!r}: the recipe sets {where} to {_describe(child)}, not {kind}."))
            return
        tp, node = child_tp, child


# ------------------------------------------------------------------------------------------ conversion

_INVALID = object()  # a value that failed conversion; its problem is already recorded


class _Mismatch(Exception):
    """A scalar of the wrong type; the message says what was found and the fix."""


def _convert(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """``value`` converted to the annotation ``tp``, or `_INVALID` after recording why not."""
    if get_origin(tp) in (Union, types.UnionType):
        if value is None:
            return None
        problems_before = len(problems)
        converted = _convert(_unwrap_optional(tp), value, path, problems)
        if converted is _INVALID and len(problems) == problems_before + 1 and problems[-1][0] == path:
            # Say that null is also fine: "expected a number or null, got ...".
            inner_name = _type_name(_unwrap_optional(tp))
            message = problems[-1][1].replace(f"expected {inner_name}", f"expected {_type_name(tp)}", 1)
            problems[-1] = (path, message)
        return converted
    if tp is Any:
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        return _convert_section(tp, value, path, problems)
    if value is None:
        fix = "Fix: give a value, or delete the key to use the default."
        problems.append((path, f"expected {_type_name(tp)}, got null. {fix}"))
        return _INVALID
    origin = get_origin(tp)
    if origin is Literal:
        return _convert_choice(get_args(tp), value, path, problems)
    if origin is list:
        return _convert_list(get_args(tp)[0], value, path, problems)
    if origin is dict:
        return _convert_dict(get_args(tp)[1], value, path, problems)
    try:
        return _SCALARS[tp](value)
    except _Mismatch as mismatch:
        problems.append((path, f"expected {_type_name(tp)}, got {_describe(value)}.{mismatch}"))
        return _INVALID


def _convert_section(cls: type, value: Any, path: str, problems: list[Problem]) -> Any:
    if value is None:
        value = {}  # `section:` with every line commented out means "all defaults"
    if not isinstance(value, Mapping):
        problems.append((path, f"expected a mapping of {cls.__name__} keys, got {_describe(value)}."))
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs, ok = {}, True
    for key in value:
        if key not in fields:  # reported; the section is still built so that its other checks run
            problems.append((_join(path, str(key)), f"unknown key.{_suggest(str(key), fields, list_all=True)}"))
    for name, f in fields.items():
        if name in value:
            converted = _convert(hints[name], value[name], _join(path, name), problems)
            ok = ok and converted is not _INVALID
            kwargs[name] = converted
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((_join(path, name), f"is required ({_type_name(hints[name])}) but missing. Fix: add it."))
            ok = False
    if not ok:
        return _INVALID
    section = cls(**kwargs)
    problems.extend((_join(path, key), message) for key, message in getattr(section, "problems", lambda: ())())
    return section


def _convert_choice(options: tuple[Any, ...], value: Any, path: str, problems: list[Problem]) -> Any:
    if isinstance(value, bool):  # YAML 1.1 read an unquoted yes/no/on/off/true/false
        words = [o for o in options if isinstance(o, str) and o.lower() in _BOOL_WORDS[value]]
        if len(words) == 1:
            return words[0]
    elif value in options and any(type(value) is type(o) for o in options):
        return value
    hint = ""
    if isinstance(value, bool):
        hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans). Fix: write one of them, quoted if it is such a word"
    problems.append((path, f"expected one of {_choices(options)}, got {_describe(value)}{hint}.{_suggest(str(value), options)}"))
    return _INVALID


def _convert_list(item_tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, (list, tuple)):
        example = f" Fix: write a list, e.g. [{value}]." if isinstance(value, (str, int, float)) else ""
        problems.append((path, f"expected a list of {_type_name(item_tp, plural=True)}, got {_describe(value)}.{example}"))
        return _INVALID
    items = [_convert(item_tp, item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    return _INVALID if any(item is _INVALID for item in items) else items


def _convert_dict(value_tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append((path, f"expected a mapping, got {_describe(value)}."))
        return _INVALID
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            problems.append((path, f"keys must be strings, got {_describe(key)}. Fix: quote the key."))
            return _INVALID
        out[key] = _convert(value_tp, item, _join(path, key), problems)
    return _INVALID if any(item is _INVALID for item in out.values()) else out


_NUMERIC = re.compile(r"[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?")
_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL_WORDS[True] + _BOOL_WORDS[False]:
        raise _Mismatch(" Fix: remove the quotes.")
    raise _Mismatch(" Fix: write true or false.")


def _to_int(value: Any) -> int:
    number = _number(value, " Fix: write a whole number, e.g. 100.")
    if isinstance(number, int):
        return number
    if math.isfinite(number) and number.is_integer():  # max_steps: 1e5
        return int(number)
    raise _Mismatch(f" Fix: write a whole number, e.g. {math.floor(number) if math.isfinite(number) else 1}.")


def _to_float(value: Any) -> float:
    number = float(_number(value, " Fix: write a number (1e-4 style works)."))
    if not math.isfinite(number):
        raise _Mismatch(" Fix: write a finite number (use null where a field allows 'none').")
    return number


def _number(value: Any, fix: str) -> int | float:
    """An int or float from a YAML number or a numeric string (plain PyYAML leaves '1e-4' a string)."""
    if isinstance(value, bool):
        raise _Mismatch(fix)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            return float(text)
    raise _Mismatch(fix)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise _Mismatch(" YAML reads unquoted yes/no/on/off/true/false as booleans. Fix: put the value in quotes.")
    raise _Mismatch(" Fix: put the value in quotes (quotes also keep leading zeros, e.g. '0123').")


def _to_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value.expanduser()
    if isinstance(value, str) and value.strip():
        return Path(value).expanduser()
    raise _Mismatch(" Fix: write a path, e.g. runs/my-model.")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path}


# ------------------------------------------------------------------------------------------ helpers


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; other annotations unchanged. Only ``X | None`` unions are supported."""
    if get_origin(tp) not in (Union, types.UnionType):
        return tp
    arms = [arm for arm in get_args(tp) if arm is not type(None)]
    if len(arms) != 1:
        raise TypeError(f"recipe fields support only `X | None` unions, got {tp}")
    return arms[0]


def _type_name(tp: Any, plural: bool = False) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return f"{_type_name(_unwrap_optional(tp), plural)} or null"
    if origin is Literal:
        return f"one of {_choices(get_args(tp))}"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0], plural=True)}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mappings" if plural else "a mapping"
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), Path: ("a path", "paths")}
    return names[tp][plural] if tp in names else str(tp)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list ({len(value)} items)"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


# Names from transformers' TrainingArguments and PEFT that users type out of habit.
_ALIASES = {
    "lr": "learning_rate", "num_train_epochs": "num_epochs", "epochs": "num_epochs",
    "per_device_train_batch_size": "batch_size", "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_every", "eval_steps": "eval_every", "save_steps": "save_every",
    "save_total_limit": "keep_last", "resume_from_checkpoint": "resume", "report_to": "trackers",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "bf16": "mixed_precision", "fp16": "mixed_precision",
    "max_seq_length": "block_size", "seq_len": "block_size", "context_length": "block_size",
    "model_name_or_path": "path", "dataset_name": "name",
}


def _suggest(word: str, options: Any, list_all: bool = False) -> str:
    """' Did you mean 'x'?' (typos and common aliases), else the valid options when ``list_all``."""
    options = [str(o) for o in options]
    close = [_ALIASES[word]] if _ALIASES.get(word) in options else difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f" Did you mean {close[0]!r}?"
    return f" Valid keys: {', '.join(options)}." if list_all else ""


def _choices(options: Sequence[Any]) -> str:
    return ", ".join(repr(o) for o in options)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _absolute(path: str | Path) -> Path:
    # absolute() rather than resolve(): keep the symlinks the user chose in their paths.
    return Path(os.path.abspath(Path(path).expanduser()))


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


def _check_range(section: Any, name: str, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False, fix: str = "") -> Iterator[Problem]:
    """A problem when field ``name`` (None is fine) is outside [low, high]; ``open_*`` exclude the bound."""
    value = getattr(section, name)
    if value is None:
        return
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if not (too_low or too_high):
        return
    if low is not None and high is not None:
        want = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        want = f"{'>' if open_low else '>='} {low}"
    else:
        want = f"{'<' if open_high else '<='} {high}"
    yield name, f"must be {want}, got {value!r}." + (f" Fix: {fix}." if fix else "")


def _check_not_empty_list(section: Any, name: str, fix: str) -> Iterator[Problem]:
    value = getattr(section, name)
    if value is not None and (not value or any(isinstance(v, str) and not v for v in value)):
        yield name, f"must not be empty or hold empty names, got {value!r}. Fix: {fix}."


def _lookup(resolved: dict[str, Any], dotted: str) -> Any:
    node: Any = resolved
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or key not in node:
            options = list(node) if isinstance(node, dict) else []
            where = ".".join(dotted.split(".")[:i]) or "the recipe"
            raise ValueError(f"section_hash: {where} has no {key!r}.{_suggest(key, options, list_all=True)}")
        node = node[key]
    return node


def _to_plain(value: Any, *, for_hash: bool, secrets: bool) -> Any:
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            if for_hash and not f.metadata.get("hash", True):
                continue
            item = getattr(value, f.name)
            hidden = f.metadata.get("secret") and not secrets
            out[f.name] = None if hidden else _to_plain(item, for_hash=for_hash, secrets=secrets)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, for_hash=for_hash, secrets=secrets) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, for_hash=for_hash, secrets=secrets) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------ YAML

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2 core schema numbers (plus `_` between digits, as YAML 1.1 and Python allow).
_YAML_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Dropped YAML 1.1 implicit types: its int/float (octal 042, base-60 1:30, no 1e-4), dates, and `=`.
_DROPPED_TAGS = {_INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}


def _yaml12_numbers(cls: type) -> type:
    """Give a PyYAML loader or dumper the recipe's number rules; the dumper needs them to quote '1e-4' strings."""
    cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_INT_TAG, _YAML_INT, list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT_TAG, _YAML_FLOAT, list("-+0123456789."))
    return cls


@_yaml12_numbers
class _RecipeLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}: YAML would silently keep only the last value; "
                        "remove one", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0x": 16, "0o": 8}.get(digits[:2].lower())
    try:
        return sign * (int(digits[2:], base) if base else int(digits, 10))  # 042 is 42, as in YAML 1.2
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"invalid integer {text!r}", node.start_mark) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_RecipeLoader.add_constructor(_INT_TAG, _construct_int)
_RecipeLoader.add_constructor(_FLOAT_TAG, _construct_float)


@_yaml12_numbers
class _RecipeDumper(yaml.SafeDumper):
    pass
