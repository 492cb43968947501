"""Faults of the training loop and its checkpoints: a diverging run stops before the bad step and saves nothing
non-finite; a damaged checkpoint is detected, set aside and resumed around; resuming runs no pickle; interrupted
saves and metrics.jsonl stay tidy."""

from __future__ import annotations

import json
import pickle
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from pipeline.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    list_checkpoints,
    resolve_resume,
    write_manifest,
)
from pipeline.training import MetricsLog, NonFiniteError, plot_loss_curve

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny


def run_in_process(output_dir: Path, **options) -> tuple[dict, dict[str, torch.Tensor]]:
    report = train_tiny.run({"output_dir": str(output_dir), **options})
    return report, torch.load(output_dir / "weights-rank0.pt")


def names(checkpoint_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(checkpoint_dir)]


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl read by a strict JSON parser: NaN / Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


# ---------------------------------------------------------------------------------------------- non-finite guard
def test_a_nan_loss_stops_the_run_before_its_step_and_names_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError) as raised:
        run_in_process(tmp_path, max_steps=8, save_every=2, keep_last=0, nan_logits_at=[5])
    message = str(raised.value)
    assert "diverged at step 5" in message and "the loss is nan" in message
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'checkpoint-00000004'}" in message
    assert "lower learning_rate" in message and "max_grad_norm" in message and "max_skipped_steps" in message
    # nothing of step 5 or later was saved: no newer checkpoint, no final weights, finite checkpoints only
    assert names(tmp_path / "checkpoints") == ["checkpoint-00000002", "checkpoint-00000004"]
    assert not (tmp_path / "weights-rank0.pt").exists()
    assert all_finite(load_file(tmp_path / "checkpoints" / "checkpoint-00000004" / "model.safetensors"))
    assert [r["step"] for r in strict_records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_diverging_learning_rate_is_stopped_instead_of_training_on_nan(tmp_path: Path) -> None:
    """The campaign's learning_rate=1e5: the gradient norm turns NaN while the loss is still finite."""
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+: .*gradient norm is nan") as raised:
        run_in_process(tmp_path, max_steps=8, learning_rate=1e5)
    assert "Last good checkpoint: none yet" in str(raised.value) and "(now 100000)" in str(raised.value)
    assert not list_checkpoints(tmp_path / "checkpoints") and not (tmp_path / "weights-rank0.pt").exists()


def test_an_infinite_gradient_is_caught_without_clipping(tmp_path: Path) -> None:
    """max_grad_norm: null used to skip the norm altogether; the loss is finite here, only a gradient is not."""
    with pytest.raises(NonFiniteError, match="diverged at step 3: the loss is [0-9.]+ and the gradient norm is inf") as raised:
        run_in_process(tmp_path, max_steps=4, max_grad_norm=None, inf_grad_at=[3])
    assert "max_grad_norm: 1.0 (gradient clipping is off)" in str(raised.value)


def test_bad_steps_within_max_skipped_steps_are_skipped_counted_and_logged_as_json(tmp_path: Path) -> None:
    _, weights = run_in_process(tmp_path, max_steps=6, save_every=1, keep_last=0, nan_logits_at=[2, 4],
                                     max_skipped_steps=2)
    assert all_finite(weights)
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 2, 2]
    assert [r["loss"] is None for r in records] == [False, True, False, True, False, False]  # null, not NaN
    # a skipped step changes nothing: same weights as the step before, and the schedule does not advance
    checkpoints = tmp_path / "checkpoints"
    for before, skipped in (("checkpoint-00000001", "checkpoint-00000002"), ("checkpoint-00000003", "checkpoint-00000004")):
        a, b = load_file(checkpoints / before / "model.safetensors"), load_file(checkpoints / skipped / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert records[2]["lr"] == records[1]["lr"] and records[4]["lr"] == records[3]["lr"]
    assert json.loads((checkpoints / "checkpoint-00000006" / "train_state.json").read_text())["skipped_steps"] == 2
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png") == tmp_path / "curve.png"


def test_one_bad_step_more_than_max_skipped_steps_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="diverged at step 5.*2 bad step\\(s\\) were skipped before"):
        run_in_process(tmp_path, max_steps=6, nan_logits_at=[2, 4, 5], max_skipped_steps=2)


def test_weights_that_overflow_are_never_checkpointed(tmp_path: Path) -> None:
    def overflow(optimizer, args, kwargs) -> None:  # an update that lands on inf (the loss and gradients were fine)
        if optimizer.state[optimizer.param_groups[0]["params"][0]]["step"] == 3:
            optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))

    handle = register_optimizer_step_post_hook(overflow)
    try:
        with pytest.raises(NonFiniteError, match="after step 3 the weights hold NaN/inf"):
            run_in_process(tmp_path, max_steps=4, save_every=3)
    finally:
        handle.remove()
    assert not list_checkpoints(tmp_path / "checkpoints")


def test_fp16_loss_scaling_still_skips_overflowing_steps_itself(tmp_path: Path, monkeypatch) -> None:
    """accelerate keeps no GradScaler on CPU: give the run a real one, as on a GPU with mixed_precision fp16. An inf
    gradient is the scaler's to skip (not an error, not counted); a NaN loss is ours to count, and the scaler's
    step state is closed so the next step unscales again."""
    original = train_tiny.build_accelerator

    def with_scaler(*args, **kwargs):
        accelerator = original(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return accelerator

    monkeypatch.setattr(train_tiny, "build_accelerator", with_scaler)
    _, weights = run_in_process(tmp_path, max_steps=5, inf_grad_at=[2], nan_logits_at=[4], max_skipped_steps=1)
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 0, 0, 1, 1]
    assert records[2]["lr"] == records[1]["lr"]  # the scaler's skip did not advance the schedule either
    assert all_finite(weights)


def test_a_diverged_pretraining_is_not_saved_or_marked_complete(tmp_path: Path) -> None:
    from pipeline.recipe import recipe_from_dict
    from pipeline.runner import run_recipe

    recipe = {
        "output_dir": str(tmp_path), "seed": 0, "tokenizer": {"vocab_size": 300},
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32},
        "data": {"sources": [{"name": "shakespeare", "max_documents": 12}], "block_size": 32,
                 "validation_fraction": 0.1},
        "pretrain": {"max_steps": 8, "batch_size": 4, "learning_rate": 1e5, "warmup_steps": 0, "log_every": 1,
                     "eval_every": 100, "save_every": 100},
        "finetune": {"enabled": False}, "evaluate": {"enabled": False},
    }
    with pytest.raises(NonFiniteError, match="diverged at step"):
        run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    pretrain = tmp_path / "pretrain"
    assert json.loads((pretrain / "stage.json").read_text())["complete"] is False
    assert not (pretrain / "model.safetensors").exists() and not list_checkpoints(pretrain / "checkpoints")


# ---------------------------------------------------------------------------------------------- integrity
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4, and the weights of an uninterrupted 4-step run beside it."""
    out = tmp_path_factory.mktemp("two-checkpoints")
    run_in_process(out / "run", max_steps=4, save_every=2, keep_last=0)
    return out / "run"


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def overwrite_tensor_bytes(path: Path) -> None:
    """Garbage of the same size over the tensor data (0xFF bytes are NaN floats), the header left intact: a reader
    that does not check digests loads it without complaint."""
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as handle:
        handle.seek(header)
        handle.write(b"\xff" * (path.stat().st_size - header))


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda c: overwrite_tensor_bytes(c / "model.safetensors"),
     "model.safetensors does not match the sha256 digest recorded when it was written"),
    (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin has .* bytes, .* were written \\(truncated\\)"),
    (lambda c: (c / "scheduler.bin").unlink(), "scheduler.bin is missing"),
    (lambda c: (c / "train_state.json").write_text("{"), "train_state.json has 1 bytes, .* were written"),
    (lambda c: (c / "manifest.json").write_text("[1"), "manifest.json is unreadable"),
    (lambda c: ((c / "manifest.json").unlink(missing_ok=True), (c / "train_state.json").write_text("{")),
     "train_state.json is unreadable"),
], ids=["overwritten", "truncated", "missing", "train-state", "manifest", "train-state-without-manifest"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    two_checkpoints: Path, tmp_path: Path, capsys, damage, reason: str
) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    checkpoints = run / "checkpoints"
    damage(checkpoints / "checkpoint-00000004")
    chosen = resolve_resume("auto", checkpoints)
    assert chosen == checkpoints / "checkpoint-00000002"
    printed = capsys.readouterr().out
    assert re.search(f"checkpoint checkpoint-00000004 is damaged: {reason}", printed), printed
    assert f"Moved aside to {checkpoints / 'damaged-checkpoint-00000004'}" in printed
    assert f"resuming from {chosen}" in printed
    # kept, not deleted, and out of the checkpoint pattern (keep_last never counts it)
    assert (checkpoints / "damaged-checkpoint-00000004").is_dir() and names(checkpoints) == ["checkpoint-00000002"]


def test_a_run_resumed_around_a_damaged_checkpoint_ends_like_an_uninterrupted_one(
    two_checkpoints: Path, tmp_path: Path, capsys
) -> None:
    _, uninterrupted = run_in_process(tmp_path / "full", max_steps=6)
    run = copy_run(two_checkpoints, tmp_path)
    overwrite_tensor_bytes(run / "checkpoints" / "checkpoint-00000004" / "model.safetensors")
    garbage = (run / "checkpoints" / "checkpoint-00000004" / "model.safetensors").read_bytes()
    _, resumed = run_in_process(run, max_steps=6, save_every=2, keep_last=2, resume="auto")
    assert "resumed from" in capsys.readouterr().out
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert names(run / "checkpoints") == ["checkpoint-00000004", "checkpoint-00000006"]  # rewritten, sound
    assert (run / "checkpoints" / "damaged-checkpoint-00000004" / "model.safetensors").read_bytes() == garbage


def test_on_damaged_checkpoint_stop_refuses_and_changes_nothing(two_checkpoints: Path, tmp_path: Path) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    truncate(run / "checkpoints" / "checkpoint-00000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint-00000004 is damaged: model.safetensors has .* \\(truncated\\)"
                       ".*on_damaged_checkpoint: previous.*resume: never"):
        run_in_process(run, max_steps=6, save_every=2, resume="auto", on_damaged_checkpoint="stop")
    assert names(run / "checkpoints") == ["checkpoint-00000002", "checkpoint-00000004"]


def test_an_explicit_resume_path_to_a_damaged_checkpoint_is_refused(two_checkpoints: Path, tmp_path: Path) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    damaged = run / "checkpoints" / "checkpoint-00000002"
    overwrite_tensor_bytes(damaged / "model.safetensors")
    with pytest.raises(CheckpointError, match="refusing resume=.*checkpoint-00000002.*model.safetensors does not match"):
        run_in_process(run, max_steps=6, resume=str(damaged))
    assert damaged.is_dir()


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(
    two_checkpoints: Path, tmp_path: Path
) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    for checkpoint in list_checkpoints(run / "checkpoints"):
        truncate(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="no sound checkpoint left.*resume: never"):
        resolve_resume("auto", run / "checkpoints", say=lambda _: None)


def test_a_checkpoint_from_before_manifests_resumes_exactly_with_a_warning(tmp_path: Path, capsys) -> None:
    """Older checkpoints have no manifest and hold the TrainState also as accelerate's custom_checkpoint_0.pkl."""
    _, uninterrupted = run_in_process(tmp_path / "full", max_steps=6)
    run = tmp_path / "old"
    run_in_process(run, max_steps=6, save_every=3)
    shutil.rmtree(run / "checkpoints" / "checkpoint-00000006")  # as if killed between step 3 and step 6
    checkpoint = run / "checkpoints" / "checkpoint-00000003"
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    state = json.loads((checkpoint / "train_state.json").read_text())
    torch.save({**state, "best_eval_loss": float("inf")}, checkpoint / "custom_checkpoint_0.pkl")
    _, resumed = run_in_process(run, max_steps=6, resume="auto")
    printed = capsys.readouterr().out
    assert f"warning: {checkpoint} has no manifest.json" in printed and "resumed from" in printed
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_truncated_file_in_a_checkpoint_without_manifest_falls_back_too(
    two_checkpoints: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-00000004"
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    truncate(checkpoint / "model.safetensors")
    run_in_process(run, max_steps=6, save_every=2, resume="auto")
    printed = capsys.readouterr().out
    assert "checkpoint-00000004 is damaged: model.safetensors is unreadable" in printed
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-00000002'} at step 2" in printed


# ---------------------------------------------------------------------------------------------- no pickle runs
class Payload:
    """Unpickling this creates `marker` (a stand-in for any code a crafted file could run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("kind", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                                  "sampler.bin"])
@pytest.mark.parametrize("manifest", ["regenerated", "absent"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(
    two_checkpoints: Path, tmp_path: Path, kind: str, manifest: str
) -> None:
    """The digest check would catch a swapped file; with the manifest rewritten to match it (or absent, as in older
    checkpoints) the weights_only rule must hold on its own."""
    run = copy_run(two_checkpoints, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-00000004"
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), checkpoint / kind)
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    if manifest == "regenerated":
        write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=f"refusing resume=.*{kind} would run code when loaded"):
        resolve_resume(str(checkpoint), run / "checkpoints")
    assert not marker.exists()


def sharded_checkpoint(folder: Path, extra: object = 3) -> Path:
    """A checkpoint folder holding FSDP-style sharded state (torch.distributed.checkpoint, saved in one process):
    tensors plus a non-tensor entry, which DCP stores pickled and loads with ``weights_only=False``."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"step": 2}))
    state = {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, "extra": extra}
    dcp.save(state, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
    return folder


def test_a_sharded_fsdp_state_is_checked_before_torch_unpickles_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sound = sharded_checkpoint(tmp_path / "sound")
    assert checkpoint_problem(sound) is None  # a real .metadata and a plain entry pass
    entry = sharded_checkpoint(tmp_path / "entry", extra=Payload(marker))
    assert "the entry 'extra' would run code when loaded" in checkpoint_problem(entry)
    crafted = sharded_checkpoint(tmp_path / "metadata")
    (crafted / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert "pytorch_model_fsdp_0/.metadata would run code when loaded (Unsupported global: io.open)" in (
        checkpoint_problem(crafted))
    assert not marker.exists()


def test_resume_auto_steps_around_a_crafted_pickle_without_running_it(
    two_checkpoints: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(two_checkpoints, tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint-00000004"
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), checkpoint / "custom_checkpoint_0.pkl")
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    run_in_process(run, max_steps=6, save_every=2, resume="auto")
    printed = capsys.readouterr().out
    assert "checkpoint-00000004 is damaged: custom_checkpoint_0.pkl would run code when loaded" in printed
    assert "Unsupported global" in printed and "resumed from" in printed and "checkpoint-00000002" in printed
    assert not marker.exists()


def test_new_checkpoints_hold_the_train_state_as_json_only(two_checkpoints: Path) -> None:
    checkpoint = two_checkpoints / "checkpoints" / "checkpoint-00000004"
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
    state = json.loads((checkpoint / "train_state.json").read_text())  # strict JSON: no Infinity
    assert state["step"] == 4 and state["best_eval_loss"] is None
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in checkpoint.iterdir()} - {"manifest.json"}


# ---------------------------------------------------------------------------------------------- interrupted saves
def kill_after_rename(monkeypatch) -> None:
    """Die right after a save's rename is made durable, before anything else (pruning) happens."""
    from pipeline import checkpoints

    original = checkpoints._fsync_dir

    def die(folder: Path) -> None:
        original(folder)
        raise KeyboardInterrupt("killed between rename and pruning")

    monkeypatch.setattr(checkpoints, "_fsync_dir", die)


def test_keep_last_holds_again_after_a_kill_between_the_last_rename_and_pruning(tmp_path: Path, monkeypatch) -> None:
    run_in_process(tmp_path, max_steps=2, save_every=2, keep_last=1)
    kill_after_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tmp_path, max_steps=4, save_every=2, keep_last=1, resume="auto")
    monkeypatch.undo()
    assert names(tmp_path / "checkpoints") == ["checkpoint-00000002", "checkpoint-00000004"]
    run_in_process(tmp_path, max_steps=4, save_every=2, keep_last=1, resume="auto")  # nothing left to train
    assert names(tmp_path / "checkpoints") == ["checkpoint-00000004"]


def test_a_replaced_checkpoint_left_by_a_kill_is_cleaned_up(tmp_path: Path, monkeypatch) -> None:
    """Saving a step again (resumed from an earlier checkpoint) keeps the old copy as .old-* until the new one is in."""
    run_in_process(tmp_path, max_steps=4, save_every=2, keep_last=3)
    checkpoints = tmp_path / "checkpoints"
    kill_after_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tmp_path, max_steps=4, save_every=4, keep_last=3, resume=str(checkpoints / "checkpoint-00000002"))
    monkeypatch.undo()
    assert (checkpoints / ".old-checkpoint-00000004").is_dir()
    run_in_process(tmp_path, max_steps=4, save_every=4, keep_last=3, resume="auto")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004"]


def test_a_checkpoint_whose_replacement_was_interrupted_is_restored_not_lost(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    run_in_process(tmp_path, max_steps=4, save_every=2, keep_last=3)
    checkpoints = tmp_path / "checkpoints"
    original = os.replace

    def die_before_publishing(src, dst) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed between the two renames")
        original(src, dst)

    monkeypatch.setattr(os, "replace", die_before_publishing)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tmp_path, max_steps=4, save_every=4, keep_last=3, resume=str(checkpoints / "checkpoint-00000002"))
    monkeypatch.undo()
    assert names(checkpoints) == ["checkpoint-00000002"]  # step 4 only survives as .old-checkpoint-00000004
    assert resolve_resume("auto", checkpoints).name == "checkpoint-00000002"
    capsys.readouterr()
    run_in_process(tmp_path, max_steps=4, save_every=4, keep_last=3, resume="auto")
    printed = capsys.readouterr().out
    assert f"restored {checkpoints / 'checkpoint-00000004'}" in printed and "at step 4" in printed
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004"]


# ---------------------------------------------------------------------------------------------- metrics.jsonl
def test_metrics_log_writes_non_finite_numbers_as_null_and_reads_old_nan_lines(tmp_path: Path) -> None:
    from accelerate import Accelerator

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 3.0}\n')  # as older runs wrote it
    log = MetricsLog(Accelerator(cpu=True), path, resume_step=2)
    log.log({"step": 3, "loss": float("nan"), "eval_perplexity": float("inf"), "lr": 1e-3})
    assert strict_records(path) == [{"step": 1, "loss": None}, {"step": 2, "loss": 3.0},
                                    {"step": 3, "loss": None, "eval_perplexity": None, "lr": 1e-3}]
    assert plot_loss_curve(path, tmp_path / "curve.png") == tmp_path / "curve.png"
