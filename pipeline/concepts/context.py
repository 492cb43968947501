"""One word in several sentences: its vector at every layer, and how alike those vectors are layer by layer. The
input embedding of a token is the same in every sentence (with RoPE nothing is added to it at the input); each
block mixes in the other tokens, so the same word drifts apart in different contexts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.concepts._shared import check_positions, label, pyplot, save


@dataclass
class WordInContext:
    sentence: str
    pieces: list[str]  # the tokens that cover the word in this sentence
    vectors: torch.Tensor  # (layers + 1, d): the input embeddings' output, then each block's (the last after the norm)


def find_word(word: str, sentence: str) -> tuple[int, int]:
    """The character span of the first occurrence of ``word`` as a whole word (not inside a longer one)."""
    if not word.strip():
        raise ValueError("WORD is empty. Fix: give the word to follow, e.g. bank")
    match = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", sentence)
    if match is None:
        raise ValueError(f"{word.strip()!r} does not occur as a word in {sentence!r} (the match is case-sensitive). "
                         "Fix: give sentences that contain it.")
    return match.span()


@torch.no_grad()
def word_in_context(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, word: str, sentences: list[str]
                    ) -> list[WordInContext]:
    """The vectors of ``word`` (its first occurrence in each sentence; the mean over its tokens when it is several)
    at every layer, from the model's ``hidden_states``."""
    spans = [find_word(word, s) for s in sentences]  # every sentence is checked before any forward pass
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("`inspect context` needs a fast tokenizer (it maps tokens to characters). Fix: save the "
                         "model with a tokenizer.json (PreTrainedTokenizerFast).")
    found = []
    for sentence, (start, end) in zip(sentences, spans):
        inputs = tokenizer(sentence, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
        check_positions(model, inputs["input_ids"].shape[1], what=f"the sentence {sentence!r}")
        offsets, special = inputs.pop("offset_mapping")[0].tolist(), inputs.pop("special_tokens_mask")[0].tolist()
        picked = [t for t, ((a, b), s) in enumerate(zip(offsets, special)) if not s and a < end and b > start]
        if not picked:  # a tokenizer whose offsets do not cover the text (a normalizer rewrote it)
            raise ValueError(f"no token of {sentence!r} covers {word.strip()!r}: this tokenizer's offsets do not map "
                             "back to the text. Fix: use a tokenizer without a normalizer, or another word.")
        states = model(**inputs, output_hidden_states=True).hidden_states  # (layers + 1) × (1, T, d)
        vectors = torch.stack([h[0, picked].float().mean(0) for h in states])
        pieces = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, picked].tolist())
        found.append(WordInContext(sentence, [tokenizer.convert_tokens_to_string([p]) for p in pieces], vectors))
    return found


def layer_similarities(found: list[WordInContext]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The sentence pairs (i, j), i < j, and the (layers + 1, pairs) cosine of the word's vectors per layer (float64:
    equal vectors give 1 to ~1e-16)."""
    pairs = list(combinations(range(len(found)), 2))
    v = torch.stack([f.vectors.double() for f in found])  # (sentences, layers + 1, d)
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return pairs, torch.stack([(unit[i] * unit[j]).sum(-1).clamp(-1, 1) for i, j in pairs], dim=1)


def layer_names(layers: int) -> list[str]:
    return ["embeddings", *(f"block {i}" for i in range(1, layers))]


def plot_context(word: str, found: list[WordInContext], pairs: list[tuple[int, int]], cosines: torch.Tensor,
                 path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2 + 0.25 * len(pairs)), layout="constrained")
    layers = range(cosines.shape[0])
    for column, (i, j) in enumerate(pairs):
        ax.plot(layers, cosines[:, column].numpy(), marker="o",
                label=f"{i + 1} vs {j + 1}: {label(found[i].sentence, 36)} / {label(found[j].sentence, 36)}")
    ax.set_xticks(list(layers), ["emb", *(str(i) for i in layers[1:])])
    ax.set_xlabel("layer (emb = input embeddings, n = output of block n; the last one after the final norm)")
    ax.set_ylabel("cosine similarity of the word's two vectors")
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_ylim(math.floor((float(cosines.min()) - 0.05) * 10) / 10, 1.02)  # the axis says where it starts
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    return save(fig, path)
