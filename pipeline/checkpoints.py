"""Checkpoints of the training loop: written atomically, sealed by a manifest, verified before resume.

A checkpoint is an `accelerator.save_state` folder (model, optimizer, scheduler, RNG, sampler) plus the `TrainState`
(step, epoch, data position) as JSON, sealed by ``manifest.json`` (size and sha256 of every file) and published by
one rename, so `resume: auto` never picks up a half-written checkpoint and falls back from a damaged one (moved
aside to ``damaged-checkpoint-N``, never deleted). Resuming runs no pickle: the `TrainState` comes from JSON, and
every other file is checked to load with ``weights_only=True`` (or is safetensors) before accelerate reads it.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load
from safetensors import safe_open

CHECKPOINT_PREFIX = "checkpoint-"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint moved aside: kept for inspection, never resumed or pruned
MANIFEST = "manifest.json"  # size and sha256 of every file of a checkpoint, written last
TRAIN_STATE = "train_state.json"  # the TrainState: the only copy, so resuming runs no pickle
_STAGING, _REPLACED = ".tmp-", ".old-"  # folders of a save in progress
_PICKLE_SUFFIXES = {".bin", ".pkl", ".pt", ".pth"}  # what accelerate reads with torch.load
_CUSTOM_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")  # accelerate's registered objects (older checkpoints)

@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint as `train_state.json` (never as a pickle) and restored from it."""

    step: int = 0  # optimizer steps done (skipped ones included: their data was consumed)
    epoch: int = 0  # epoch of the next micro-batch
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)
    tokens_seen: int = 0  # target tokens over all ranks
    best_eval_loss: float = float("inf")
    # What `batches_in_epoch` is counted in: resuming with another layout would skip the wrong data.
    num_processes: int = 1
    batch_size: int = 0
    gradient_accumulation_steps: int = 1
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient norm (max_skipped_steps)
    train_seconds: float = 0.0  # wall-clock seconds of the training loop so far, resumed runs included (max_time)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def to_json(self) -> str:
        state = self.state_dict()
        if not math.isfinite(state["best_eval_loss"]):  # JSON has no infinity: null, read back by from_json
            state["best_eval_loss"] = None
        return json.dumps(state, indent=2, allow_nan=False)

    @staticmethod
    def from_json(text: str) -> dict[str, Any]:
        state = json.loads(text)
        if state.get("best_eval_loss") is None:  # no evaluation yet: infinity, which JSON cannot hold
            state["best_eval_loss"] = float("inf")
        return state


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from: damaged since it was written, holding a file that would run
    code when loaded, or failing to load."""


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of an interrupted save, and damaged checkpoints moved
    aside, never match the pattern (so `keep_last` never counts them)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(
    resume: str, checkpoint_dir: Path, on_damaged: str = "previous", say: Callable[[str], None] = print
) -> Path | None:
    """`auto`: the newest checkpoint that passes `checkpoint_problem` (damaged newer ones are moved aside to
    `damaged-*` with a message, or, with `on_damaged="stop"`, refused); `never`: start fresh; otherwise a checkpoint
    path, refused if damaged. Main process only: it may move folders."""
    if resume == "never":
        return None
    if resume != "auto":
        return _explicit_checkpoint(resume, say)
    damaged: list[str] = []
    for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            _warn_if_unverified(checkpoint, say)
            if damaged:
                say(f"resuming from {checkpoint}, the newest sound checkpoint, instead")
            return checkpoint
        if on_damaged == "stop":
            raise CheckpointError(
                f"the newest checkpoint {checkpoint} is damaged: {problem}. Nothing was loaded or changed. Fix: set "
                "on_damaged_checkpoint: previous to move it aside and resume from the previous checkpoint, resume: "
                "PATH for another one, or resume: never to start over"
            )
        aside = _move_aside(checkpoint)
        damaged.append(checkpoint.name)
        say(f"checkpoint {checkpoint.name} is damaged: {problem}. Moved aside to {aside} (kept for inspection)")
    if damaged:
        raise CheckpointError(
            f"no sound checkpoint left in {checkpoint_dir}: {', '.join(damaged)} damaged (moved aside to damaged-*). "
            "Fix: resume: never to start over, or resume: PATH to a checkpoint kept elsewhere"
        )
    return None


def _explicit_checkpoint(resume: str, say: Callable[[str], None]) -> Path:
    path = Path(resume).expanduser()
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no {TRAIN_STATE} in it)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"refusing resume={resume!r}: the checkpoint is damaged: {problem}. Fix: resume: auto (the newest sound "
            "checkpoint), another checkpoint path, or resume: never to start over"
        )
    _warn_if_unverified(path, say)
    return path


def _warn_if_unverified(checkpoint: Path, say: Callable[[str], None]) -> None:
    if not (checkpoint / MANIFEST).is_file():
        say(f"warning: {checkpoint} has no {MANIFEST} (written before checkpoints recorded digests): its files "
            "cannot be verified; resuming from it as it is")


def _move_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the `checkpoint-N` pattern, never overwriting an earlier one."""
    aside = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}")
    n = 1
    while aside.exists():
        n += 1
        aside = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}")
    os.replace(checkpoint, aside)
    return aside


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` must not be resumed from, or None: a file differs from the size or sha256 recorded in its
    manifest when it was written (missing, truncated, overwritten, added), `train_state.json` is unreadable, or a
    file that `torch.load` reads would run code (it does not load with ``weights_only=True``). A checkpoint without
    a manifest (written before digests were recorded) is checked for the last two only."""
    if (folder / MANIFEST).is_file():
        problem = _manifest_problem(folder)
        if problem is not None:
            return problem
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise TypeError("not a training state")
    except FileNotFoundError:
        return f"{TRAIN_STATE} is missing"
    except (OSError, ValueError, TypeError) as error:
        return f"{TRAIN_STATE} is unreadable ({error})"
    return _unreadable_safetensors(folder) or _unsafe_pickle(folder) or _unsafe_sharded_state(folder)


def _unreadable_safetensors(folder: Path) -> str | None:
    """A header that does not parse or does not cover the file (a truncated file without a manifest to say so)."""
    for name in _files(folder):
        if name.endswith(".safetensors"):
            try:
                with safe_open(folder / name, framework="pt"):
                    pass
            except Exception as error:  # noqa: BLE001 — safetensors raises its own error type, or OSError
                return f"{name} is unreadable ({error})"
    return None


def _manifest_problem(folder: Path) -> str | None:
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in recorded.items()}
        digests = {name: str(entry["sha256"]) for name, entry in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} is unreadable ({error!r})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"{name} has {found:,} bytes, {size:,} were written" + (" (truncated)" if found < size else "")
        if _sha256(path) != digests[name]:
            return f"{name} does not match the sha256 digest recorded when it was written (its content changed)"
    unlisted = sorted(set(_files(folder)) - set(sizes) - {MANIFEST})
    if unlisted:
        return f"{unlisted[0]} was not part of the checkpoint when it was written"
    return None


def _unsafe_pickle(folder: Path) -> str | None:
    """Load every pickle-based file as accelerate does (`accelerate.utils.load`: ``weights_only=True`` with its numpy
    allowlist for RNG states) to refuse it *before* `load_state`: a refused RNG file would otherwise be skipped
    silently, and a future accelerate might load a file with ``weights_only=False``."""
    deepspeed = (folder / "latest").is_file()  # DeepSpeed's own engine files load by its rules (see below)
    for name in _files(folder):
        if Path(name).suffix not in _PICKLE_SUFFIXES or (deepspeed and name.startswith("pytorch_model")):
            continue
        path = folder / name
        try:
            load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:  # noqa: BLE001 — any failure refuses the checkpoint; the message says which
            text = str(error)
            if "Weights only load failed" in text or "Unsupported global" in text:
                found = re.search(r"Unsupported global: [^\n]*", text)
                return f"{name} would run code when loaded ({found.group(0) if found else 'not plain tensors'})"
            return f"{name} is unreadable ({type(error).__name__}: {text.splitlines()[0] if text else ''})"
    return None


# What a `torch.distributed.checkpoint` ``.metadata`` file (FSDP's sharded state) holds besides the classes of that
# package and torch's dtypes: torch unpickles it with plain `pickle`, so it is read here first allowing only these.
_SHARDED_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class _ShardedMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SHARDED_METADATA_GLOBALS or _is_dtype(module, name) or _is_checkpoint_class(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _is_checkpoint_class(module: str, name: str) -> bool:
    """A class (or enum) defined in torch.distributed.checkpoint itself, by a plain name (no attribute paths)."""
    if not module.startswith("torch.distributed.checkpoint.") or "." in name:
        return False
    return isinstance(getattr(importlib.import_module(module), name, None), type)


def _unsafe_sharded_state(folder: Path) -> str | None:
    """FSDP's sharded state: torch.distributed.checkpoint reads each ``.metadata`` with plain `pickle.load` and every
    non-tensor entry with ``torch.load(weights_only=False)``; check both before it does."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    for path in sorted(folder.rglob(".metadata")):
        name = path.relative_to(folder).as_posix()
        try:
            with path.open("rb") as handle:
                metadata = _ShardedMetadataUnpickler(handle).load()
            entries = [(fqn, metadata.storage_data[MetadataIndex(fqn)])
                       for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)]
        except pickle.UnpicklingError as error:
            return f"{name} would run code when loaded ({error})"
        except Exception as error:  # noqa: BLE001 — any other failure: unreadable, refused all the same
            return f"{name} is unreadable ({type(error).__name__}: {error})"
        for fqn, info in entries:
            with (path.parent / info.relative_path).open("rb") as handle:
                handle.seek(info.offset)
                blob = handle.read(info.length)
            try:
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 — not plain data: it would run code under weights_only=False
                return f"{name}: the entry {fqn!r} would run code when loaded ({str(error).splitlines()[0]})"
    return None


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record the size and sha256 of every file of `folder`, flushing each to disk on the way (a power cut must not
    leave a 'complete' empty file), then the manifest itself: written last, so a checkpoint with one was whole."""
    files = {}
    for name in _files(folder):
        if name == MANIFEST:
            continue
        path = folder / name
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
            os.fsync(handle.fileno())
        files[name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    manifest = folder / MANIFEST
    with open(manifest, "w") as handle:
        handle.write(json.dumps({"format": 1, "files": files}, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def save_checkpoint(accelerator: Accelerator, state: TrainState, checkpoint_dir: Path, keep_last: int) -> Path:
    """Write the full state atomically: into a temporary folder, sealed by its manifest, then one rename. Every rank
    must call this (sharded FSDP/DeepSpeed saves are collectives); only the main process renames and prunes."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    staging = checkpoint_dir / f"{_STAGING}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by a crash during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / TRAIN_STATE).write_text(state.to_json())
        write_manifest(staging)
        if final.exists():  # the same step saved again: keep the old copy until the new one is in place
            replaced = final.with_name(f"{_REPLACED}{final.name}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_dir(checkpoint_dir)
        tidy_checkpoints(checkpoint_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def recover_interrupted_saves(checkpoint_dir: Path, say: Callable[[str], None] = print) -> None:
    """Undo what a save killed half-way leaves: a checkpoint renamed to `.old-*` while its replacement was not yet
    in place is restored (it is complete); staging folders and replaced copies are deleted."""
    if not checkpoint_dir.is_dir():
        return
    for old in sorted(checkpoint_dir.glob(f"{_REPLACED}{CHECKPOINT_PREFIX}*")):
        final = checkpoint_dir / old.name[len(_REPLACED):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            say(f"restored {final}: a save replacing it was interrupted")
    for staging in checkpoint_dir.glob(f"{_STAGING}*"):
        shutil.rmtree(staging, ignore_errors=True)


def tidy_checkpoints(checkpoint_dir: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete what interrupted saves left and all but the newest `keep_last` checkpoints (never `keep`, the one being
    resumed from). Counts every checkpoint on disk, so a run killed between a save's rename and its pruning is
    brought back to `keep_last` by the next run."""
    recover_interrupted_saves(checkpoint_dir)
    for old in list_checkpoints(checkpoint_dir)[:-keep_last] if keep_last > 0 else []:
        if keep is None or old.resolve() != keep.resolve():
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, folder: Path, state: TrainState) -> None:
    """Restore a checkpoint that passed `checkpoint_problem`: model, optimizer, scheduler, RNG and sampler through
    `accelerator.load_state` (safetensors and ``weights_only`` loads), the `TrainState` from its JSON. No pickle runs:
    the TrainState is not registered with accelerate, whose custom-object loader uses ``weights_only=False``."""
    try:
        custom = [p for p in folder.iterdir() if _CUSTOM_STATE.fullmatch(p.name)]
        if custom:
            # Checkpoints from before the TrainState lived in JSON only also hold it as custom_checkpoint_0.pkl;
            # accelerate insists on loading one per registered object, so load through a view without them.
            with tempfile.TemporaryDirectory(prefix="checkpoint-view-") as view:
                for path in folder.iterdir():
                    if path not in custom:
                        os.symlink(path.resolve(), Path(view) / path.name)
                accelerator.load_state(view)
        else:
            accelerator.load_state(str(folder))
        state.load_state_dict(TrainState.from_json((folder / TRAIN_STATE).read_text()))
    except Exception as error:  # say which checkpoint and what to do instead of a bare traceback
        earlier = [p for p in list_checkpoints(folder.parent) if p.name < folder.name]
        instead = f"resume: {earlier[-1]} (the previous checkpoint)" if earlier else "resume: PATH to an earlier checkpoint"
        raise CheckpointError(
            f"could not load checkpoint {folder}: {type(error).__name__}: {error}. Fix: {instead}, or resume: never to "
            "start over"
        ) from error


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
