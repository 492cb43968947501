"""Small shared test models and data: the tiny Quill (also the `tiny_quill` fixture of conftest.py) and the
ICD-like rows the evaluation and prompting tests are built on."""

from __future__ import annotations

import random

import torch

from pipeline.data import collate
from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.tokenizer import train_tokenizer

WORDS = ("acute chronic fever infection of the lung heart kidney bone with without mention due to other "
         "unspecified disease injury fracture left right upper lower limb").split()


def tiny_quill(tokenizer=None, *, seed: int = 0, **overrides) -> QuillForCausalLM:
    """A tiny Quill (2 layers of width 32, 4 query / 2 key-value heads) in eval mode; vocabulary and special ids
    from ``tokenizer`` unless ``overrides`` give them."""
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if tokenizer is not None:
        config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return QuillForCausalLM(QuillConfig(**{**config, **overrides})).eval()


def make_rows(n: int = 40) -> list[dict]:
    """ICD-like rows: a code, a title, a text that starts with both, and a class label."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))).capitalize()
        notes = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        rows.append({"code": f"A{i:02d}", "title": title, "text": f"A{i:02d} {title}\nNotes: {notes}", "label": i % 3})
    return rows


def rows_tokenizer():
    """A small byte-level BPE trained on `make_rows`."""
    return train_tokenizer([row["text"] for row in make_rows()], vocab_size=300)


def rows_quill(tokenizer, **overrides) -> QuillForCausalLM:
    """The tiny Quill of the evaluation tests: multi-head attention, positions up to 128."""
    return tiny_quill(tokenizer, **{"num_key_value_heads": None, "max_position_embeddings": 128, **overrides})


def fitted_quill(tokenizer, texts: list[str]) -> QuillForCausalLM:
    """A `rows_quill` fitted for a few full-batch steps on `texts` (each document as [bos] + tokens + [eos])."""
    model = rows_quill(tokenizer).train()
    documents = [{"input_ids": [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids,
                                tokenizer.eos_token_id][:96]} for t in texts]
    batch = collate(documents, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(15):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
