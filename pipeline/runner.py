"""Runs a recipe's stages in order, skipping those whose finished artefact already matches the recipe.

    tokenizer ─► pretrain ─► finetune ─► evaluate ─► hub
    output_dir/tokenizer/  pretrain/  finetune/{adapter,merged}/  eval/  hub/

Each stage folder gets a `stage.json` holding the hash of the recipe sections the stage depends on, marked
complete only once the stage has finished. A rerun skips a complete stage with the same hash, continues an
incomplete one (training resumes from its checkpoints), and moves a folder built from a different recipe aside
(`pretrain.replaced-<hash>`) rather than deleting or mixing it: nothing already written is lost.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline.recipe import Recipe, TrainSection, dump_recipe, section_hash
from pipeline.training import build_accelerator, seed_everything

STAGES = ("tokenizer", "pretrain", "finetune", "evaluate", "hub")

# What each stage's artefact depends on: upstream sections included, so a changed tokenizer rebuilds everything.
_UPSTREAM = ("seed", "tokenizer", "data.sources", "data.validation_fraction", "data.max_documents")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("seed", "tokenizer", "data.validation_fraction"),
    "pretrain": (*_UPSTREAM, "model", "data", "pretrain"),
    "finetune": (*_UPSTREAM, "model", "data", "pretrain", "finetune"),
    "evaluate": (*_UPSTREAM, "model", "data", "pretrain", "finetune", "evaluate"),
    "hub": (*_UPSTREAM, "model", "data", "pretrain", "finetune", "evaluate", "hub"),
}
STAGE_FOLDERS = {"tokenizer": "tokenizer", "pretrain": "pretrain", "finetune": "finetune", "evaluate": "eval", "hub": "hub"}
MARKER = "stage.json"


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran", "skipped (up to date)", "disabled"
    folder: Path
    seconds: float = 0.0


def enabled(recipe: Recipe, stage: str) -> bool:
    return {
        "tokenizer": True,
        "pretrain": recipe.pretrain.enabled,
        "finetune": recipe.finetune.enabled and recipe.finetune.train.enabled,
        "evaluate": recipe.evaluate.enabled,
        "hub": recipe.hub.push,
    }[stage]


def stage_folder(recipe: Recipe, stage: str) -> Path:
    return recipe.output_dir / STAGE_FOLDERS[stage]


def is_up_to_date(recipe: Recipe, stage: str) -> bool:
    marker = _read_marker(stage_folder(recipe, stage))
    return bool(marker and marker.get("complete") and marker.get("hash") == section_hash(recipe, *STAGE_SECTIONS[stage]))


def run_recipe(
    recipe: Recipe,
    stages: Sequence[str] | None = None,
    expected_processes: int | None = None,
    log: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run the selected stages (default: all) of a validated recipe."""
    selected = list(stages or STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    accelerator = stage_accelerator(None, recipe.output_dir, expected_processes)  # checks the world first
    if accelerator.is_main_process:
        dump_recipe(recipe, recipe.output_dir / "recipe.yaml")
    else:
        log = _silent  # one voice: every rank runs the stages, the main process reports them
    outcomes = []
    for stage in STAGES:
        if stage not in selected:
            continue
        folder = stage_folder(recipe, stage)
        if not enabled(recipe, stage):
            outcomes.append(StageOutcome(stage, "disabled", folder))
            continue
        # Decided by the main process for all: ranks must agree on running a stage (its collectives) or not.
        if broadcast_object_list([is_up_to_date(recipe, stage)])[0]:
            log(f"[{stage}] up to date, skipped ({folder})")
            outcomes.append(StageOutcome(stage, "skipped (up to date)", folder))
            continue
        accelerator = stage_accelerator(_train_section(recipe, stage), folder, expected_processes)
        digest = section_hash(recipe, *STAGE_SECTIONS[stage])
        if accelerator.is_main_process:
            _claim_folder(folder, digest, log)
        accelerator.wait_for_everyone()
        log(f"[{stage}] running → {folder}")
        seed_everything(recipe.seed)  # each stage starts from the recipe's seed, whatever ran before it
        start = time.perf_counter()
        _stage_function(stage)(recipe, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_files(folder)  # the artefact is on disk before the marker says it is complete
            _write_marker(folder, digest, complete=True)
        outcomes.append(StageOutcome(stage, "ran", folder, time.perf_counter() - start))
        log(f"[{stage}] done in {outcomes[-1].seconds:.1f}s")
    return outcomes


def _silent(message: str) -> None:
    pass


def stage_accelerator(cfg: TrainSection | None, folder: Path, expected_processes: int | None) -> Accelerator:
    """A fresh Accelerator per stage (stages differ in mixed precision and accumulation)."""
    return build_accelerator(cfg or TrainSection(), folder, expected_processes)


def _train_section(recipe: Recipe, stage: str) -> TrainSection | None:
    return {"pretrain": recipe.pretrain, "finetune": recipe.finetune.train}.get(stage)


def _claim_folder(folder: Path, digest: str, log: Callable[[str], None]) -> None:
    """Make `folder` this recipe's: keep it if it was started by the same recipe (so training resumes), move it
    aside if another recipe built it."""
    marker = _read_marker(folder)
    if folder.exists() and any(folder.iterdir()) and (marker is None or marker.get("hash") != digest):
        old = (marker or {}).get("hash", "unknown")[:8]
        aside = folder.with_name(f"{folder.name}.replaced-{old}")
        n = 1
        while aside.exists():
            aside, n = folder.with_name(f"{folder.name}.replaced-{old}-{n}"), n + 1
        folder.rename(aside)
        log(f"{folder} was built from a different recipe: moved to {aside}")
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, digest, complete=False)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _write_marker(folder: Path, digest: str, complete: bool) -> None:
    partial = folder / f".{MARKER}.partial"
    partial.write_text(json.dumps({"hash": digest, "complete": complete, "time": time.time()}, indent=2))
    partial.replace(folder / MARKER)


# Each stage's entry point, imported only when the stage runs (a dry run or a skipped stage loads none of them).
_STAGE_FUNCTIONS = {
    "tokenizer": "pipeline.tokenizer:run_tokenizer_stage",
    "pretrain": "pipeline.pretrain:run_pretrain",
    "finetune": "pipeline.finetune:run_finetune",
    "evaluate": "pipeline.evaluation:run_evaluation",
    "hub": "pipeline.hub:run_push",
}


def _stage_function(stage: str) -> Callable[[Recipe, Accelerator], Any]:
    module, name = _STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------------------
# Dry run: what a recipe will do, before it does it
# ---------------------------------------------------------------------------------------------------------------
def plan(recipe: Recipe, num_processes: int = 1) -> dict[str, Any]:
    """Parameter count, tokens and steps per training stage, and a rough memory estimate, without building
    anything real (the model is instantiated on the meta device)."""
    from pipeline.models.quill import QuillConfig, QuillForCausalLM

    model = recipe.model
    result: dict[str, Any] = {"processes": num_processes}
    if model.path is None:
        config = QuillConfig(
            vocab_size=recipe.tokenizer.vocab_size, hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size, num_hidden_layers=model.num_hidden_layers,
            num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_key_value_heads,
            position_embedding_type=model.position_embedding_type, max_position_embeddings=model.max_position_embeddings,
            tie_word_embeddings=model.tie_word_embeddings,
        )
        with torch.device("meta"):
            params = sum(p.numel() for p in QuillForCausalLM(config).parameters())
        result["parameters"] = params
        # fp32 weights + grads + two AdamW moments = 16 bytes/parameter; activations ~ 34·B·T·h bytes per layer.
        train = recipe.pretrain
        activations = 34 * train.batch_size * recipe.data.block_size * model.hidden_size * model.num_hidden_layers
        result["memory_estimate_gb"] = round((16 * params + activations) / 1e9, 3)
    for name, train, data in (
        ("pretrain", recipe.pretrain, recipe.data),
        ("finetune", recipe.finetune.train, recipe.finetune.data or recipe.data),
    ):
        if not (train.enabled and (name != "finetune" or recipe.finetune.enabled)):
            continue
        tokens_per_step = train.batch_size * train.gradient_accumulation_steps * num_processes * data.block_size
        result[name] = {
            "steps": train.max_steps,
            "tokens_per_step": tokens_per_step,
            "tokens": tokens_per_step * train.max_steps,
            "stage_up_to_date": is_up_to_date(recipe, name),
        }
    return result

