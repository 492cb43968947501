"""Runs a recipe's stages in order, skipping those whose finished artefact already matches the recipe.

    tokenizer ─► pretrain ─► finetune ─► evaluation ─► hub          (the modules in `STAGES`)
    output_dir/tokenizer/  pretrain/  finetune/{adapter,merged}/  eval/  hub/   (`pipeline.artifacts`)

A stage is a module with a ``NAME`` and ``run(recipe, accelerator)`` (the `Stage` contract); stages never import
each other, only the shared core below them. Whether a stage runs is `Recipe.runs`.

Each stage folder gets a `stage.json` holding the hash of the recipe sections the stage depends on, marked
complete only once the stage has finished. A rerun skips a complete stage with the same hash, continues an
incomplete one (training resumes from its checkpoints), and moves a folder built from a different recipe aside
(`pretrain.replaced-<hash>`) rather than deleting or mixing it: nothing already written is lost.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline import evaluation, finetune, hub, pretrain, tokenizer
from pipeline.artifacts import RunArtifacts
from pipeline.recipe import Recipe, TrainSection, dump_recipe, section_hash
from pipeline.training import build_accelerator, seed_everything


class Stage(Protocol):
    """The contract every stage module keeps: a name and one entry point (setup → work → save into its folder)."""

    NAME: str

    def run(self, recipe: Recipe, accelerator: Accelerator) -> Any: ...


STAGES: tuple[Stage, ...] = (tokenizer, pretrain, finetune, evaluation, hub)
STAGE_NAMES = tuple(stage.NAME for stage in STAGES)

# What each stage's artefact depends on: upstream sections included, so a changed tokenizer rebuilds everything.
_UPSTREAM = ("seed", "tokenizer", "data.sources", "data.validation_fraction", "data.max_documents")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("seed", "tokenizer", "data.validation_fraction"),
    "pretrain": (*_UPSTREAM, "model", "data", "pretrain"),
    "finetune": (*_UPSTREAM, "model", "data", "pretrain", "finetune"),
    "evaluate": (*_UPSTREAM, "model", "data", "pretrain", "finetune", "evaluate"),
    "hub": (*_UPSTREAM, "model", "data", "pretrain", "finetune", "evaluate", "hub"),
}
MARKER = "stage.json"


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran", "skipped (up to date)", "disabled"
    folder: Path
    seconds: float = 0.0


def is_up_to_date(recipe: Recipe, stage: str) -> bool:
    marker = _read_marker(RunArtifacts.of(recipe).stage_folder(stage))
    return bool(marker and marker.get("complete") and marker.get("hash") == section_hash(recipe, *STAGE_SECTIONS[stage]))


def run_recipe(
    recipe: Recipe,
    stages: Sequence[str] | None = None,
    expected_processes: int | None = None,
    log: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run the selected stages (default: all) of a validated recipe."""
    selected = list(stages or STAGE_NAMES)
    unknown = [s for s in selected if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGE_NAMES)}")
    run_folders = RunArtifacts.of(recipe)
    accelerator = stage_accelerator(None, run_folders.root, expected_processes)  # checks the world first
    if accelerator.is_main_process:
        dump_recipe(recipe, run_folders.recipe)
    else:
        log = _silent  # one voice: every rank runs the stages, the main process reports them
    outcomes = []
    for stage in STAGES:
        name = stage.NAME
        if name not in selected:
            continue
        folder = run_folders.stage_folder(name)
        if not recipe.runs(name):
            outcomes.append(StageOutcome(name, "disabled", folder))
            continue
        # Decided by the main process for all: ranks must agree on running a stage (its collectives) or not.
        if broadcast_object_list([is_up_to_date(recipe, name)])[0]:
            log(f"[{name}] up to date, skipped ({folder})")
            outcomes.append(StageOutcome(name, "skipped (up to date)", folder))
            continue
        accelerator = stage_accelerator(_train_section(recipe, name), folder, expected_processes)
        digest = section_hash(recipe, *STAGE_SECTIONS[name])
        if accelerator.is_main_process:
            _claim_folder(folder, digest, log)
        accelerator.wait_for_everyone()
        log(f"[{name}] running → {folder}")
        seed_everything(recipe.seed)  # each stage starts from the recipe's seed, whatever ran before it
        start = time.perf_counter()
        stage.run(recipe, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_files(folder)  # the artefact is on disk before the marker says it is complete
            _write_marker(folder, digest, complete=True)
        outcomes.append(StageOutcome(name, "ran", folder, time.perf_counter() - start))
        log(f"[{name}] done in {outcomes[-1].seconds:.1f}s")
    return outcomes


def _silent(message: str) -> None:
    pass


def stage_accelerator(cfg: TrainSection | None, folder: Path, expected_processes: int | None) -> Accelerator:
    """A fresh Accelerator per stage (stages differ in mixed precision and accumulation)."""
    return build_accelerator(cfg or TrainSection(), folder, expected_processes)


def _train_section(recipe: Recipe, stage: str) -> TrainSection | None:
    """The training-loop settings of a training stage (its mixed precision and accumulation shape the Accelerator)."""
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
