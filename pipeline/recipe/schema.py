"""The recipe's sections as pydantic models: each knob is documented where it is declared.

Field docstrings are the documentation (they become the JSON-schema descriptions). Ranges are field constraints;
rules between fields of one section are its ``problems()``, run by one model validator. The scalar types below
implement the recipe's lenient-but-not-sloppy conversions (see the package docstring); the error wording lives in
`pipeline.recipe.loader`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Problem = tuple[str, str]  # (key path, what is wrong and how to fix it)


@dataclass(frozen=True)
class Meta:
    """Recipe-only field metadata (an ``Annotated`` marker; pydantic keeps it in ``FieldInfo.metadata``)."""

    hash: bool = True  # False: cannot change what a stage produces, so `section_hash` leaves it out (no rerun)
    hash_when_set: bool = False  # a later addition: hashed only when not None, so finished stages stay current
    secret: bool = False  # left out of `recipe_to_dict` (and so of dumped recipes) unless asked for
    fix: str = ""  # the advice given when the value is out of range


NO_HASH, SECRET = Meta(hash=False), Meta(hash=False, secret=True)

# ------------------------------------------------------------------------------------------ scalars

_NUMERIC = re.compile(r"[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?")
_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _wrong(fix: str) -> PydanticCustomError:
    """A value of the wrong type; ``fix`` says how to write it (the loader adds what was expected and found)."""
    return PydanticCustomError("recipe_type", "wrong type.{fix}", {"fix": fix})


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    quoted = isinstance(value, str) and value.lower() in _BOOL_WORDS[True] + _BOOL_WORDS[False]
    raise _wrong(" Fix: remove the quotes." if quoted else " Fix: write true or false.")


def _number(value: Any, fix: str) -> int | float:
    """An int or float from a YAML number or a numeric string (plain PyYAML leaves '1e-4' a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    raise _wrong(fix)


def _to_int(value: Any) -> int:
    number = _number(value, " Fix: write a whole number, e.g. 100.")
    if isinstance(number, int):
        return number
    if math.isfinite(number) and number.is_integer():  # max_steps: 1e5
        return int(number)
    raise _wrong(f" Fix: write a whole number, e.g. {math.floor(number) if math.isfinite(number) else 1}.")


def _to_float(value: Any) -> float:
    number = float(_number(value, " Fix: write a number (1e-4 style works)."))
    if not math.isfinite(number):
        raise _wrong(" Fix: write a finite number (use null where a field allows 'none').")
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise _wrong(" YAML reads unquoted yes/no/on/off/true/false as booleans. Fix: put the value in quotes.")
    raise _wrong(" Fix: put the value in quotes (quotes also keep leading zeros, e.g. '0123').")


def _to_path(value: Any) -> Path:
    if isinstance(value, (str, Path)) and str(value).strip():
        return Path(value).expanduser()
    raise _wrong(" Fix: write a path, e.g. runs/my-model.")


def _bool_as_word(value: Any, handler: Any) -> Any:
    """A choice with a ``"no"`` option reads YAML 1.1's unquoted ``no`` (the boolean false) as that word."""
    for word in _BOOL_WORDS[value] if isinstance(value, bool) else ():
        try:
            return handler(word)
        except ValidationError:
            pass
    return handler(value)


# Constraints go before the converter, so that pydantic applies them to the converted value (and publishes them).
_BOOL, _INT, _FLOAT = BeforeValidator(_to_bool), BeforeValidator(_to_int), BeforeValidator(_to_float)
_STR, _PATH = BeforeValidator(_to_str), BeforeValidator(_to_path)
Bool = Annotated[bool, _BOOL]
Int = Annotated[int, _INT]
Count = Annotated[int, Field(ge=1), _INT]
NonNegInt = Annotated[int, Field(ge=0), _INT]
Float = Annotated[float, _FLOAT]
Positive = Annotated[float, Field(gt=0), _FLOAT]
Probability = Annotated[float, Field(ge=0, lt=1), _FLOAT]  # dropout, Adam betas
Str = Annotated[str, _STR]
Name = Annotated[str, Field(min_length=1), _STR]
PathValue = Annotated[Path, _PATH]

# ------------------------------------------------------------------------------------------ sections


class Section(BaseModel):
    """A recipe section: unknown keys are errors, ``key:`` with every line commented out means all defaults."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _none_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Section:
        problems = [] if (info.context or {}).get("skip_section_rules") else list(self.problems())
        if problems:  # the loader lists each one under its own key path
            raise PydanticCustomError("recipe_problems", "{problems}", {"problems": problems})
        return self

    def problems(self) -> Iterator[Problem]:
        """The rules between this section's fields, as (key, message) pairs; run once every field is valid."""
        return iter(())


class SourceSection(Section):
    """One text source (see `pipeline.sources`): a built-in corpus, local files or a Hub dataset."""

    name: Annotated[Name, Meta(fix="give a built-in corpus, a local path or a Hub dataset id")]
    """A built-in corpus (``icd10cm``, ``shakespeare``), a file / directory / glob, or a Hub id ``owner/name``."""
    weight: Positive = 1.0
    """Relative weight of this source when the sources are mixed (> 0)."""
    split: Str = "train"
    """Split to read (local files accept slices such as ``train[:10%]``)."""
    text_column: Annotated[Name, Meta(fix="name the column that holds the text (default 'text')")] = "text"
    """Column that holds the text."""
    subset: Str | None = None
    """Hub dataset configuration (the ``name`` argument of `datasets.load_dataset`)."""
    max_documents: Count | None = None
    """Read at most this many documents from this source (None: all)."""
    sample_by: Literal["paragraph", "document", "line"] = "paragraph"
    """How a local .txt file is cut into documents."""
    # Not in section_hash (digests stay as they were): every stage marker's data fingerprint records it instead.
    revision: Annotated[Str | None, NO_HASH] = None
    """Hub dataset revision to read: a branch, tag or commit sha (None: the latest). Pin a commit so that a rerun knows the data is unchanged; stage markers record an unpinned source as "unpinned"."""


Sources = Annotated[list[SourceSection], Field(min_length=1)]  # None, not [], means "the default sources"


class TokenizerSection(Section):
    """The tokenizer stage: train a byte-level BPE tokenizer, or reuse an existing one."""

    path: Str | None = None
    """An existing tokenizer (local folder or Hub id): training is skipped."""
    vocab_size: Int = 4096
    """Size of the trained vocabulary, special tokens included (more than 256)."""
    min_frequency: Count = 2
    """A pair must occur this often to be merged."""
    sources: Annotated[Sources | None, Meta(fix="leave the key out to train on data.sources")] = None
    """Text to train on (None: ``data.sources``)."""
    max_documents: Count | None = None
    """Read at most this many documents from each source (None: data.max_documents); the documents held out by data and finetune.data are never trained on."""

    def problems(self) -> Iterator[Problem]:
        if self.vocab_size <= 256:
            yield "vocab_size", (
                f"must be more than 256, got {self.vocab_size}: byte-level BPE starts from 256 byte symbols plus "
                "special tokens. Fix: use e.g. 4096."
            )


class ModelSection(Section):
    """The model: a Quill built from these hyper-parameters, or an existing causal LM."""

    path: Str | None = None
    """An existing model (local folder or Hub id): no from-scratch init; pretrain continues training it or is disabled."""
    hidden_size: Count = 256
    """Width of the residual stream."""
    num_hidden_layers: Count = 4
    """Number of decoder blocks."""
    num_attention_heads: Count = 4
    """Query heads per block; must divide hidden_size."""
    num_key_value_heads: Count | None = None
    """Key/value heads for grouped-query attention; must divide num_attention_heads (None: one per query head)."""
    intermediate_size: Count | None = None
    """Width of the MLP (None: the model config's rule, about 8/3 of hidden_size)."""
    hidden_act: Str = "silu"
    """Activation of the MLP (silu gives SwiGLU)."""
    position_embedding_type: Literal["rope", "sinusoidal", "learned"] = "rope"
    """How positions enter: rotary, fixed sinusoidal, or a learned table."""
    max_position_embeddings: Count = 512
    """Longest sequence the positions are built for; data.block_size may not exceed it."""
    rope_theta: Positive = 10000.0
    """Base of the rotary frequencies."""
    rms_norm_eps: Positive = 1e-5
    """Epsilon of the RMSNorm layers."""
    dropout: Probability = 0.0
    """Dropout probability of embeddings, attention and residual branches."""
    tie_word_embeddings: Bool = True
    """Share the input embedding matrix with lm_head."""
    initializer_range: Positive = 0.02
    """Standard deviation of the normal weight initialisation."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel (transformers' ``attn_implementation``)."""

    def problems(self) -> Iterator[Problem]:
        heads, kv_heads, width = self.num_attention_heads, self.num_key_value_heads, self.hidden_size
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
        if kv_heads is not None and heads % kv_heads:
            yield "num_key_value_heads", (
                f"must divide num_attention_heads ({heads}), got {kv_heads}. Fix: pick a divisor of {heads}, e.g. "
                f"{_nearest_divisor(heads, kv_heads)} (1 = multi-query attention)."
            )
        if self.position_embedding_type == "sinusoidal" and width % 2:
            yield "hidden_size", f"must be even for sinusoidal positions, got {width}."
        from pipeline.models.quill.configuration_quill import HIDDEN_ACTS  # imports transformers: only here

        if self.hidden_act not in HIDDEN_ACTS:
            suggestion = suggest(self.hidden_act, HIDDEN_ACTS)
            yield "hidden_act", f"expected one of {choices(HIDDEN_ACTS)}, got {self.hidden_act!r}.{suggestion}"
        if self.attn_implementation == "flex_attention" and self.dropout > 0:
            yield "dropout", "must be 0 with flex_attention (transformers' flex path has no attention dropout). Fix: use sdpa."


class DataSection(Section):
    """Where the training text comes from and how it becomes fixed-length blocks."""

    sources: list[SourceSection]
    """The sources to mix (at least one)."""
    validation_fraction: Float = Field(0.05, gt=0, lt=1)
    """Share of the documents held out for validation, in (0, 1)."""
    block_size: Int = Field(256, ge=2)
    """Tokens per training sequence."""
    packing: Bool = True
    """Concatenate documents into full blocks (False: one document per sequence, padded)."""
    document_masking: Bool = False
    """In packed blocks, stop attention at document boundaries."""
    streaming: Bool = False
    """Stream the sources instead of loading them into memory."""
    num_proc: Annotated[Count, NO_HASH] = 1
    """Processes for tokenisation (`datasets.map`)."""
    max_documents: Count | None = None
    """Use at most this many documents in total (None: all)."""
    validation_documents: Count | None = None
    """Hold out exactly this many documents per source instead of validation_fraction (needed when streaming a
    source of unknown size)."""

    def problems(self) -> Iterator[Problem]:
        if not self.sources:
            yield "sources", "must list at least one source. Fix: e.g. sources: [{name: icd10cm}]."
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


class TrainSection(Section):
    """One run of the shared training loop (pretraining, or the fine-tuning's own copy)."""

    max_steps: Count = 1000
    """Optimizer steps to train for."""
    num_epochs: Count | None = None
    """Also stop after this many passes over the data, whichever comes first (None: max_steps alone)."""
    max_time: Annotated[Positive | None, Meta(hash_when_set=True, fix="give seconds, e.g. 300 for five minutes")] = None
    """Also stop after this many seconds of the training loop (evaluations and checkpoints included, resumed runs counted together), whichever comes first; the learning-rate schedule then decays to the end of this budget, re-estimated from the measured pace, instead of to max_steps (None: no time limit)."""
    batch_size: Count = 8
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: Count = 1
    """Micro-batches per optimizer step."""
    learning_rate: Annotated[Positive, Meta(fix="typical values are 1e-4 to 1e-3")] = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: Float = Field(0.1, ge=0)
    """Decoupled weight decay."""
    adam_beta1: Probability = 0.9
    """AdamW beta1."""
    adam_beta2: Probability = 0.95
    """AdamW beta2."""
    adam_epsilon: Positive = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the learning-rate decay after warmup."""
    warmup_steps: NonNegInt = 100
    """Steps of linear warmup from 0 to learning_rate (at most max_steps)."""
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of learning_rate (cosine and linear)."""
    max_grad_norm: Annotated[Positive | None, Meta(fix="use null to disable clipping")] = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"], WrapValidator(_bool_as_word)] = "no"
    """Autocast precision (Accelerate's ``mixed_precision``)."""
    compile: Bool = False
    """torch.compile the model."""
    gradient_checkpointing: Bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_every: Annotated[Count, NO_HASH] = 200
    """Evaluate on the validation split every this many steps."""
    eval_batches: Annotated[Count | None, NO_HASH] = 20
    """Validation batches per evaluation (None: the whole split)."""
    log_every: Annotated[Count, NO_HASH] = 10
    """Log the training loss every this many steps."""
    save_every: Annotated[Count, NO_HASH] = 500
    """Save a resumable checkpoint every this many steps."""
    keep_last: Annotated[NonNegInt, NO_HASH] = 2
    """Checkpoints kept on disk, older ones are deleted (0: keep them all)."""
    resume: Annotated[Name, Meta(hash=False, fix="use 'auto', 'never' or a checkpoint path")] = "auto"
    """``auto`` (from the latest checkpoint, if any), ``never``, or the path of a checkpoint."""
    on_damaged_checkpoint: Annotated[Literal["previous", "stop"], NO_HASH] = "previous"
    """What ``resume: auto`` does when the newest checkpoint fails its integrity check (a file changed, missing or truncated since it was written, or one that would run code when loaded): ``previous`` moves it aside to ``checkpoints/damaged-*`` and resumes from the newest sound one; ``stop`` refuses to start."""
    max_skipped_steps: Annotated[NonNegInt, NO_HASH] = 0
    """Optimizer steps with a non-finite loss or gradient norm that may be skipped (gradients dropped, no update) before the run stops with an error; 0: stop at the first one. fp16 loss-scaling skips are not counted."""
    trackers: Annotated[list[Name], NO_HASH] = Field(default_factory=lambda: ["jsonl"])
    """Where metrics go: ``jsonl`` plus any Accelerate tracker (``tensorboard``, ``wandb``, ...)."""

    def problems(self) -> Iterator[Problem]:
        if self.warmup_steps > self.max_steps:
            yield "warmup_steps", (
                f"({self.warmup_steps}) exceeds max_steps ({self.max_steps}): the learning rate would never reach its "
                f"peak. Fix: lower warmup_steps (e.g. {self.max_steps // 10}) or raise max_steps."
            )
        if len(set(self.trackers)) != len(self.trackers):
            yield "trackers", f"must name each tracker once, got {self.trackers}."


class PretrainSection(TrainSection):
    """The pretraining stage: the training loop on ``data``, from scratch or from ``model.path``."""

    enabled: Bool = True
    """Run this stage."""


class LoraSection(Section):
    """LoRA adapter settings (PEFT ``LoraConfig``)."""

    r: Count = 8
    """Rank of the update matrices."""
    alpha: Count = 16
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: Probability = 0.05
    """Dropout on the adapter input."""
    target_modules: Annotated[list[Name], Field(min_length=1), Meta(fix="name the layers, e.g. [q_proj, v_proj]")] = (
        Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    """Names of the linear layers that get adapters."""
    use_rslora: Bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: Bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: Annotated[list[Name] | None, Field(min_length=1), Meta(fix="use null for none")] = None
    """Modules trained in full and saved with the adapter (e.g. a classification head)."""


class FinetuneSection(Section):
    """The fine-tuning stage: LoRA on a base model, on domain data."""

    enabled: Bool = True
    """Run this stage."""
    base: Str | None = None
    """Model to adapt: a local folder or Hub id of any causal LM (None: the pretrain output, else model.path)."""
    task: Literal["causal_lm", "instruction", "classification"] = "causal_lm"
    """What to train: next-token prediction, prompt -> response, or sequence classification."""
    data: DataSection | None = None
    """Fine-tuning data (None: the top-level data section)."""
    prompt_template: Str | None = None
    """Python format string over a row's columns. instruction: the training prompt (None: the chat template); causal_lm: the prompt of the generation evaluation (e.g. "{code} " -> title). Trailing whitespace is the delimiter and goes with the response (" title"), as lm-evaluation-harness's target_delimiter does: a byte-level tokenizer would make it a lone token that running text never has."""
    label_column: Name = "label"
    """Column with the class label (task classification)."""
    num_labels: Annotated[int, Field(ge=2), _INT] | None = None
    """Number of classes (task classification; None: read from the data)."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """The adapter."""
    train: TrainSection = Field(default_factory=TrainSection)
    """The training loop settings of this stage."""
    merge: Bool = False
    """Also save the base with the adapter merged in (merged in float32, then cast)."""

    def problems(self) -> Iterator[Problem]:
        if self.num_labels is not None and self.task != "classification":
            yield "num_labels", f"is only used by task 'classification' (task is {self.task!r}). Fix: remove it."
        if self.prompt_template is not None and self.task == "classification":
            yield "prompt_template", (
                "is used by the 'instruction' task (training prompts) and by 'causal_lm' (prompts of the generation "
                "evaluation), not by 'classification'. Fix: remove it."
            )


class GenerationSection(Section):
    """Sample generations shown in the evaluation report."""

    prompts: list[Str] = Field(default_factory=list)
    """Prompts to complete."""
    max_new_tokens: Count = 40
    """Tokens generated per prompt."""
    do_sample: Bool = False
    """Sample (True) or decode greedily (False)."""
    temperature: Float = 1.0
    """Sampling temperature, > 0 (do_sample only)."""
    top_k: Count | None = None
    """Sample from the k most likely tokens (do_sample only)."""
    top_p: Annotated[float, Field(gt=0, le=1), _FLOAT] | None = None
    """Nucleus sampling probability mass in (0, 1] (do_sample only)."""
    num_return_sequences: Count = 1
    """Completions per prompt (more than 1 needs do_sample)."""

    def problems(self) -> Iterator[Problem]:
        if self.do_sample and self.temperature <= 0:  # greedy decoding ignores it
            yield "temperature", f"must be > 0, got {self.temperature!r}. Fix: do_sample: false decodes greedily."
        if self.num_return_sequences > 1 and not self.do_sample:
            yield "num_return_sequences", (
                f"is {self.num_return_sequences} but greedy decoding returns one completion. Fix: set "
                "do_sample: true or num_return_sequences: 1."
            )


class EvaluateSection(Section):
    """The evaluation stage: the base and the tuned model on general and domain text."""

    enabled: Bool = True
    """Run this stage."""
    general: Annotated[Sources | None, Meta(fix="leave the key out to use the pretraining data")] = None
    """General-text sources (None: the validation split of the pretraining data)."""
    domain: Annotated[Sources | None, Meta(fix="leave the key out to use the fine-tuning data")] = None
    """Domain-text sources (None: the validation split of the fine-tuning data)."""
    max_documents: Count | None = 200
    """Documents per evaluation set (None: all)."""
    batch_size: Count = 8
    """Sequences per evaluation batch."""
    few_shot: NonNegInt = 0
    """Solved training examples placed before each held-out prompt of the generation task (in-context evaluation)."""
    tasks: list[Literal["perplexity", "classification", "generation"]] = Field(default_factory=lambda: ["perplexity"])
    """What to measure."""
    generation: GenerationSection = Field(default_factory=GenerationSection)
    """Settings of the generation task."""

    def problems(self) -> Iterator[Problem]:
        if self.enabled and not self.tasks:
            yield "tasks", "must list at least one task, e.g. [perplexity]. Fix: add one, or set enabled: false."
        if len(set(self.tasks)) != len(self.tasks):
            yield "tasks", f"lists a task twice: {self.tasks}."


class HubSection(Section):
    """Pushing the results to the Hugging Face Hub."""

    push: Bool = False
    """Upload the final model, tokenizer, card and recipe."""
    repo_id: Str | None = None
    """Target repository ``owner/name`` (required to push)."""
    private: Bool = False
    """Create the repository as private."""
    revision: Str | None = None
    """Branch to push to (None: main)."""
    create_pr: Bool = False
    """Open a pull request instead of committing to the branch."""
    token: Annotated[Str | None, SECRET] = None
    """Access token (None: HF_TOKEN or the cached login). Never written to dumped recipes."""
    commit_message: Name = "Upload with pipeline"
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


STAGES = ("tokenizer", "pretrain", "finetune", "evaluate", "hub")


class Recipe(Section):
    """Everything one pipeline run builds: tokenizer -> pretrain -> finetune -> evaluate -> hub."""

    model_config = ConfigDict(title="pipeline recipe")

    output_dir: PathValue
    """Folder that receives every stage's artefacts (relative to the current directory)."""
    seed: Int = Field(42, ge=0, le=2**32 - 1)
    """Seed of every random choice (init, data order, splits, sampling)."""
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    """The tokenizer stage."""
    model: ModelSection = Field(default_factory=ModelSection)
    """The model architecture, or an existing model."""
    data: DataSection
    """The pretraining data."""
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    """The pretraining stage."""
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    """The LoRA fine-tuning stage."""
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    """The evaluation stage."""
    hub: HubSection = Field(default_factory=HubSection)
    """The push to the Hub."""

    def runs(self, stage: str) -> bool:
        """Whether the recipe switches ``stage`` on: the one answer to "is fine-tuning on?" and its siblings."""
        switches = {"tokenizer": True, "pretrain": self.pretrain.enabled, "finetune": self.finetune.enabled,
                    "evaluate": self.evaluate.enabled, "hub": self.hub.push}
        if stage not in switches:
            raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
        return switches[stage]


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe file, field docstrings as descriptions, for editors and CI."""
    import pydantic

    # The layout pydantic emits changes between its versions; the comment says which one wrote the file.
    comment = f"Generated by pipeline.recipe.recipe_json_schema() with pydantic {pydantic.VERSION}: do not edit."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$comment": comment, **Recipe.model_json_schema()}


# ------------------------------------------------------------------------------------------ wording helpers

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


def suggest(word: str, options: Any, list_all: bool = False) -> str:
    """' Did you mean 'x'?' (typos and common aliases), else the valid options when ``list_all``."""
    options = [str(o) for o in options]
    close = [_ALIASES[word]] if _ALIASES.get(word) in options else difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f" Did you mean {close[0]!r}?"
    return f" Valid keys: {', '.join(options)}." if list_all else ""


def choices(options: Sequence[Any]) -> str:
    return ", ".join(repr(o) for o in options)


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))
