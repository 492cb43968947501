"""Runs a recipe's stages in order, skipping those whose finished artefact already matches the recipe.

    tokenizer ─► pretrain ─► finetune ─► evaluation ─► hub          (the modules in `STAGES`)
    output_dir/tokenizer/  pretrain/  finetune/{adapter,merged}/  eval/  hub/   (`pipeline.artifacts`)

A stage is a module with a ``NAME`` and ``run(recipe, accelerator)`` (the `Stage` contract); stages never import
each other, only the shared core below them. Whether a stage runs is `Recipe.runs`.

Each stage folder gets a `stage.json` holding the hash of the recipe sections the stage depends on and the
fingerprint of its data (`stage_inputs`: how the documents are split, `pipeline.data.split_settings`, and what
the sources hold, `pipeline.sources.fingerprint`: each file's size, mtime and sha256, a Hub dataset's pinned
revision or "unpinned", a built-in corpus's package version), marked complete only once the stage has finished.
A rerun skips a complete stage whose hash and data are unchanged, continues an incomplete one (training resumes
from its checkpoints), and moves a folder built from a different recipe or from different data aside
(`pretrain.replaced-<hash>`, `pretrain.replaced-<hash>-data-<digest>`) rather than deleting or mixing it:
nothing already written is lost. Data counts by content: a file touched but not changed (same sha256) keeps its
stage up to date, and a file whose size and mtime match the marker is not read again. A marker written before
data was fingerprinted adopts the data on disk now, and says so: rebuilding a finished multi-hour stage because of
an upgrade is worse than trusting it once, and ``--force STAGE`` rebuilds it (its old folder moved aside, as
always).

A stage's data is cumulative, as its hashed sections are: the tokenizer's sources, then pretraining's, fine-tuning's
and the evaluation's own sets, so changed pretraining data also reruns everything downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pipeline import evaluation, finetune, hub, preflight, pretrain, tokenizer
from pipeline.artifacts import RunArtifacts
from pipeline.data import held_out_sections, sections_read, split_settings, tokenizer_section
from pipeline.recipe import Recipe, TrainSection, dump_recipe, section_hash
from pipeline.sources import fingerprint, fingerprint_changes
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


@dataclass
class Freshness:
    """Whether a stage's folder holds its finished artefact for this recipe and this data, and what it was built
    from (the marker to write when it runs)."""

    up_to_date: bool
    digest: str  # section_hash of the stage's sections
    inputs: dict[str, Any]  # stage_inputs
    stale: str = ""  # why the folder's artefact cannot be reused ("" when there is none, or it can)
    aside: str = ""  # name suffix for the old folder when it must be moved aside ("" to keep it)
    note: str = ""  # said when the stage is skipped


def is_up_to_date(recipe: Recipe, stage: str) -> bool:
    """Whether ``stage``'s folder holds a finished artefact of this recipe built from the data on disk now."""
    try:
        return freshness(recipe, stage).up_to_date
    except (OSError, ValueError):  # a source that cannot be read now: the stage will say so when it runs
        return False


def freshness(recipe: Recipe, stage: str) -> Freshness:
    """Compare ``stage``'s `stage.json` with the recipe (`section_hash`) and with its data (`stage_inputs`)."""
    marker = _read_marker(RunArtifacts.of(recipe).stage_folder(stage)) or {}
    digest = section_hash(recipe, *STAGE_SECTIONS[stage])
    recorded = marker.get("inputs")
    inputs = stage_inputs(recipe, stage, previous=(recorded or {}).get("sources"))
    old_hash = str(marker.get("hash", "unknown"))[:8]
    if not marker:
        return Freshness(False, digest, inputs, aside=old_hash)  # a folder with files but no marker is unknown
    if marker.get("hash") != digest:
        return Freshness(False, digest, inputs, stale="was built from a different recipe", aside=old_hash)
    if recorded is None:  # a marker of an earlier version: adopt the data on disk as its inputs (said, recorded)
        note = ("; its stage.json predates data fingerprints, so the data on disk now is recorded as what built it "
                f"(if the data changed since, rebuild with --force {stage})")
        return Freshness(bool(marker.get("complete")), digest, inputs, note=note)
    changes = _input_changes(recorded, inputs)
    if changes:
        aside = f"{old_hash}-data-{str(marker.get('inputs_digest', 'unknown'))[:8]}"
        return Freshness(False, digest, inputs, stale=f"was built from other data ({'; '.join(changes)})", aside=aside)
    return Freshness(bool(marker.get("complete")), digest, inputs)


def stage_inputs(recipe: Recipe, stage: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stage's artefact is built from besides its recipe sections: ``splits``, the `split_settings` of every
    data section it reads (its own, the upstream stages', and those whose held-out texts they leave out), and
    ``sources``, the `pipeline.sources.fingerprint` of their sources and of the evaluation's own sets. `previous`
    (the marker's ``sources``) spares re-hashing files whose size and mtime are unchanged."""
    held_out_by = held_out_sections(recipe)
    chain = STAGE_NAMES[: STAGE_NAMES.index(stage) + 1]
    sections = []
    if (section := tokenizer_section(recipe)) is not None:
        sections += sections_read(section, held_out_by)
    if "pretrain" in chain:
        sections += sections_read(recipe.data, held_out_by)
    if "finetune" in chain:
        sections += sections_read(recipe.finetune.data, held_out_by)
    extra = []
    if "evaluate" in chain:
        sections += held_out_by
        extra = [*(recipe.evaluate.general or []), *(recipe.evaluate.domain or [])]
    splits = []
    for settings in map(split_settings, sections):
        if settings not in splits:
            splits.append(settings)
    sources = [source for settings in splits for source in settings["sources"]] + list(extra)
    return {"splits": splits, "sources": fingerprint(sources, previous=previous)}


def _input_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = fingerprint_changes(old.get("sources", {}), new["sources"])
    if old.get("splits") != new["splits"]:
        changes.insert(0, "the data sections that decide its held-out documents changed")
    return changes


def _inputs_digest(inputs: dict[str, Any]) -> str:
    """A digest of the content the inputs stand for (file sha256s, not their timestamps)."""
    sources = inputs["sources"]
    content = {**sources, "files": {path: record["sha256"] for path, record in sources["files"].items()}}
    blob = json.dumps({"splits": inputs["splits"], "sources": content}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def run_recipe(
    recipe: Recipe,
    stages: Sequence[str] | None = None,
    expected_processes: int | None = None,
    log: Callable[[str], None] = print,
    force: Sequence[str] = (),
) -> list[StageOutcome]:
    """Run the selected stages (default: all) of a validated recipe; ``force``: stages rebuilt even when up to date
    (their old folders moved aside)."""
    selected = list(stages or STAGE_NAMES)
    unknown = [s for s in [*selected, *force] if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGE_NAMES)}")
    preflight.check(recipe, selected)  # every problem the recipe and its files show, before anything is written
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
        # Decided by the main process for all (it alone hashes the data): ranks must agree on running a stage
        # (its collectives) or not.
        fresh = freshness(recipe, name) if accelerator.is_main_process else None
        if fresh is not None and name in force:
            fresh = _forced(fresh, folder)
        if broadcast_object_list([fresh is not None and fresh.up_to_date])[0]:
            if fresh is not None:
                _refresh_marker(folder, fresh)
            log(f"[{name}] up to date, skipped ({folder}){fresh.note if fresh else ''}{_unpinned_note(fresh)}")
            outcomes.append(StageOutcome(name, "skipped (up to date)", folder))
            continue
        accelerator = stage_accelerator(_train_section(recipe, name), folder, expected_processes)
        if accelerator.is_main_process:
            _claim_folder(folder, fresh, log)
        accelerator.wait_for_everyone()
        log(f"[{name}] running → {folder}")
        seed_everything(recipe.seed)  # each stage starts from the recipe's seed, whatever ran before it
        start = time.perf_counter()
        stage.run(recipe, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_files(folder)  # the artefact is on disk before the marker says it is complete
            _write_marker(folder, fresh.digest, fresh.inputs, complete=True)
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


def _claim_folder(folder: Path, fresh: Freshness, log: Callable[[str], None]) -> None:
    """Make `folder` this recipe's: keep it if it was started by the same recipe on the same data (so training
    resumes), move it aside if another recipe or other data built it (or nothing says what built it)."""
    if folder.exists() and any(folder.iterdir()) and fresh.aside:
        aside = folder.with_name(f"{folder.name}.replaced-{fresh.aside}")
        n = 1
        while aside.exists():  # the same recipe can be replaced more than once (data edited twice)
            aside, n = folder.with_name(f"{folder.name}.replaced-{fresh.aside}-{n}"), n + 1
        folder.rename(aside)
        log(f"{folder} {fresh.stale or 'holds no stage marker'}: moved to {aside}")
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, fresh.digest, fresh.inputs, complete=False)


def _forced(fresh: Freshness, folder: Path) -> Freshness:
    """``--force``: not up to date, and whatever the folder holds is moved aside (even a finished artefact of this
    very recipe, which `_claim_folder` would otherwise keep to resume into)."""
    marker = _read_marker(folder) or {}
    aside = fresh.aside or f"{str(marker.get('hash', 'unknown'))[:8]}-forced"
    return dataclasses.replace(fresh, up_to_date=False, stale=fresh.stale or "is rebuilt (--force)", aside=aside)


def _refresh_marker(folder: Path, fresh: Freshness) -> None:
    """An up-to-date stage whose files were touched (same content, new mtime): record the new timestamps, so that
    the next run need not hash them again."""
    marker = _read_marker(folder) or {}
    if marker.get("inputs") != fresh.inputs:
        try:
            _write_marker(folder, fresh.digest, fresh.inputs, complete=True, when=marker.get("time"))
        except OSError:  # a read-only copy of a run: hashing again next time is all it costs
            pass


def _unpinned_note(fresh: Freshness | None) -> str:
    unpinned = [key.split("|")[0] for key, revision in (fresh.inputs["sources"]["hub"] if fresh else {}).items()
                if revision == "unpinned"]
    if not unpinned:
        return ""
    return (f"; note: Hub dataset(s) {', '.join(sorted(set(unpinned)))} are not pinned, so a changed Hub copy goes "
            "unnoticed (set the source's revision to a commit)")


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


def _write_marker(folder: Path, digest: str, inputs: dict[str, Any], complete: bool, when: float | None = None) -> None:
    record = {"hash": digest, "inputs_digest": _inputs_digest(inputs), "complete": complete,
              "time": time.time() if when is None else when, "inputs": inputs}
    partial = folder / f".{MARKER}.partial"
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(folder / MARKER)
