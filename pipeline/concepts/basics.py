"""What a model is made of: the tokens a text becomes, and the parameters per component."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def tokenize_table(tokenizer: PreTrainedTokenizerBase, text: str) -> list[dict[str, Any]]:
    """One row per token: its id, its subword as text, and the UTF-8 bytes it covers."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [{"id": i, "token": tokenizer.decode([i]), "piece": tokenizer.convert_ids_to_tokens(i)} for i in ids]


# Checked in order, first match wins: an adapter's weights sit inside the modules they adapt
# (`...self_attn.q_proj.lora_A.default.weight`), so the adapter pattern must come before attention's and the MLP's.
COMPONENTS = (
    ("lora_", "LoRA adapter"), ("embed_tokens", "token embeddings"), ("embed_positions", "position embeddings"),
    ("self_attn", "attention"), ("mlp", "feed-forward"), ("norm", "norms"), ("lm_head", "output head"),
    ("score", "task head"),
)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per component; shared (tied) tensors are counted once, under the first name that holds them.
    With a PEFT LoRA adapter attached, its matrices (and DoRA magnitudes) are the "LoRA adapter" bucket."""
    groups: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        groups[component(name)] += param.numel()
    groups["total"] = sum(groups.values())
    return dict(groups)


def component(name: str) -> str:
    """The component a parameter name belongs to (see COMPONENTS)."""
    return next((label for key, label in COMPONENTS if key in name), "other")
