"""See inside a trained model: the concepts the pipeline is built from, as functions and `pipeline inspect` commands.

    tokens      text → subwords → ids (and the bytes each stands for)
    params      parameter counts per component (embeddings, attention, feed-forward, norms, head)
    similar     nearest tokens in embedding space, by cosine similarity or dot product
    positions   the positional encoding (sinusoidal table, learned table, or RoPE rotation angles)
    attention   attention maps (queries × keys) of every layer and head
    next        the softmax over the vocabulary for the next token
    decode      greedy, temperature, top-k and top-p decoding of the same prompt side by side

Every command takes a model folder (or Hub id) saved by the pipeline, with its tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.models import quill  # noqa: F401  (registers Quill: AutoModelForCausalLM must know it)


# ---------------------------------------------------------------------------------------------------- tokens
def tokenize_table(tokenizer: PreTrainedTokenizerBase, text: str) -> list[dict[str, Any]]:
    """One row per token: its id, its subword as text, and the UTF-8 bytes it covers."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [{"id": i, "token": tokenizer.decode([i]), "piece": tokenizer.convert_ids_to_tokens(i)} for i in ids]


# ---------------------------------------------------------------------------------------------------- params
def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component; shared (tied) tensors are counted once, under the first name that holds them."""
    groups: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        groups[_component(name)] += param.numel()
    groups["total"] = sum(groups.values())
    return dict(groups)


def _component(name: str) -> str:
    for key, label in (
        ("embed_tokens", "token embeddings"), ("embed_positions", "position embeddings"), ("self_attn", "attention"),
        ("mlp", "feed-forward"), ("norm", "norms"), ("lm_head", "output head"), ("score", "task head"),
        ("lora_", "LoRA adapter"),
    ):
        if key in name:
            return label
    return "other"


# ---------------------------------------------------------------------------------------------------- embeddings
def embedding_similarity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token: str, top: int = 10, metric: str = "cosine"
) -> list[tuple[str, float]]:
    """Tokens whose input embeddings are closest to `token`'s. Cosine compares directions only; the dot product
    also rewards long vectors (frequent tokens tend to have them)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{token!r} is {len(ids)} tokens {pieces}, not one: pick a single token (see `pipeline inspect tokens`)")
    table = model.get_input_embeddings().weight.detach().float()
    _check_top(top, len(table) - 1)
    scores = similarity(table[ids[0]], table, metric)
    scores[ids[0]] = float("-inf")  # the token itself is trivially its own nearest neighbour
    best = scores.topk(min(top, len(scores) - 1))
    return [(tokenizer.decode([i]), s) for i, s in zip(best.indices.tolist(), best.values.tolist())]


def similarity(query: torch.Tensor, table: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Similarity of one vector (d,) to each row of a table (n, d)."""
    if metric == "cosine":
        return F.cosine_similarity(query[None], table, dim=-1)
    if metric == "dot":
        return table @ query
    raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")


# ---------------------------------------------------------------------------------------------------- positions
def positional_encoding(model: PreTrainedModel, length: int) -> torch.Tensor:
    """(length, d) view of how positions are encoded: the added table for sinusoidal/learned encodings, or the
    rotation angle per position and channel pair for RoPE (d = head_dim / 2)."""
    config = model.config
    kind = getattr(config, "position_embedding_type", "rope")
    _check_length(length, config, "--length")
    positions = torch.arange(length)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", base)
    if kind == "learned":
        return body.embed_positions.weight[:length].detach().float()
    modeling = sys.modules[type(body).__module__]  # the model's own file (ours, or its remote-code copy)
    if kind == "sinusoidal":
        return modeling.sinusoidal_positions(positions[None], config.hidden_size)[0]
    return positions[:, None].float() * modeling.inverse_frequencies(config.head_dim, config.rope_theta)[None]


# ---------------------------------------------------------------------------------------------------- attention
@torch.no_grad()
def attention_maps(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[torch.Tensor, list[str]]:
    """(layers, heads, T, T) attention weights: row t is how query t spreads its attention over keys 0..t."""
    inputs = _encode(model, tokenizer, text)
    out = model(**inputs, output_attentions=True)
    tokens = [tokenizer.decode([i]) for i in inputs["input_ids"][0].tolist()]
    return torch.stack([a[0] for a in out.attentions]).float(), tokens


def plot_attention(maps: torch.Tensor, tokens: list[str], layer: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = maps.shape[1]
    fig, axes = plt.subplots(1, heads, figsize=(3 * heads, 3.2), squeeze=False)
    for h, ax in enumerate(axes[0]):
        ax.imshow(maps[layer, h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} head {h}")
        ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- next token
@torch.no_grad()
def next_token_distribution(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, top: int = 10, temperature: float = 1.0
) -> list[tuple[str, float]]:
    """The most likely next tokens: softmax(logits / temperature) over the whole vocabulary. Temperature 0 is the
    limit of that softmax, greedy decoding: all the mass on the argmax (the first one, on a tie)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature} (0 means greedy)")
    inputs = _encode(model, tokenizer, text)
    logits = model(**inputs).logits[0, -1].float()
    _check_top(top, len(logits))
    if temperature == 0:
        probs = F.one_hot(logits.argmax(), len(logits)).float()
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
    best = probs.topk(top)
    return [(tokenizer.decode([i]), p) for i, p in zip(best.indices.tolist(), best.values.tolist())]


# ---------------------------------------------------------------------------------------------------- decoding
DECODING = {
    "greedy": dict(do_sample=False),
    "temperature=0.7": dict(do_sample=True, temperature=0.7, top_k=0),
    "top-k=20": dict(do_sample=True, top_k=20),
    "top-p=0.9": dict(do_sample=True, top_p=0.9, top_k=0),
}


@torch.no_grad()
def decode_side_by_side(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 30, seed: int = 0,
    strategies: dict[str, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """The same prompt continued by each decoding strategy (sampling ones seeded, so runs repeat)."""
    inputs = _encode(model, tokenizer, prompt, reserve=max_new_tokens)
    results = {}
    for name, kwargs in (strategies or DECODING).items():
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
        results[name] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return results


# ---------------------------------------------------------------------------------------------------- checks
def _encode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, reserve: int = 0) -> dict[str, Any]:
    """The text as model inputs, refused when it (plus ``reserve`` generated tokens) needs more positions than the
    model has: a learned table would fail with an index error, rotary positions silently extrapolate."""
    inputs = tokenizer(text, return_tensors="pt")
    limit = getattr(model.config, "max_position_embeddings", None)
    needed = inputs["input_ids"].shape[1] + reserve
    if limit is not None and needed > limit:
        extra = f" + {reserve} new tokens" if reserve else ""
        raise ValueError(
            f"the text is {inputs['input_ids'].shape[1]} tokens{extra}, more than the model's {limit} positions "
            f"(max_position_embeddings). Fix: shorten the text{' or lower --max-new-tokens' if reserve else ''}."
        )
    return inputs


def _check_top(top: int, available: int) -> None:
    if not 1 <= top <= available:
        raise ValueError(f"--top {top} is outside 1..{available} (the tokens there are to rank). Fix: pick one in range.")


def _check_length(length: int, config: Any, flag: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if length < 1 or (limit is not None and length > limit):
        raise ValueError(f"{flag} {length} is outside 1..{limit} (the model's max_position_embeddings). Fix: pick one in range.")


# ---------------------------------------------------------------------------------------------------- CLI
def inspect_command(args: argparse.Namespace) -> int:
    """`pipeline inspect WHAT MODEL [TEXT]` (the arguments are declared in `pipeline.cli`). A user's mistake (a
    folder that holds no model, a word of several tokens, a layer the model lacks, a prompt too long) raises
    `ValueError` or `OSError` with the fix; the CLI prints it."""
    from pipeline.artifacts import model_folder_problem, tokenizer_folder_problem

    problem = tokenizer_folder_problem(args.model) if args.what == "tokens" else model_folder_problem(args.model)
    if problem:
        raise ValueError(f"model {problem}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.what == "tokens":
        for row in tokenize_table(tokenizer, args.text):
            print(f"{row['id']:>7}  {row['token']!r}")
        return 0
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    layers = getattr(model.config, "num_hidden_layers", None)
    if args.what == "attention" and layers is not None and args.layer >= layers:
        raise ValueError(f"--layer {args.layer}: the model has layers 0..{layers - 1}. Fix: pick one of those.")
    if args.what == "params":
        for name, count in parameter_counts(model).items():
            print(f"{name:>20}: {count:,}")
    elif args.what == "similar":
        for token, score in embedding_similarity(model, tokenizer, args.text, args.top, args.metric):
            print(f"{score:8.4f}  {token!r}")
    elif args.what == "positions":
        table = positional_encoding(model, args.length)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure(figsize=(6, 4))
        plt.imshow(table.numpy(), aspect="auto", cmap="RdBu")
        plt.xlabel("channel")
        plt.ylabel("position")
        plt.colorbar()
        plt.savefig(args.png, dpi=120)
        print(f"wrote {args.png} ({model.config.position_embedding_type}, {tuple(table.shape)})")
    elif args.what == "attention":
        model.set_attn_implementation("eager")
        maps, tokens = attention_maps(model, tokenizer, args.text)
        print(f"wrote {plot_attention(maps, tokens, args.layer, args.png)} ({maps.shape[0]} layers × {maps.shape[1]} heads)")
    elif args.what == "next":
        if args.temperature == 0:
            print("temperature 0: greedy decoding, all the probability on the most likely token")
        for token, p in next_token_distribution(model, tokenizer, args.text, args.top, args.temperature):
            print(f"{p:8.4f}  {token!r}")
    elif args.what == "decode":
        for name, text in decode_side_by_side(model, tokenizer, args.text, args.max_new_tokens).items():
            print(f"--- {name}\n{args.text}{text}")
    return 0
