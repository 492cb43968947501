"""The training loop shared by pretraining and fine-tuning, on `accelerate.Accelerator`.

One optimizer step consumes `gradient_accumulation_steps` micro-batches on every rank. The loss of the step is
Σ token losses / Σ target tokens over the whole window and all ranks, so accumulation 4 × batch 2 equals batch 8
and ranks with few target tokens are not over-weighted (transformers #34191, #34242).

Checkpoints (`pipeline.checkpoints`) are written every `save_every` steps, verified before resume, and a resumed run
replays the same data order and ends with the same weights and logged losses as an uninterrupted one.

A NaN/inf loss or gradient norm stops the run before the optimizer step (`NonFiniteGuard`), so nothing non-finite
is ever applied, checkpointed or returned; `max_skipped_steps` lets a few such steps be skipped instead.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast,
    broadcast_object_list,
    set_seed,
)
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from pipeline.checkpoints import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    recover_interrupted_saves,
    resolve_resume,
    save_checkpoint,
    tidy_checkpoints,
)
from pipeline.scoring import score_batches

PROCESS_GROUP_TIMEOUT = timedelta(hours=2)
LOG_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------
def build_accelerator(cfg: Any, output_dir: Path, expected_processes: int | None = None) -> Accelerator:
    """The Accelerator for a run. Accumulation goes through accelerate (so DeepSpeed sees it too) but never syncs
    with the end of the dataloader: our windows always hold exactly `gradient_accumulation_steps` micro-batches."""
    # Accelerate keeps mixed precision and accumulation in process-wide singletons; stages (and tests) differ in
    # both, so each Accelerator starts from a clean state. The distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    trackers = [t for t in cfg.trackers if t != "jsonl"]
    accelerator = Accelerator(
        # Ranks wait in a barrier while the main process tokenizes a corpus or trains the tokenizer; NCCL's default
        # 10-minute watchdog would kill a real run there. Applies when the process group is first created.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # Seeded sampler: the shuffled order is a function of (seed, epoch), so a resumed run sees the same data.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        project_dir=str(output_dir),
        # The scheduler is stepped once per optimizer step, not once per process (accelerate #2926).
        step_scheduler_with_optimizer=False,
    )
    check_world(accelerator, expected_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed clips inside its step; "auto" in its config would mean 1.0 whatever the recipe says.
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm or 0.0
    return accelerator


def check_world(accelerator: Accelerator, expected_processes: int | None = None) -> None:
    """Refuse a launch whose world is not the one asked for, before any compute.

    `accelerate launch --multi_gpu` on a machine without GPUs starts N processes that are each a world of one, and
    `accelerate launch --cpu --num_processes N` silently starts one process (accelerate #2741)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    expected = expected_processes or launched
    if accelerator.num_processes != expected or launched not in (1, accelerator.num_processes):
        raise RuntimeError(
            f"asked for {expected} processes but this is a world of {accelerator.num_processes} "
            f"(process {accelerator.process_index}, WORLD_SIZE={launched}). On CPUs launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m pipeline run RECIPE`; "
            "`--cpu --num_processes N` starts one process, and `--multi_gpu` without ACCELERATE_USE_CPU=1 starts N "
            "unconnected rank-0 processes."
        )


def build_optimizer(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and norm gains are not decayed (they set scale, not capacity)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=device.type == "cuda",
    )


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warmup from 0, then cosine or linear decay to `min_lr_ratio` of the peak at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


class TimeBudget:
    """``max_time`` as a number of optimizer steps, re-estimated from the measured pace as training goes, so that the
    schedule decays to the end of the time budget rather than of ``max_steps``; ``total_steps`` drops to the current
    step once the time is spent. Every rank takes the main process's clock (broadcast), so all agree on the schedule
    and on the last step: alone it checks every step, with several ranks every ``every``-th (a sync point anyway).
    Without ``max_time`` it only keeps ``state.train_seconds``, and ``total_steps`` stays ``max_steps``."""

    clock = staticmethod(time.perf_counter)  # seconds; tests put a fake clock here

    def __init__(self, max_time: float | None, max_steps: int) -> None:
        self.max_time, self.max_steps, self.total_steps = max_time, max_steps, max_steps

    def begin(self, state: TrainState, accelerator: Accelerator, every: int) -> None:
        """Start the clock, once a resumed state is loaded: its ``train_seconds`` count against the budget."""
        self._state, self._accelerator = state, accelerator
        self._every = 1 if accelerator.num_processes == 1 else every
        self._clock, self._before, self._first_step = self.clock(), state.train_seconds, state.step
        if self.max_time is not None and state.step > 0:  # resumed: the pace so far gives the first estimate
            self._estimate(state.train_seconds, state.train_seconds / state.step)

    def step_done(self) -> None:
        """After each optimizer step: record the time spent, and re-estimate the total where it is due."""
        step = self._state.step
        self._state.train_seconds = self._before + self.clock() - self._clock
        if self.max_time is None or step % self._every:
            return
        spent = self._state.train_seconds
        if self._accelerator.num_processes > 1:
            clock = torch.tensor([spent], dtype=torch.float64, device=self._accelerator.device)
            spent = float(broadcast(clock, from_process=0).item())
        self._estimate(spent, (spent - self._before) / max(step - self._first_step, 1))

    def _estimate(self, spent: float, seconds_per_step: float) -> None:
        step, remaining = self._state.step, self.max_time - spent
        if remaining <= 0 or seconds_per_step <= 0:
            self.total_steps = step
            return
        self.total_steps = min(self.max_steps, step + int(remaining / seconds_per_step))


@dataclass
class TrainResult:
    model: torch.nn.Module  # as prepared by accelerate (unwrap it with accelerator.unwrap_model)
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)  # the JSONL records of this run
    final_eval: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Append-only JSONL of every logged step (main process only), mirrored to accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int):
        self.accelerator = accelerator
        self.path = path
        self.records: list[dict[str, Any]] = []
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A killed run may have logged steps after its last checkpoint; the resumed run logs them again.
            kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= resume_step] if resume_step else []
            path.write_text("".join(_json_line(r) for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(_json_line(record))
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record["step"])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records; a non-finite number is null (older logs wrote NaN, which Python's json also reads)."""
    if not path.is_file():
        return []
    return [_json_safe(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity as null: JSON has no such numbers (`json.dumps` would write the non-standard NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(_json_safe(record), allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------------------
def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens of a causal-LM micro-batch: labels are shifted inside the loss, so position 0 never is one."""
    labels = batch["labels"]
    if labels.ndim == 1:  # sequence classification: one target per example
        return torch.tensor(labels.numel(), device=labels.device)
    return (labels[:, 1:] != -100).sum()


def evaluate_lm(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    byte_lengths: torch.Tensor | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte, as `pipeline.scoring` defines them: loss and perplexity per
    target token, zero-byte special targets (a document's closing EOS) included; bits per byte over the targets
    with ``byte_lengths[target] > 0`` (see `token_byte_lengths`), reported only when ``byte_lengths`` is given and
    some target bears a byte. Leaves the model in training mode."""
    model.eval()
    totals = score_batches(model, dataloader, accelerator, byte_lengths, max_batches)
    model.train()
    metrics = {"eval_loss": totals.loss, "eval_perplexity": totals.perplexity, "eval_tokens": float(totals.targets)}
    if totals.bits_per_byte is not None:
        metrics["eval_bits_per_byte"] = totals.bits_per_byte
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def _micro_batches(dataloader: DataLoader, accelerator: Accelerator, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of micro-batches over epochs, advancing `state.epoch` / `state.batches_in_epoch`. A resumed
    epoch skips the batches it already consumed; every epoch re-seeds the sampler (accelerate #2016, #2823)."""
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch) if state.batches_in_epoch else dataloader
        yielded = False
        for batch in epoch_loader:
            yielded = True
            state.batches_in_epoch += 1
            yield batch
        if not yielded and state.batches_in_epoch == 0:
            raise ValueError("the training dataloader is empty: the corpus is smaller than one batch on each process")
        state.epoch += 1
        state.batches_in_epoch = 0


def train(
    model: torch.nn.Module,
    train_loader: DataLoader,
    eval_loader: DataLoader | None,
    cfg: Any,
    output_dir: Path,
    accelerator: Accelerator,
    *,
    byte_lengths: torch.Tensor | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    run_name: str = "train",
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps (or `cfg.num_epochs` epochs), evaluating every
    `cfg.eval_every` steps and checkpointing every `cfg.save_every` steps under `output_dir/checkpoints`.
    `train_loader` yields dicts with `labels`; the caller builds the loaders, this function prepares them."""
    checkpoint_dir = output_dir / "checkpoints"
    budget = TimeBudget(cfg.max_time, _total_steps(cfg, train_loader, accelerator))
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=cfg.warmup_steps, total_steps=budget.total_steps, schedule=cfg.lr_scheduler,
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )
    for loader in (train_loader, eval_loader):
        _own_generator(loader)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    _check_deepspeed_settings(accelerator, cfg)
    # Compiled for the forward pass only: the prepared model keeps its parameter names (a compiled module's
    # state dict gains an `_orig_mod.` prefix that from_pretrained and PEFT would silently ignore).
    forward = torch.compile(model) if cfg.compile else model

    layout = dict(num_processes=accelerator.num_processes, batch_size=cfg.batch_size,
                  gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    state = TrainState(**layout)  # not registered with accelerate: its custom-object loader unpickles freely
    resume_from = _decide_resume(accelerator, cfg, checkpoint_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, state)
        _check_layout(state, layout, resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    guard = NonFiniteGuard(accelerator, cfg, state, last_checkpoint=resume_from)
    log = MetricsLog(accelerator, output_dir / LOG_FILE, resume_step=state.step)
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config=_plain_config(cfg))
    _announce(accelerator, model, cfg, budget.total_steps, train_loader)

    window = cfg.gradient_accumulation_steps
    stream = _micro_batches(train_loader, accelerator, state)
    progress = _progress_bar(accelerator, budget.total_steps, state.step)
    flops_per_token = 0.0
    model.train()
    timer = time.perf_counter()
    tokens_since_log = 0
    final_eval: dict[str, float] = {}
    unsynced_targets = torch.zeros((), dtype=torch.long, device=accelerator.device)
    budget.begin(state, accelerator, every=cfg.log_every)
    while state.step < budget.total_steps:
        batches = [next(stream) for _ in range(window)]
        if not flops_per_token:
            flops_per_token = _flops_per_token(accelerator.unwrap_model(model), batches[0]["input_ids"].shape[-1])
        # Σ target tokens over the window and all ranks: every micro-batch loss is a sum divided by it.
        local_targets = torch.stack([count_targets(b) for b in batches]).sum()
        global_targets = accelerator.reduce(local_targets.detach().clone(), reduction="sum")
        denominator = global_targets.clamp(min=1)  # a window without targets contributes zero, not NaN
        # DDP/FSDP average gradients over ranks and accelerate divides by the window: undo both.
        scale = accelerator.num_processes * window
        loss_sum = torch.zeros((), device=accelerator.device)
        skipped, grad_norm = False, None
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = forward(**batch, num_items_in_batch=denominator)
                accelerator.backward(outputs.loss * scale)
                loss_sum += outputs.loss.detach() * denominator
                if not accelerator.sync_gradients:
                    continue  # accumulating: accelerate makes step and zero_grad no-ops here
                # Measured even without clipping (max_norm=inf scales by exactly 1), so inf/NaN gradients are seen.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                skipped = guard.check(loss_sum, denominator, grad_norm)  # raises, or allows skipping a bad step
                if not skipped:
                    optimizer.step()
                elif accelerator.scaler is not None:  # fp16: the GradScaler skips it, keeping its bookkeeping whole
                    _poison_gradients(model)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        if not skipped and not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips inf/NaN gradients
            scheduler.step()
        state.step += 1
        budget.step_done()
        total_steps = budget.total_steps  # max_steps, or what the time budget leaves
        unsynced_targets += global_targets
        if progress.total != total_steps:
            progress.total = total_steps
            progress.refresh()
        progress.update(1)
        log_now = state.step % cfg.log_every == 0 or state.step == total_steps
        save_now = state.step % cfg.save_every == 0 or state.step == total_steps

        if log_now or save_now:  # the only host-device syncs of a step: GPUs run ahead between them
            n_targets = int(unsynced_targets.item())
            unsynced_targets.zero_()
            state.tokens_seen += n_targets
            tokens_since_log += n_targets
        if log_now:
            step_loss = (accelerator.reduce(loss_sum, reduction="sum") / denominator).item()
            elapsed = time.perf_counter() - timer
            record = {
                "step": state.step, "loss": step_loss, "lr": lr, "epoch": state.epoch,
                "tokens_seen": state.tokens_seen, "tokens_per_second": tokens_since_log / max(elapsed, 1e-9),
                "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if accelerator.device.type == "cuda" and flops_per_token:
                record["mfu"] = record["tokens_per_second"] * flops_per_token / _peak_flops(accelerator)
            log.log(record)
            progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
            if on_log is not None:
                on_log(record)
            timer, tokens_since_log = time.perf_counter(), 0
        if eval_loader is not None and (state.step % cfg.eval_every == 0 or state.step == total_steps):
            final_eval = evaluate_lm(forward, eval_loader, accelerator, byte_lengths, cfg.eval_batches)
            state.best_eval_loss = min(state.best_eval_loss, final_eval["eval_loss"])
            log.log({"step": state.step, **final_eval})
            if accelerator.is_main_process:  # above the progress bar, which shows only the training loss
                progress.write(_validation_line(state.step, final_eval))
        if save_now:
            guard.check_weights(model)  # a checkpoint never holds NaN/inf weights
            guard.last_checkpoint = save_checkpoint(accelerator, state, checkpoint_dir, cfg.keep_last)
    progress.close()
    if cfg.max_time is not None and state.step < cfg.warmup_steps:
        accelerator.print(f"warning: the time budget (max_time {cfg.max_time:g} s) ended at step {state.step}, inside "
                          f"the {cfg.warmup_steps} warmup steps: the learning rate never reached its peak. Fix: lower "
                          "warmup_steps (e.g. a tenth of the steps the budget allows).")
    guard.check_weights(model)  # nor does the model handed back for saving (a resumed, finished run included)
    if accelerator.log_with:
        accelerator.end_training()
    if accelerator.is_main_process:
        plot_loss_curve(output_dir / LOG_FILE, output_dir / "loss_curve.png", title=f"{run_name}: loss per step")
    accelerator.wait_for_everyone()
    return TrainResult(model=model, state=state, history=_read_jsonl(output_dir / LOG_FILE), final_eval=final_eval)


def save_trained(accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path,
                 *, inner: str | None = None) -> None:
    """`save_pretrained` of a trained model and its tokenizer into ``folder``: a full model, or a PEFT model's adapter.
    The state dict is gathered from FSDP/DeepSpeed shards, a collective every rank joins; only the main process
    writes. ``inner``: the attribute of a training-only wrapper that holds the model to save (its keys lose the
    ``inner.`` prefix)."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if inner is not None:
        unwrapped = getattr(unwrapped, inner)
        state_dict = {key.removeprefix(f"{inner}."): value for key, value in state_dict.items()}
    if accelerator.is_main_process:
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()


def _decide_resume(accelerator: Accelerator, cfg: Any, checkpoint_dir: Path) -> Path | None:
    """Which checkpoint to load, decided once on the main process (which may move folders): every rank loads the same
    one, or every rank raises the same error."""
    decision: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            recover_interrupted_saves(checkpoint_dir, say=accelerator.print)
            if cfg.resume == "never" and list_checkpoints(checkpoint_dir):
                aside = checkpoint_dir.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(checkpoint_dir, aside)  # a fresh run must not prune, or resume from, another run's checkpoints
                accelerator.print(f"resume: never — earlier checkpoints moved to {aside}")
            chosen = resolve_resume(cfg.resume, checkpoint_dir, cfg.on_damaged_checkpoint, say=accelerator.print)
            tidy_checkpoints(checkpoint_dir, cfg.keep_last, keep=chosen)  # keep_last holds from the start
            decision = [chosen, None]
        except Exception as error:  # noqa: BLE001 — the other ranks wait in the broadcast: they must hear of it
            decision = [None, error]
    chosen, error = broadcast_object_list(decision)
    if error is not None:
        raise error
    return chosen


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN/inf: the run stopped before applying or saving it."""


class NonFiniteGuard:
    """Stops a step whose loss or gradient norm is NaN/inf before the optimizer applies it (or, within
    `max_skipped_steps`, drops its gradients and skips it, as large-scale trainers do), and refuses to hand on
    non-finite weights. Under fp16 a non-finite gradient is the GradScaler's to skip (it lowers the scale): only a
    non-finite loss counts. Under DeepSpeed the engine steps inside `backward`, so a bad step stops the run."""

    def __init__(self, accelerator: Accelerator, cfg: Any, state: TrainState, last_checkpoint: Path | None):
        self.accelerator, self.cfg, self.state = accelerator, cfg, state
        self.last_checkpoint = last_checkpoint
        self.can_skip = accelerator.distributed_type != DistributedType.DEEPSPEED

    def check(self, loss_sum: torch.Tensor, denominator: torch.Tensor, grad_norm: Any) -> bool:
        """True: skip this step (counted). Raises NonFiniteError when the step is bad and may not be skipped."""
        device = loss_sum.device
        bad = ~torch.isfinite(loss_sum)
        if grad_norm is not None and self.accelerator.scaler is None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=device))
        # The one host sync per optimizer step this guard costs: the step must be decided before it is applied, and
        # alike on every rank (a NaN loss on one rank is one rank's; gradients are already reduced).
        if not self.accelerator.reduce(bad.to(torch.float32), reduction="sum").item():
            return False
        loss = (self.accelerator.reduce(loss_sum, reduction="sum") / denominator).item()
        norm = float(grad_norm) if grad_norm is not None else None
        step = self.state.step + 1
        what = f"the loss is {loss}" + (f" and the gradient norm is {norm}" if norm is not None else "")
        if self.can_skip and self.state.skipped_steps < self.cfg.max_skipped_steps:
            self.state.skipped_steps += 1
            self.accelerator.print(
                f"step {step}: {what}; step skipped, its gradients dropped "
                f"({self.state.skipped_steps} of max_skipped_steps={self.cfg.max_skipped_steps})"
            )
            return True
        raise NonFiniteError(f"training diverged at step {step}: {what}. {self._advice()}")

    def check_weights(self, model: torch.nn.Module) -> None:
        local = torch.stack([_local_shard(p).isfinite().all() for p in model.parameters()]).all()
        if self.accelerator.reduce((~local).to(torch.float32), reduction="sum").item():
            raise NonFiniteError(
                f"after step {self.state.step} the weights hold NaN/inf values (an update overflowed). {self._advice()}"
            )

    def _advice(self) -> str:
        cfg = self.cfg
        where = (f"Last good checkpoint: {self.last_checkpoint} (resume: auto continues from it)"
                 if self.last_checkpoint else "Last good checkpoint: none yet")
        tries = [f"a lower learning_rate (now {cfg.learning_rate:g})"]
        if cfg.mixed_precision != "no":
            tries.append(f"mixed_precision: no, i.e. fp32 (now {cfg.mixed_precision})")
        tries.append(f"a lower max_grad_norm (now {cfg.max_grad_norm:g})" if cfg.max_grad_norm
                     else "max_grad_norm: 1.0 (gradient clipping is off)")
        tries.append("more warmup_steps")
        if self.can_skip:
            tries.append(f"max_skipped_steps above {cfg.max_skipped_steps} to skip a few bad steps")
        skipped = f" {self.state.skipped_steps} bad step(s) were skipped before." if self.state.skipped_steps else ""
        return (f"Nothing of it was applied or saved.{skipped} {where}. Try {', '.join(tries[:-1])} or {tries[-1]}")


def _poison_gradients(model: torch.nn.Module) -> None:
    """NaN gradients, which a GradScaler's step always skips (lowering its scale), whatever the loss did to them."""
    for param in model.parameters():
        if param.grad is not None:
            param.grad.fill_(math.nan)


def _local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: FSDP2's DTensor local shard, DeepSpeed ZeRO-3's partition, or itself."""
    if hasattr(param, "to_local"):
        return param.to_local()
    return getattr(param, "ds_tensor", param).detach()


def _plain_config(cfg: Any) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters (TensorBoard takes only scalars and strings)."""
    values = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(vars(cfg))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _check_deepspeed_settings(accelerator: Accelerator, cfg: Any) -> None:
    """DeepSpeed keeps its own copy of two loop settings: make them the recipe's, or refuse to start."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ValueError(
            f"DeepSpeed accumulates {accelerator.gradient_accumulation_steps} micro-batches but the recipe says "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: remove gradient_accumulation_steps from "
            "the accelerate/DeepSpeed config (the recipe sets it) or make them equal"
        )


def _check_layout(state: TrainState, layout: dict[str, int], checkpoint: Path) -> None:
    saved = {key: getattr(state, key) for key in layout}
    if saved != layout:
        raise ValueError(
            f"checkpoint {checkpoint} was written with {saved} but this run has {layout}: its data position does not "
            "translate. Resume with the same processes, batch_size and gradient_accumulation_steps, or set resume: never"
        )


def _own_generator(loader: DataLoader | None) -> None:
    """Each new DataLoader iterator draws a worker seed from the global RNG unless the loader has its own generator.
    A resumed run creates its iterator at another moment than the original run did, so that draw would shift the
    dropout masks of every later step."""
    if loader is not None and isinstance(loader, DataLoader) and loader.generator is None:
        loader.generator = torch.Generator().manual_seed(torch.initial_seed())


def _total_steps(cfg: Any, train_loader: DataLoader, accelerator: Accelerator) -> int:
    """max_steps, or fewer when num_epochs passes over the data come first."""
    if cfg.num_epochs is None:
        return cfg.max_steps
    try:
        per_rank = len(train_loader) // accelerator.num_processes
    except TypeError:
        raise ValueError("num_epochs needs a sized dataset; with streaming data set max_steps instead") from None
    return max(1, min(cfg.max_steps, cfg.num_epochs * per_rank // cfg.gradient_accumulation_steps))


def _enable_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5.x renamed gradient_checkpointing_enable; both are non-reentrant and make LoRA inputs require grad.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _announce(accelerator: Accelerator, model: torch.nn.Module, cfg: Any, total_steps: int, loader: DataLoader) -> None:
    unwrapped = accelerator.unwrap_model(model)
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unwrapped.parameters())
    first = next(iter(loader.dataset)) if hasattr(loader, "dataset") else None
    length = len(first["input_ids"]) if isinstance(first, dict) and "input_ids" in first else None
    tokens = f"{cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes * length:,}" if length else "?"
    budget = f", or {cfg.max_time:g} s of training, whichever comes first" if cfg.max_time else ""
    accelerator.print(
        f"parameters: {total:,} ({trainable:,} trainable) | processes: {accelerator.num_processes} | "
        f"tokens per step: {tokens} | steps: {total_steps}{budget} | mixed precision: {accelerator.mixed_precision}"
    )


def _progress_bar(accelerator: Accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)


def _flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 2 × parameters forward, 4 × backward for trainable weights
    (2 × for frozen ones, whose activations still need gradients), plus the attention scores."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        return 0.0
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3 partitions
    trainable = sum(n for n, grad in numel if grad)
    frozen = sum(n for n, grad in numel if not grad)
    return 6 * trainable + 4 * frozen + 12 * config.num_hidden_layers * config.hidden_size * seq_len


_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def _peak_flops(accelerator: Accelerator) -> float:
    name = torch.cuda.get_device_name(accelerator.device)
    peak = next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), 312e12)
    return peak * accelerator.num_processes


def _validation_line(step: int, metrics: dict[str, float]) -> str:
    text = f"step {step}: validation loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}"
    if "eval_bits_per_byte" in metrics:
        text += f", bits per byte {metrics['eval_bits_per_byte']:.4f}"
    return text


def plot_loss_curve(log_path: Path, png_path: Path, title: str = "loss per step") -> Path | None:
    """Training loss (and validation loss where evaluated) against step."""
    records = _read_jsonl(log_path)
    # A skipped step's loss is null: left out of the curve.
    train_points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    eval_points = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train_points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train_points), label="train loss")
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def seed_everything(seed: int) -> None:
    set_seed(seed, device_specific=False)
