"""Building and loading the models and tokenizers every stage and command shares.

    recipe.model ──quill_config──► QuillConfig ──build_model──► a fresh Quill (or model.path, to continue training)
    base folder / Hub id ──load_tokenizer, load_base──► fp32 causal LM or classifier
    base + finetune/adapter or finetune/merged ──load_tuned──► the tuned model
    adapter ──merge_adapter──► a plain `from_pretrained` folder

Trainable weights are always loaded in float32: mixed precision autocasts the compute, a bf16 master copy would
swallow small updates, and transformers 5 otherwise loads in the checkpoint's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, TaskType
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.models.quill import QuillConfig, QuillForCausalLM  # importing it registers Quill with the Auto classes

if TYPE_CHECKING:
    from pipeline.recipe import LoraSection, ModelSection

__all__ = ["DEFAULT_SPECIAL_TOKENS", "TASK_TYPES", "build_model", "check_lora_targets", "load_base", "load_tokenizer", "load_tuned", "lora_config",
           "lora_target_problems", "merge_adapter", "quill_config"]

TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "instruction": TaskType.CAUSAL_LM, "classification": TaskType.SEQ_CLS}
"""The PEFT task type of each fine-tuning task (``finetune.task``)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
}
"""The special tokens of the tokenizers the tokenizer stage trains (they take the first ids, in this order); here so
that the pre-flight checks can size the smallest vocabulary without importing a stage."""


def quill_config(section: ModelSection, vocab_size: int, **special_token_ids: int | None) -> QuillConfig:
    """The recipe's model section as a `QuillConfig`: the one mapping from recipe keys to config keys (the dry-run
    plan counts parameters with it too). ``special_token_ids``: ``bos_token_id`` etc., from the tokenizer."""
    return QuillConfig(
        vocab_size=vocab_size,
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers,
        num_attention_heads=section.num_attention_heads,
        num_key_value_heads=section.num_key_value_heads,
        hidden_act=section.hidden_act,
        position_embedding_type=section.position_embedding_type,
        max_position_embeddings=section.max_position_embeddings,
        rope_theta=section.rope_theta,
        rms_norm_eps=section.rms_norm_eps,
        attention_dropout=section.dropout,
        hidden_dropout=section.dropout,
        tie_word_embeddings=section.tie_word_embeddings,
        initializer_range=section.initializer_range,
        **special_token_ids,
    )


def build_model(section: ModelSection, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh Quill from the recipe, its vocabulary and special ids from the tokenizer; or ``section.path`` (any
    causal LM, in float32) to continue pretraining it."""
    if section.path is not None:
        model = AutoModelForCausalLM.from_pretrained(section.path, dtype=torch.float32)
        _check_vocabulary(model, tokenizer, section.path, "use the model's own tokenizer (tokenizer.path)")
    else:
        config = quill_config(section, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = QuillForCausalLM(config)
    model.set_attn_implementation(section.attn_implementation)
    return model


def load_tokenizer(model: str | Path, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """The model's own tokenizer (its folder, or its Hub repo), else the tokenizer in ``fallback`` (this run's
    tokenizer stage). A missing pad token becomes EOS: `data.collate` masks padding by position (labels -100,
    attention_mask 0), never by id, so sharing the id is safe."""
    local = Path(model).expanduser()
    if not local.is_dir():  # a Hub id: its repository ships its tokenizer
        source: str | Path = model
    elif any((local / name).is_file() for name in _TOKENIZER_FILES):
        source = local
    elif fallback is not None and fallback.is_dir():
        source = fallback
    else:
        raise FileNotFoundError(
            f"no tokenizer in {local} nor in {fallback}. Fix: run the tokenizer stage, or save the tokenizer into "
            "the model folder (tokenizer.save_pretrained)."
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    base: str | Path, task: str, num_labels: int | None, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The base model in float32 for ``task``: `AutoModelForCausalLM`, or `AutoModelForSequenceClassification` with a
    fresh ``num_labels`` head and the tokenizer's ``pad_token_id`` in its config (heads find each row's last token
    through it)."""
    if task == "classification":
        if num_labels is None or num_labels < 2:
            raise ValueError(f"classification needs num_labels >= 2, got {num_labels!r}")
        model = AutoModelForSequenceClassification.from_pretrained(
            base, dtype=torch.float32, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id
        )
    elif task in TASK_TYPES:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        raise ValueError(f"unknown fine-tuning task {task!r}; expected one of {sorted(TASK_TYPES)}")
    _check_vocabulary(model, tokenizer, base, "use the base's own tokenizer (save it into the base folder)")
    return model


def load_tuned(
    tuned: Path, kind: str, tokenizer: PreTrainedTokenizerBase, base: PreTrainedModel | None = None
) -> torch.nn.Module:
    """The tuned model as a causal LM (``kind`` ``causal_lm``) or a classifier (``classification``).

    An adapter folder is attached IN PLACE to ``base`` (required then; one copy of the weights is held). A
    classification adapter tunes the body too, so it can be attached to the causal LM to show what that did to
    language modelling. A merged folder is loaded on its own (release the base first)."""
    if (tuned / "adapter_config.json").is_file():
        if base is None:
            raise ValueError(f"{tuned} is an adapter: pass the base model it was trained on")
        config = PeftConfig.from_pretrained(str(tuned))
        config.task_type = "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"
        return PeftModel.from_pretrained(base, str(tuned), config=config)
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    model = auto.from_pretrained(tuned, dtype=torch.float32)
    if kind == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def merge_adapter(
    adapter_dir: Path, base: str | Path | PreTrainedModel, out_dir: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Merge the adapter in ``adapter_dir`` into ``base`` IN FLOAT32, cast to ``dtype``, and ``save_pretrained`` it
    (with the adapter's tokenizer) to ``out_dir``. Merging in bf16 would be off by ~1e-2; fp32 by ~1e-6.

    ``base``: a loaded model (cast to float32 here) or, for a causal-LM adapter, a folder or Hub id. A
    classification base must be passed loaded, as `load_base` builds it (the adapter config lacks its head size)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if isinstance(base, (str, Path)):
        task_type = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
        if task_type not in (TaskType.CAUSAL_LM, None):  # None: a plain PeftModel adapter, on a causal LM here
            raise ValueError(
                f"the adapter's task is {task_type}: its base needs the task's head, which only the finetune stage "
                "builds (pass the base loaded with pipeline.loading.load_base); a causal-LM adapter merges from a path"
            )
        base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base.float(), adapter_dir).merge_and_unload()
    merged.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    if any((adapter_dir / name).is_file() for name in _TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return Path(out_dir)


def _check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: Any, fix: str) -> None:
    embedded = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model {name} embeds only {embedded}: {fix}")


# ------------------------------------------------------------------------------------------ LoRA
# Here rather than in the finetune stage: the pre-flight checks (`pipeline.preflight`) match the recipe's target
# modules against the model on the meta device before any stage runs.


def lora_config(section: LoraSection, task: str) -> LoraConfig:
    """The recipe's adapter as a PEFT `LoraConfig` for ``task`` (``causal_lm``, ``instruction`` or ``classification``).

    ``target_modules: [all-linear]`` becomes PEFT's ``"all-linear"`` (every linear layer but the output head)."""
    if task not in TASK_TYPES:
        raise ValueError(f"unknown fine-tuning task {task!r}; expected one of {sorted(TASK_TYPES)}")
    targets: list[str] | str = list(section.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        # For SEQ_CLS, PEFT appends the head ("classifier", "score") to this list itself.
        modules_to_save=list(section.modules_to_save) if section.modules_to_save else None,
        task_type=TASK_TYPES[task],
    )


def lora_target_problems(model: torch.nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(recipe key, message) for each of ``target_modules`` and ``modules_to_save`` holding names that match no
    module (as PEFT matches: the full name or its last components); works on a meta-device model."""
    names = [name for name, _ in model.named_modules() if name]
    wanted = {"target_modules": config.target_modules, "modules_to_save": config.modules_to_save}
    problems = []
    for key, targets in wanted.items():
        if targets is None or isinstance(targets, str):  # "all-linear" or a regex: PEFT resolves those
            continue
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            problems.append((f"finetune.lora.{key}", (
                f"{missing} match no module of {type(model).__name__}. Its linear layers are named {linear}. "
                "Fix: pick from those (or use [all-linear] for target_modules)."
            )))
    return problems


def check_lora_targets(model: torch.nn.Module, config: LoraConfig) -> None:
    """Raise `ValueError` when a name in ``target_modules`` or ``modules_to_save`` matches no module of ``model``.
    PEFT stays silent about a typo among valid names and is cryptic when none match."""
    problems = lora_target_problems(model, config)
    if problems:
        raise ValueError("; ".join(f"{key} {message}" for key, message in problems))
