"""Generation speed of Quill against transformers' LlamaForCausalLM with the same dimensions and weights.

Both models generate greedily with `model.generate` (the KV cache on: dynamic, or static with
``cache_implementation="static"``), at batch 1 and batch 8, the same prompts, ``--new-tokens`` new tokens each (no
early stop: EOS is suppressed). The two models run interleaved round by round, order alternating, so that machine
noise hits both alike; the figure is the median tokens/s over rounds. First it checks that both generate the same
tokens (Quill with RoPE + SwiGLU + RMSNorm is a Llama), so the timing compares the same work.

    python bench/generate.py                                   # CPU: the quickstart's shape
    python bench/generate.py --compile                         # also with torch.compile (slow to warm up on CPU)
    python bench/generate.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --compile
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.models.quill import QuillConfig, QuillForCausalLM


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt + args.new_tokens, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    quill = QuillForCausalLM(QuillConfig(**common))
    llama = LlamaForCausalLM(LlamaConfig(**common))
    llama.load_state_dict(quill.state_dict())  # identical parameter names: the same weights in both
    dtype = getattr(torch, args.dtype)
    for model in (quill, llama):
        model.set_attn_implementation("sdpa")
        model.to(args.device, dtype).eval()
    return {"quill": quill, "llama": llama}


def settings(args: argparse.Namespace, cache: str) -> dict:
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    return kwargs


def generate(model: torch.nn.Module, prompts: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, float]:
    if prompts.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    if prompts.is_cuda:
        torch.cuda.synchronize()
    return out[:, prompts.shape[1]:], time.perf_counter() - start


def measure(models: dict[str, torch.nn.Module], prompts: torch.Tensor, kwargs: dict, rounds: int) -> dict:
    """Same tokens first (warm-up included), then tokens/s per model over interleaved rounds."""
    outputs = {name: generate(model, prompts, kwargs)[0] for name, model in models.items()}
    same = torch.equal(outputs["quill"], outputs["llama"])
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            new, seconds = generate(models[name], prompts, kwargs)
            speeds[name].append(new.numel() / seconds)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    return {"same_tokens": same, "quill_tok_s": median["quill"], "llama_tok_s": median["llama"],
            "ratio": median["quill"] / median["llama"], "rounds": {k: [round(v) for v in s] for k, s in speeds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile of the forward")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    models = build(args)
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:
            for model in models.values():
                model.forward = torch.compile(model.forward)
        for cache in ("dynamic", "static"):
            for batch in (1, 8):
                prompts = torch.randint(3, args.vocab, (batch, args.prompt),
                                        generator=torch.Generator().manual_seed(batch)).to(args.device)
                try:
                    result = measure(models, prompts, settings(args, cache), args.rounds)
                except Exception as error:  # a cell that cannot run says why instead of ending the benchmark
                    result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                rows.append({"compile": compiled, "cache": cache, "batch": batch, **result})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": args.device, "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "dims": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "prompt")}}))


if __name__ == "__main__":
    main()
