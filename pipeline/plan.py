"""The dry run: what a recipe will build and spend, before it builds anything (`pipeline run RECIPE --dry-run`).

The model is instantiated on the meta device from the same `quill_config` the pretrain stage uses, so the
parameter count is the real one; no data is read and no weights are allocated.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.loading import quill_config
from pipeline.models.quill import QuillForCausalLM
from pipeline.recipe import Recipe
from pipeline.runner import is_up_to_date

__all__ = ["plan"]


def plan(recipe: Recipe, num_processes: int = 1) -> dict[str, Any]:
    """Parameter count, tokens and steps per training stage, and a rough memory estimate."""
    result: dict[str, Any] = {"processes": num_processes}
    model = recipe.model
    if model.path is None:
        with torch.device("meta"):
            params = sum(p.numel() for p in QuillForCausalLM(quill_config(model, recipe.tokenizer.vocab_size)).parameters())
        result["parameters"] = params
        # fp32 weights + grads + two AdamW moments = 16 bytes/parameter; activations ~ 34·B·T·h bytes per layer.
        activations = 34 * recipe.pretrain.batch_size * recipe.data.block_size * model.hidden_size * model.num_hidden_layers
        result["memory_estimate_gb"] = round((16 * params + activations) / 1e9, 3)
    for name, train, data in (("pretrain", recipe.pretrain, recipe.data),
                              ("finetune", recipe.finetune.train, recipe.finetune.data)):
        if not recipe.runs(name):
            continue
        tokens_per_step = train.batch_size * train.gradient_accumulation_steps * num_processes * data.block_size
        result[name] = {
            "steps": train.max_steps,
            "tokens_per_step": tokens_per_step,
            "tokens": tokens_per_step * train.max_steps,
            "stage_up_to_date": is_up_to_date(recipe, name),
        }
    return result
