"""The training loop shared by pretraining and fine-tuning, on `accelerate.Accelerator`.

One optimizer step consumes `gradient_accumulation_steps` micro-batches on every rank. The loss of the step is
Σ token losses / Σ target tokens over the whole window and all ranks, so accumulation 4 × batch 2 equals batch 8
and ranks with few target tokens are not over-weighted (transformers #34191, #34242).

Checkpoints are `accelerator.save_state` folders (model, optimizer, scheduler, RNG, sampler, and our
`TrainState` with the data position) written to a temporary name and renamed when complete, so `resume: auto`
never picks up a half-written one. A resumed run replays the same data order and ends with the same weights and
logged losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
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
    broadcast_object_list,
    set_seed,
)
from torch.utils.data import DataLoader

from pipeline.scoring import score_batches

CHECKPOINT_PREFIX = "checkpoint-"
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


# ---------------------------------------------------------------------------------------------------------------
# State that travels in checkpoints besides model/optimizer/scheduler/RNG
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where the run is: registered with `accelerator.register_for_checkpointing`, so it is saved and restored."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)
    tokens_seen: int = 0  # target tokens over all ranks
    best_eval_loss: float = float("inf")
    # What `batches_in_epoch` is counted in: resuming with another layout would skip the wrong data.
    num_processes: int = 1
    batch_size: int = 0
    gradient_accumulation_steps: int = 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    model: torch.nn.Module  # as prepared by accelerate (unwrap it with accelerator.unwrap_model)
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)  # the JSONL records of this run
    final_eval: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of an interrupted save never match the pattern."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint if any; `never`: start fresh; otherwise a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume).expanduser()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no train_state.json in it)")
    return path


def save_checkpoint(accelerator: Accelerator, state: TrainState, checkpoint_dir: Path, keep_last: int) -> Path:
    """Write the full state atomically: into a temporary folder, then one rename. Every rank must call this
    (sharded FSDP/DeepSpeed saves are collectives); only the main process renames and prunes."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    staging = checkpoint_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left over by a crash during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "train_state.json").write_text(json.dumps(state.state_dict(), indent=2))
        _fsync_tree(staging)
        replaced = None
        if final.exists():  # the same step saved again: keep the old copy until the new one is in place
            replaced = final.with_name(f".old-{final.name}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_dir(checkpoint_dir)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(checkpoint_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename publishes them: a power cut must not leave a 'complete' empty file."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


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
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.records.append(record)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record["step"])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    total_steps = _total_steps(cfg, train_loader, accelerator)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.lr_scheduler,
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
    state = TrainState(**layout)
    accelerator.register_for_checkpointing(state)
    if cfg.resume == "never" and accelerator.is_main_process and list_checkpoints(checkpoint_dir):
        aside = checkpoint_dir.with_name(f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(checkpoint_dir, aside)  # a fresh run must not prune, or resume from, another run's checkpoints
        accelerator.print(f"resume: never — earlier checkpoints moved to {aside}")
    # Decided once, on the main process: every rank must load the same checkpoint (or none).
    resume_from = broadcast_object_list([resolve_resume(cfg.resume, checkpoint_dir)])[0]
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        _check_layout(state, layout, resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    log = MetricsLog(accelerator, output_dir / LOG_FILE, resume_step=state.step)
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config=_plain_config(cfg))
    _announce(accelerator, model, cfg, total_steps, train_loader)

    window = cfg.gradient_accumulation_steps
    stream = _micro_batches(train_loader, accelerator, state)
    progress = _progress_bar(accelerator, total_steps, state.step)
    flops_per_token = 0.0
    model.train()
    timer = time.perf_counter()
    tokens_since_log = 0
    final_eval: dict[str, float] = {}
    unsynced_targets = torch.zeros((), dtype=torch.long, device=accelerator.device)
    while state.step < total_steps:
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
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = forward(**batch, num_items_in_batch=denominator)
                accelerator.backward(outputs.loss * scale)
                loss_sum += outputs.loss.detach() * denominator
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf/NaN gradients
            scheduler.step()
        state.step += 1
        unsynced_targets += global_targets
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
        if save_now:
            save_checkpoint(accelerator, state, checkpoint_dir, cfg.keep_last)
    progress.close()
    if accelerator.log_with:
        accelerator.end_training()
    if accelerator.is_main_process:
        plot_loss_curve(output_dir / LOG_FILE, output_dir / "loss_curve.png")
    accelerator.wait_for_everyone()
    return TrainResult(model=model, state=state, history=_read_jsonl(output_dir / LOG_FILE), final_eval=final_eval)


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
    accelerator.print(
        f"parameters: {total:,} ({trainable:,} trainable) | processes: {accelerator.num_processes} | "
        f"tokens per step: {tokens} | steps: {total_steps} | mixed precision: {accelerator.mixed_precision}"
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


def plot_loss_curve(log_path: Path, png_path: Path) -> Path | None:
    """Training loss (and validation loss where evaluated) against step."""
    records = _read_jsonl(log_path)
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_points = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
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
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def seed_everything(seed: int) -> None:
    set_seed(seed, device_specific=False)
