"""From logits to text: the softmax over the vocabulary for the next token, and decoding strategies side by side."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from pipeline.concepts._shared import check_top, encode


@torch.no_grad()
def next_token_distribution(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, top: int = 10, temperature: float = 1.0
) -> list[tuple[str, float]]:
    """The most likely next tokens: softmax(logits / temperature) over the whole vocabulary. Temperature 0 is the
    limit of that softmax, greedy decoding: all the mass on the argmax (the first one, on a tie)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature} (0 means greedy)")
    inputs = encode(model, tokenizer, text)
    logits = model(**inputs).logits[0, -1].float()
    check_top(top, len(logits))
    if temperature == 0:
        probs = F.one_hot(logits.argmax(), len(logits)).float()
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
    best = probs.topk(top)
    return [(tokenizer.decode([i]), p) for i, p in zip(best.indices.tolist(), best.values.tolist())]


DECODING = {
    "greedy": dict(do_sample=False),
    "temperature=0.7": dict(do_sample=True, temperature=0.7, top_k=0),
    "top-k=20": dict(do_sample=True, top_k=20),
    "top-p=0.9": dict(do_sample=True, top_p=0.9, top_k=0),
}


@torch.no_grad()
def decode_side_by_side(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 30, seed: int = 0,
    strategies: dict[str, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """The same prompt continued by each decoding strategy (sampling ones seeded, so runs repeat)."""
    inputs = encode(model, tokenizer, prompt, reserve=max_new_tokens)
    results = {}
    for name, kwargs in (strategies or DECODING).items():
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
        results[name] = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return results
