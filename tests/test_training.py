"""The shared training loop: accumulation and multi-process equivalences, exact resume, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import list_checkpoints, resolve_resume
from pipeline.training import lr_multiplier

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny  # noqa: E402

SCRIPT = Path(__file__).parent / "train_tiny.py"


def run_in_process(output_dir: Path, **options) -> tuple[dict, dict[str, torch.Tensor]]:
    report = train_tiny.run({"output_dir": str(output_dir), **options})
    return report, torch.load(output_dir / "weights-rank0.pt")


def run_subprocess(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tolerance)


# ---------------------------------------------------------------------------------------------- schedule
def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    kwargs = dict(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    cosine = [lr_multiplier(s, schedule="cosine", **kwargs) for s in range(21)]
    assert cosine[0] > 0 and all(a < b for a, b in zip(cosine[:4], cosine[1:5]))  # warmup rises, never 0
    assert cosine[4] == pytest.approx(1.0) and cosine[20] == pytest.approx(0.1)
    assert cosine[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    linear = [lr_multiplier(s, schedule="linear", **kwargs) for s in range(21)]
    assert linear[12] == pytest.approx(0.55) and linear[20] == pytest.approx(0.1)
    assert lr_multiplier(15, schedule="constant", **kwargs) == 1.0


# ---------------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_4x2_equals_batch_8(tmp_path: Path) -> None:
    """Micro-batches hold different numbers of target tokens: only Σloss/Σtargets over the window matches."""
    accumulated, w_acc = run_in_process(tmp_path / "acc", batch_size=2, gradient_accumulation_steps=4, max_steps=4)
    single, w_single = run_in_process(tmp_path / "one", batch_size=8, gradient_accumulation_steps=1, max_steps=4)
    assert accumulated["seen"][:32] == single["seen"][:32]  # the same samples in the same steps
    assert accumulated["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert_same_weights(w_acc, w_single, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_a_stop_ends_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    full, w_full = run_in_process(tmp_path / "full", max_steps=8)
    stopped = tmp_path / "stopped"
    run_in_process(stopped, max_steps=8, save_every=3, keep_last=5)
    # keep only the step-3 checkpoint, as if the run had died between step 3 and step 6
    for checkpoint in list_checkpoints(stopped / "checkpoints")[1:]:
        shutil.rmtree(checkpoint)
    assert [p.name for p in list_checkpoints(stopped / "checkpoints")] == ["checkpoint-00000003"]
    resumed, w_resumed = run_in_process(stopped, max_steps=8, save_every=3, resume="auto")
    # it really resumed: only steps 4-8 drew data (plus the loader's one-batch look-ahead), in the original order
    assert resumed["seen"][: 5 * 4] == full["seen"][3 * 4: 8 * 4] and len(resumed["seen"]) <= 6 * 4
    assert_same_weights(w_resumed, w_full, rtol=0, atol=0)
    logged = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))  # steps 4..8 logged once, not twice
    assert [r["loss"] for r in logged] == full["losses"]
    assert [r["lr"] for r in logged] == full["lrs"]


def test_max_time_ends_on_the_budget_and_the_schedule_decays_to_its_end(tmp_path: Path) -> None:
    """A fake clock (one second per step) makes the budget's decisions exact: 12 s is 12 steps of the 40 allowed."""
    timed, w_timed = run_in_process(tmp_path / "timed", max_steps=40, max_time=12, fake_clock=True)
    logged = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert [r["train_seconds"] for r in logged] == [float(step) for step in range(1, 13)]

    def schedule(total: int) -> list[float]:
        return [3e-3 * lr_multiplier(k, warmup_steps=2, total_steps=total, schedule="cosine", min_lr_ratio=0.1)
                for k in range(12)]

    assert timed["lrs"] == pytest.approx(schedule(12), rel=1e-12)  # decayed to the end of the budget ...
    assert timed["lrs"][-1] < 0.5 * schedule(40)[-1]  # ... not of max_steps, which it would still be far from
    untimed, _ = run_in_process(tmp_path / "untimed", max_steps=40, fake_clock=True)
    assert len(untimed["lrs"]) == 40 and untimed["lrs"] == pytest.approx(schedule(40) + untimed["lrs"][12:])

    # A resumed run spends what is left of the same budget, and ends exactly like the uninterrupted one.
    stopped = tmp_path / "stopped"
    run_in_process(stopped, max_steps=40, max_time=12, fake_clock=True, save_every=4, keep_last=5)
    for checkpoint in list_checkpoints(stopped / "checkpoints")[1:]:
        shutil.rmtree(checkpoint)
    assert json.loads((stopped / "checkpoints" / "checkpoint-00000004" / "train_state.json").read_text())[
        "train_seconds"] == 4.0
    resumed, w_resumed = run_in_process(stopped, max_steps=40, max_time=12, fake_clock=True, save_every=4,
                                        resume="auto")
    assert len(resumed["seen"]) <= 9 * 4  # it resumed: steps 5..12 drew data (plus one batch of look-ahead)
    assert resumed["losses"] == timed["losses"] and resumed["lrs"] == timed["lrs"]
    assert_same_weights(w_resumed, w_timed, rtol=0, atol=0)


def test_resume_after_sigkill_in_a_subprocess(tmp_path: Path) -> None:
    full, w_full = run_in_process(tmp_path / "full", max_steps=7, dropout=0.1)
    out = tmp_path / "killed"
    options = {"output_dir": str(out), "max_steps": 7, "save_every": 2, "keep_last": 1, "dropout": 0.1}
    killed = run_subprocess([sys.executable, str(SCRIPT), json.dumps({**options, "kill_at_step": 5})])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000004"]
    resumed = run_subprocess([sys.executable, str(SCRIPT), json.dumps({**options, "resume": "auto"})])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(torch.load(out / "weights-rank0.pt"), w_full, rtol=0, atol=0)  # dropout RNG restored too
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == full["losses"]


def test_a_checkpoint_interrupted_while_being_written_is_never_resumed(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    run_in_process(out, max_steps=2, save_every=2)
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-00000002"]

    # crash inside save_state while writing the step-4 checkpoint
    from accelerate import Accelerator

    original = Accelerator.save_state

    def save_then_crash(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Accelerator, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(out, max_steps=4, save_every=4, resume="auto")
    monkeypatch.undo()
    assert (checkpoints / ".tmp-checkpoint-00000004").is_dir()  # the half-written one is there...
    assert resolve_resume("auto", checkpoints).name == "checkpoint-00000002"  # ...but never picked up
    report, _ = run_in_process(out, max_steps=4, save_every=4, resume="auto")
    assert not (checkpoints / ".tmp-checkpoint-00000004").exists()
    assert [p.name for p in list_checkpoints(checkpoints)][-1] == "checkpoint-00000004"


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    run_in_process(tmp_path, max_steps=6, save_every=1, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000005", "checkpoint-00000006"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-00000006" / "train_state.json").read_text())
    assert state["step"] == 6 and state["batches_in_epoch"] == 6


def test_resume_from_a_path_that_is_not_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), tmp_path / "checkpoints")


# ---------------------------------------------------------------------------------------------- two CPU ranks
def _accelerate_launch(num_processes: int, options: dict, use_cpu: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {"ACCELERATE_USE_CPU": "1"} if use_cpu else {"ACCELERATE_USE_CPU": "0", "CUDA_VISIBLE_DEVICES": ""}
    return run_subprocess([*launcher, str(SCRIPT), json.dumps(options)], env_extra=env)


def test_two_cpu_ranks_train_like_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    single, w_single = run_in_process(tmp_path / "single", batch_size=4, max_steps=5, save_every=5)
    out = tmp_path / "ddp"
    result = _accelerate_launch(2, {"output_dir": str(out), "batch_size": 2, "max_steps": 5, "save_every": 5,
                                    "expected_processes": 2})
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((out / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world"] for r in reports} == {2}
    # ranks see disjoint data whose union, step by step, is the single process's batch
    consumed = [r["seen"][: 5 * 2] for r in reports]
    assert not set(consumed[0]) & set(consumed[1])
    for step in range(5):
        union = set(consumed[0][2 * step: 2 * step + 2]) | set(consumed[1][2 * step: 2 * step + 2])
        assert union == set(single["seen"][4 * step: 4 * step + 4])
    # the loss curve and learning rates match; only rank 0 logs and checkpoints
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(single["losses"], rel=1e-4)
    assert [r["lr"] for r in logged] == pytest.approx(single["lrs"], rel=1e-9)
    assert len(logged) == 5  # not one line per rank
    assert_same_weights(torch.load(out / "weights-rank0.pt"), w_single, rtol=1e-4, atol=1e-5)
    assert_same_weights(torch.load(out / "weights-rank1.pt"), torch.load(out / "weights-rank0.pt"), rtol=0, atol=0)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000005"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_launch_whose_world_differs_from_the_request_is_refused(tmp_path: Path) -> None:
    """`--multi_gpu` without GPUs or ACCELERATE_USE_CPU starts two unconnected rank-0 processes (accelerate >= 1.13;
    older releases connect them into a real CPU world of 2, which is then a correct run, not a refusal)."""
    result = _accelerate_launch(2, {"output_dir": str(tmp_path), "max_steps": 1}, use_cpu=False)
    if result.returncode == 0:  # accelerate < 1.13: it must really have been one world of two distinct ranks
        reports = [json.loads((tmp_path / f"report-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)], reports
        return
    assert "asked for 2 processes but this is a world of 1" in result.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_bits_per_byte_is_the_text_targets_loss_over_their_bytes(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from pipeline.training import evaluate_lm
    from accelerate import Accelerator

    model = train_tiny.model().eval()
    rows = train_tiny.dataset()[:6]
    loader = DataLoader(rows, batch_size=4, collate_fn=lambda ex: {
        "input_ids": torch.stack([e["input_ids"] for e in ex]), "labels": torch.stack([e["labels"] for e in ex])})
    byte_lengths = torch.randint(1, 4, (train_tiny.VOCAB,), generator=torch.Generator().manual_seed(0))
    byte_lengths[3:9] = 0  # zero-byte ids, like special tokens (a closing EOS): targets for the loss, not for bpb
    metrics = evaluate_lm(model, loader, Accelerator(cpu=True), byte_lengths)
    nll = tokens = text_nll = n_bytes = zero_byte_targets = 0.0
    for row in rows:  # by hand, one sequence at a time
        logits = model(row["input_ids"][None]).logits[0, :-1]
        for t, target in enumerate(row["labels"][1:].tolist()):
            if target != -100:
                loss = -torch.log_softmax(logits[t], -1)[target].item()
                nll += loss
                tokens += 1
                if byte_lengths[target] > 0:
                    text_nll += loss
                    n_bytes += byte_lengths[target].item()
                else:
                    zero_byte_targets += 1
    assert zero_byte_targets > 0 and text_nll < nll  # the two conventions differ on these rows
    assert metrics["eval_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert metrics["eval_bits_per_byte"] == pytest.approx(text_nll / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["eval_bits_per_byte"] != pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-3)
    assert metrics["eval_tokens"] == tokens


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path: Path) -> None:
    full, w_full = run_in_process(tmp_path / "fp32", max_steps=4)
    half, w_half = run_in_process(tmp_path / "bf16", max_steps=4, mixed_precision="bf16")
    assert all(v.dtype == torch.float32 for v in w_half.values())  # autocast computes in bf16, keeps fp32 weights
    assert half["losses"] == pytest.approx(full["losses"], rel=2e-2)  # bf16 rounding, not a different run
    assert half["losses"] != full["losses"]  # ...but bf16 really was used


def test_metrics_reach_tensorboard_as_well_as_the_jsonl_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_in_process(tmp_path, max_steps=3, trackers=["jsonl", "tensorboard"])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])


def test_fsdp2_sharding_of_quill_trains_like_one_process(tmp_path: Path) -> None:
    """fully_shard per decoder block plus a root unit holding the tied embedding/lm_head (recipes/accelerate/fsdp.yaml)
    gives the losses and weights of unsharded training on the same global batch."""
    result = run_subprocess([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).parent / "fsdp_tiny.py"), str(tmp_path)], timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    model = train_tiny.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows, losses = train_tiny.dataset(), []
    for step in range(3):
        batch = rows[step * 4:(step + 1) * 4]
        labels = torch.stack([r["labels"] for r in batch])
        loss = model(torch.stack([r["input_ids"] for r in batch]), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert json.loads((tmp_path / "fsdp-losses.json").read_text()) == pytest.approx(losses, rel=1e-5)
    sharded = torch.load(tmp_path / "fsdp-weights.pt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml"))
    + [Path(__file__).resolve().parents[1] / "accelerate_config.yaml"], ids=lambda p: p.name)
def test_accelerate_configs_are_valid_for_accelerate(config: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1 and loaded.mixed_precision in ("no", "bf16", "fp16")
    if "fsdp" in config.name:
        assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "QuillDecoderLayer"
        assert loaded.fsdp_config["fsdp_version"] == 2
    if "deepspeed" in config.name:
        assert loaded.deepspeed_config["zero_stage"] in (2, 3)


def test_resuming_with_another_batch_layout_is_refused(tmp_path: Path) -> None:
    run_in_process(tmp_path, max_steps=2, save_every=2)
    with pytest.raises(ValueError, match="batch_size"):
        run_in_process(tmp_path, max_steps=4, batch_size=8, resume="auto")


def test_resume_never_moves_earlier_checkpoints_aside_instead_of_mixing_runs(tmp_path: Path) -> None:
    run_in_process(tmp_path, max_steps=6, save_every=6)
    run_in_process(tmp_path, max_steps=2, save_every=1, keep_last=1, resume="never")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002"]
    (aside,) = tmp_path.glob("checkpoints.before-*")
    assert [p.name for p in list_checkpoints(aside)] == ["checkpoint-00000006"]
