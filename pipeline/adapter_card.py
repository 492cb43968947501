"""The README of a LoRA adapter folder: what it was trained on, from which base, how well, and how to load it.

PEFT's `save_pretrained` writes an empty template ("[More Information Needed]" throughout); the finetune stage
replaces it with this card. Its Hub metadata comes from `huggingface_hub.ModelCardData`; ``base_model`` is set only
for a Hub id, the one kind of value the Hub accepts there. Every path in it is relative
(`artifacts.portable_location`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCardData

from pipeline.artifacts import is_local, portable_location

__all__ = ["AdapterFacts", "write_adapter_card"]

_PIPELINE_TAG = {"causal_lm": "text-generation", "instruction": "text-generation", "classification": "text-classification"}
_TASK_WORDS = {"causal_lm": "next-token prediction on domain text", "instruction": "prompt → response",
               "classification": "sequence classification"}


@dataclass(frozen=True)
class AdapterFacts:
    """What the card states; every field comes from the recipe and the training run."""

    base: str  # folder or Hub id, as the finetune stage loaded it
    task: str  # finetune.task
    sources: Sequence[str]  # finetune data source names
    steps: int  # optimizer steps taken
    r: int
    alpha: int
    dropout: float
    target_modules: Sequence[str]
    trainable: int  # parameters the adapter trains (LoRA matrices and modules_to_save)
    total: int  # parameters of base + adapter
    validation: Mapping[str, float]  # the training loop's last held-out evaluation (eval_loss, ...); may be empty


def write_adapter_card(folder: Path, facts: AdapterFacts) -> Path:
    """Write ``folder/README.md`` (the adapter folder, relative paths resolved from the working directory)."""
    folder = Path(folder)
    base = portable_location(facts.base)
    adapter = portable_location(folder)
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag=_PIPELINE_TAG.get(facts.task, "text-generation"),
        base_model=None if is_local(facts.base) else facts.base,
        tags=["pipeline", "lora", "peft"],
    )
    sections = [
        f"# LoRA adapter for `{base}`",
        f"Trained with `pipeline` ({_TASK_WORDS.get(facts.task, facts.task)}) on {_names(facts.sources)} for "
        f"{facts.steps} optimizer steps.",
        _training_table(facts),
        _validation(facts.validation),
        _how_to_load(base, adapter, facts.task),
    ]
    path = folder / "README.md"
    path.write_text(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    return path


def _names(sources: Sequence[str]) -> str:
    return ", ".join(f"`{portable_location(name) if Path(name).is_absolute() else name}`" for name in sources) or "?"


def _training_table(facts: AdapterFacts) -> str:
    share = facts.trainable / facts.total if facts.total else 0.0
    rows = [
        ("base model", f"`{portable_location(facts.base)}`"),
        ("LoRA rank r / alpha / dropout", f"{facts.r} / {facts.alpha} / {facts.dropout}"),
        ("target modules", ", ".join(f"`{name}`" for name in facts.target_modules)),
        ("trainable parameters", f"{facts.trainable:,} of {facts.total:,} ({share:.2%})"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _validation(validation: Mapping[str, float]) -> str:
    shown = [(key.removeprefix("eval_").replace("_", " "), value) for key, value in validation.items()
             if isinstance(value, (int, float)) and key != "eval_tokens"]
    if not shown:
        return ""
    cells = ", ".join(f"{name} {value:.4f}" if math.isfinite(value) else f"{name} {value}" for name, value in shown)
    return (f"Held-out validation at the end of training: {cells}. The run's evaluation stage compares base and "
            "tuned in `eval/report.md`.")


def _how_to_load(base: str, adapter: str, task: str) -> str:
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    code = [
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        f'base = {auto}.from_pretrained("{base}")  # a Quill base: import pipeline.models.quill, or trust_remote_code=True',
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
    ]
    text = "## How to load\n\n```python\n" + "\n".join(code) + "\n```"
    if task != "classification":
        text += (f"\n\nOr from the command line: `pipeline generate {base} \"PROMPT\" --adapter {adapter}`, "
                 f"`pipeline merge {base} {adapter} OUT` for a standalone model.")
    return text + "\n\nPaths are relative to the directory the run was started in."
