"""Vectors for tokens and texts: nearest tokens, analogies by vector arithmetic, sentence embeddings (pooled hidden
states) against bags of words (summed input embeddings), and their pairwise similarity matrices."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from pipeline.concepts._shared import (
    check_positions,
    check_top,
    label,
    pyplot,
    save,
    token_id,
)

POOLINGS = ("mean", "last", "first")


def similarity(query: torch.Tensor, table: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Similarity of one vector (d,) to each row of a table (n, d)."""
    if metric == "cosine":
        return F.cosine_similarity(query[None], table, dim=-1)
    if metric == "dot":
        return table @ query
    raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")


def _input_table(model: torch.nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().float()


def _nearest(tokenizer: PreTrainedTokenizerBase, scores: torch.Tensor, exclude: list[int], top: int
             ) -> list[tuple[str, float]]:
    check_top(top, len(scores) - len(set(exclude)))
    scores = scores.clone()
    scores[exclude] = float("-inf")  # the query's own tokens are trivially near it
    best = scores.topk(top)
    return [(tokenizer.decode([i]), s) for i, s in zip(best.indices.tolist(), best.values.tolist())]


def embedding_similarity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, token: str, top: int = 10, metric: str = "cosine"
) -> list[tuple[str, float]]:
    """Tokens whose input embeddings are closest to `token`'s. Cosine compares directions only; the dot product
    also rewards long vectors (frequent tokens tend to have them)."""
    i = token_id(tokenizer, token)
    table = _input_table(model)
    return _nearest(tokenizer, similarity(table[i], table, metric), [i], top)


def analogy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, a: str, b: str, c: str, top: int = 10
            ) -> list[tuple[str, float]]:
    """"A is to B as C is to ?": the tokens nearest (cosine) to B − A + C in the input embedding space, A, B and C
    themselves left out (they are usually the nearest). Each word must be one token: the mean of a word's pieces is
    no token's vector, and its neighbours would be the pieces' (often spelling fragments), not the word's."""
    ids, problems = [], []
    for word in (a, b, c):
        try:
            ids.append(token_id(tokenizer, word))
        except ValueError as error:
            problems.append(str(error))
    if problems:  # every word that is not one token, at once
        raise ValueError("\n".join(problems))
    ia, ib, ic = ids
    table = _input_table(model)
    return _nearest(tokenizer, similarity(table[ib] - table[ia] + table[ic], table), [ia, ib, ic], top)


# ---------------------------------------------------------------------------------------------------- sentences
def _batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The texts right-padded into one batch (real tokens keep positions 0..n-1, so no position shifts), and a mask
    of each text's own tokens: not padding, not the special tokens (BOS) the tokenizer adds."""
    encoded = [tokenizer(t, return_special_tokens_mask=True) for t in texts]
    for n, (text, e) in enumerate(zip(texts, encoded), 1):
        check_positions(model, len(e["input_ids"]), what=f"text {n}")
        if not any(m == 0 for m in e["special_tokens_mask"]):
            raise ValueError(f"text {n} ({text!r}) has no tokens of its own. Fix: give a non-empty text.")
    width = max(len(e["input_ids"]) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id does
    ids = torch.full((len(texts), width), pad)
    attention = torch.zeros(len(texts), width, dtype=torch.long)
    own = torch.zeros(len(texts), width, dtype=torch.bool)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        attention[row, :n] = 1
        own[row, :n] = torch.tensor(e["special_tokens_mask"]) == 0
    return {"input_ids": ids, "attention_mask": attention}, own


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                        pooling: str = "mean") -> torch.Tensor:
    """(n, d) one vector per text from the model's last hidden state (after the final norm), pooled over the text's
    own tokens (padding and the BOS the tokenizer adds are masked out):

    - ``mean``: the average of its tokens' states (the usual sentence-embedding pooling);
    - ``last``: its last token's state: in a causal LM the only position that has read the whole text;
    - ``first``: its first token's state (BERT's [CLS] convention): in a causal LM that position has seen nothing
      after it, so texts that start with the same token get the same vector.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    inputs, own = _batch(model, tokenizer, texts)
    states = model(**inputs, output_hidden_states=True).hidden_states[-1].float()  # (n, T, d)
    if pooling == "mean":
        return (states * own[..., None]).sum(1) / own.sum(1, keepdim=True)
    positions = torch.arange(own.shape[1]).expand_as(own)
    if pooling == "last":
        pick = torch.where(own, positions, -1).amax(1)
    else:
        pick = torch.where(own, positions, own.shape[1]).amin(1)
    return states[torch.arange(len(texts)), pick]


def bag_of_words_embeddings(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]
                            ) -> torch.Tensor:
    """(n, d) the sum of each text's input token embeddings: word order cannot matter. Computed as token counts
    times the embedding table, so two orderings of the same tokens give bit-identical vectors."""
    table = _input_table(model)
    counts = torch.zeros(len(texts), len(table))
    for row, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text {row + 1} ({text!r}) has no tokens. Fix: give a non-empty text.")
        counts[row] = torch.bincount(torch.tensor(ids), minlength=len(table)).float()
    return counts @ table


def pairwise(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The (n, n) cosine and dot-product matrices of n vectors, in float64 (a vector against itself gives 1 to
    ~1e-16, not float32's ~1e-7)."""
    v = vectors.double()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return {"cosine": (unit @ unit.T).clamp(-1, 1), "dot": v @ v.T}


def plot_similarity(matrices: dict[str, dict[str, torch.Tensor]], texts: list[str], path: Path, title: str) -> Path:
    """One heat map per (kind of vector, metric): rows are kinds (contextual, bag of words), columns metrics."""
    plt = pyplot()
    n = len(texts)
    side = max(3.2, 0.55 * n + 2.2)
    fig, axes = plt.subplots(len(matrices), 2, figsize=(2 * side + 1.5, (side - 0.4) * len(matrices) + 0.5), squeeze=False,
                             layout="constrained")
    ticks = [f"{i + 1}: {label(t, 22)}" for i, t in enumerate(texts)]
    for row, (kind, pair) in enumerate(matrices.items()):
        for col, metric in enumerate(("cosine", "dot")):
            ax, values = axes[row, col], pair[metric].numpy()
            limits = dict(vmin=-1, vmax=1) if metric == "cosine" else {}
            image = ax.imshow(values, cmap="RdBu_r" if metric == "cosine" else "viridis", **limits)
            fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity" if metric == "cosine" else "dot product")
            ax.set_title(f"{kind}\n{'cosine similarity' if metric == 'cosine' else 'dot product'}", fontsize=10)
            ax.set_xticks(range(n), [str(i + 1) for i in range(n)])
            ax.set_yticks(range(n), ticks, fontsize=8)
            ax.set_xlabel("text")
            if n <= 12:
                low, high = image.get_clim()
                for (i, j), value in _cells(values):
                    # dark cells (strong red/blue; viridis' low end) get white text, light ones black
                    dark = abs(value) > 0.6 if metric == "cosine" else (value - low) / ((high - low) or 1) < 0.6
                    ax.text(j, i, f"{value:.2f}" if metric == "cosine" else f"{value:.3g}", ha="center", va="center",
                            fontsize=8, color="white" if dark else "black")
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def _cells(values):
    return (((i, j), values[i, j]) for i in range(values.shape[0]) for j in range(values.shape[1]))
