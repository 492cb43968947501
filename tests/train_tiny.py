"""A tiny, deterministic training run of the shared loop, for tests that need a separate process
(SIGKILL mid-run, `accelerate launch` with two CPU ranks). Usage: python train_tiny.py '<json options>'."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.recipe import TrainSection
from pipeline.training import TimeBudget, build_accelerator, seed_everything, train

VOCAB, LENGTH, N_SAMPLES = 61, 16, 96


def dataset() -> list[dict]:
    """Sequences with a varying number of target tokens, so per-micro-batch means would weigh them wrongly."""
    g = torch.Generator().manual_seed(1234)
    rows = []
    for i in range(N_SAMPLES):
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, LENGTH - 2, (1,), generator=g))] = -100
        rows.append({"sample_id": i, "input_ids": ids, "labels": labels})
    return rows


def model(dropout: float = 0.0) -> QuillForCausalLM:
    torch.manual_seed(0)
    config = QuillConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
                         hidden_dropout=dropout, attention_dropout=dropout)
    return QuillForCausalLM(config)


def run(options: dict) -> dict:
    out = Path(options["output_dir"])
    max_steps = options.get("max_steps", 6)
    cfg = TrainSection(
        max_steps=max_steps, batch_size=options.get("batch_size", 4),
        gradient_accumulation_steps=options.get("gradient_accumulation_steps", 1),
        learning_rate=options.get("learning_rate", 3e-3), warmup_steps=min(2, max_steps), lr_scheduler="cosine",
        min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=options.get("max_grad_norm", 1.0),
        max_skipped_steps=options.get("max_skipped_steps", 0),
        on_damaged_checkpoint=options.get("on_damaged_checkpoint", "previous"),
        eval_every=1000, log_every=1, save_every=options.get("save_every", 1000), keep_last=options.get("keep_last", 2),
        resume=options.get("resume", "never"), trackers=options.get("trackers", ["jsonl"]),
        mixed_precision=options.get("mixed_precision", "no"), max_time=options.get("max_time"),
    )
    readings = iter(range(1, 1_000_000))  # fake_clock: one second per reading, whatever the machine's speed
    clock = staticmethod(lambda: float(next(readings))) if options.get("fake_clock") else TimeBudget.clock
    seed_everything(options.get("seed", 0))
    accelerator = build_accelerator(cfg, out, expected_processes=options.get("expected_processes"))
    seen: list[int] = []

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        seen.extend(e["sample_id"] for e in examples)
        return {"input_ids": torch.stack([e["input_ids"] for e in examples]),
                "labels": torch.stack([e["labels"] for e in examples])}

    loader = DataLoader(dataset(), batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    kill_at = options.get("kill_at_step")

    def on_log(record: dict) -> None:
        if kill_at is not None and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a preempted job dies

    net = model(options.get("dropout", 0.0))
    _inject_faults(net, options, cfg.gradient_accumulation_steps)
    real_clock, TimeBudget.clock = TimeBudget.clock, clock
    try:
        result = train(net, loader, None, cfg, out, accelerator, on_log=on_log)
    finally:
        TimeBudget.clock = real_clock
    weights = accelerator.unwrap_model(accelerator._models[0]).state_dict()
    report = {"rank": accelerator.process_index, "world": accelerator.num_processes, "seen": seen,
              "losses": [r["loss"] for r in result.history if "loss" in r],
              "lrs": [r["lr"] for r in result.history if "lr" in r]}
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, out / f"weights-rank{accelerator.process_index}.pt")
    (out / f"report-rank{accelerator.process_index}.json").write_text(json.dumps(report))
    return report


def _inject_faults(net: QuillForCausalLM, options: dict, window: int) -> None:
    """`nan_logits_at` / `inf_grad_at`: optimizer steps (1-based, counted from this run's first) whose logits are
    NaN, or whose loss stays finite but one gradient is infinite."""
    nan_steps, inf_steps = set(options.get("nan_logits_at", [])), set(options.get("inf_grad_at", []))
    calls = [0]

    def step() -> int:
        return (calls[0] - 1) // window + 1

    def count(module, args) -> None:
        calls[0] += 1

    net.register_forward_pre_hook(count)
    net.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if step() in nan_steps else out)
    net.model.norm.weight.register_hook(lambda grad: grad * float("inf") if step() in inf_steps else grad)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
