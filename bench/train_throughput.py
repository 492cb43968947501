"""Training throughput of Quill against transformers' LlamaForCausalLM with the same dimensions and weights.

Both models run the same loop (forward, backward, AdamW step) on the same batches, interleaved round by round so
that machine noise hits both alike. Reports median tokens/s per model and checks first that the two compute the same
logits (Quill with RoPE + SwiGLU + RMSNorm is a Llama).

    python bench/train_throughput.py                       # CPU defaults
    python bench/train_throughput.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.models.quill import QuillConfig, QuillForCausalLM


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden * 2 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.seq, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    quill = QuillForCausalLM(QuillConfig(**common, rope_theta=10000.0))
    llama = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    llama.load_state_dict(quill.state_dict())  # identical parameter names: the same weights in both
    for model in (quill, llama):
        model.set_attn_implementation("sdpa")
        model.to(args.device).train()
    return quill, llama


def check_equal(quill: torch.nn.Module, llama: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return (quill(batch).logits.float() - llama(batch).logits.float()).abs().max().item()


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], dtype) -> float:
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    quill, llama = build(args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device) for _ in range(args.steps)]
    max_diff = check_equal(quill.eval(), llama.eval(), batches[0])
    quill.train(), llama.train()
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in (("quill", quill), ("llama", llama))}
    models = {"quill": quill, "llama": llama}
    for name in models:  # warm-up (allocator, kernels)
        time_steps(models[name], optimizers[name], batches[:2], dtype)
    results: dict[str, list[float]] = {"quill": [], "llama": []}
    for r in range(args.rounds):
        order = ("quill", "llama") if r % 2 == 0 else ("llama", "quill")
        for name in order:
            results[name].append(time_steps(models[name], optimizers[name], batches, dtype))
    summary = {name: statistics.median(v) for name, v in results.items()}
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "config": vars(args),
        "max_abs_logit_diff": max_diff, "tokens_per_second": summary,
        "quill_over_llama": summary["quill"] / summary["llama"], "rounds": results,
    }, indent=2))


if __name__ == "__main__":
    main()
