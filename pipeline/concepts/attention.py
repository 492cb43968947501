"""Attention maps: for every layer and head, how each query position spreads its attention over the keys."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.concepts._shared import base_model, encode, label, pyplot, save


@torch.no_grad()
def attention_maps(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str
                   ) -> tuple[torch.Tensor, list[str]]:
    """(layers, heads, T, T) attention weights and the T tokens: row t is how query t spreads its attention over
    keys 0..t (each row sums to 1). Runs the eager attention (fused kernels never form the weights: transformers'
    SDPA path returns none at all), then puts the model's own implementation back."""
    inputs = encode(model, tokenizer, text)
    inner = base_model(model)
    implementation = inner.config._attn_implementation
    if implementation != "eager":
        inner.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        if implementation not in (None, "eager"):
            inner.set_attn_implementation(implementation)
    if not out.attentions:
        raise ValueError(f"{type(inner).__name__} returned no attention weights. Fix: a model whose eager attention "
                         "returns them (output_attentions=True)")
    tokens = [tokenizer.decode([i]) for i in inputs["input_ids"][0].tolist()]
    return torch.stack([a[0] for a in out.attentions]).float(), tokens


def top_attended(maps: torch.Tensor, tokens: list[str], top: int = 3) -> list[dict]:
    """Per layer and head: the keys that receive the largest share of the head's attention (each query gives 1 in
    all, so the shares over keys sum to 1), and how much goes, on average, to the first token, the previous one and
    the query itself: the signatures of an attention sink, a previous-token head, a self head."""
    layers, heads, length, _ = maps.shape
    share = maps.mean(2)  # (layers, heads, keys): mean over queries
    diagonal = maps.diagonal(dim1=2, dim2=3)  # (layers, heads, T): a[t, t]
    previous = maps.diagonal(offset=-1, dim1=2, dim2=3) if length > 1 else maps.new_zeros(layers, heads, 1)
    rows = []
    for layer in range(layers):
        for head in range(heads):
            best = share[layer, head].topk(min(top, length))
            rows.append({
                "layer": layer, "head": head,
                "top": [{"position": k, "token": tokens[k], "share": s}
                        for k, s in zip(best.indices.tolist(), best.values.tolist())],
                "first": maps[layer, head, :, 0].mean().item(),
                "previous": previous[layer, head].mean().item(),
                "self": diagonal[layer, head].mean().item(),
            })
    return rows


def plot_attention(maps: torch.Tensor, tokens: list[str], path: Path, *, layers: list[int] | None = None,
                   heads: list[int] | None = None, title: str = "") -> Path:
    """One figure: a grid of the maps of ``layers`` × ``heads`` (all by default) sharing one colour scale, tokens
    on the outer axes; a single map is drawn larger, with every token on both axes and, for short texts, the
    weights written in the cells."""
    plt = pyplot()
    layers = list(range(maps.shape[0])) if layers is None else layers
    heads = list(range(maps.shape[1])) if heads is None else heads
    length, single = len(tokens), len(layers) == len(heads) == 1
    cell = max(5.0 if single else 2.2, length * (0.32 if single else 0.15))  # inches: ≥ 10 (single) / 8 pt a row
    font = 9 if single else 8
    stride = max(1, round(length / (cell * 72 / (font * 1.25))))  # skip labels rather than overlap them
    ticks = list(range(0, length, stride))
    names = [label(tokens[t], spaces=True) for t in ticks]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)  # keys a causal query cannot see: drawn blank
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(cell * len(heads) + 1.8, cell * len(layers) + 1.3))
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            weights = maps[layer, head].masked_fill(future, float("nan")).numpy()
            image = ax.imshow(weights, cmap=colours, vmin=0, vmax=1)
            ax.set_title(f"layer {layer} · head {head}", fontsize=font + 1)
            ax.set_xticks(ticks, names, rotation=90, fontsize=font)
            ax.set_yticks(ticks, names, fontsize=font)
            ax.tick_params(labelbottom=r == len(layers) - 1, labelleft=c == 0)
            if single and length <= 16:
                for q in range(length):
                    for k in range(q + 1):
                        w = maps[layer, head, q, k].item()
                        ax.text(k, q, f"{w:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if w > 0.6 else "white")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6 if len(layers) > 1 else 0.9,
                 label="attention weight (rows sum to 1)")
    fig.supxlabel("key (attended to)")
    fig.supylabel("query")
    if title:
        fig.suptitle(title, fontsize=12)
    return save(fig, path)
