"""Pretraining stage: tokenizer + corpus → token blocks → Quill from its config (or a given model) → the shared
training loop → `output_dir/pretrain/`, a `save_pretrained` folder that `AutoModelForCausalLM` loads.

    recipe.data ──block_loaders──► packed blocks ─┐
    recipe.model ──build_model──► fp32 model ─────┴──► train() ──► save_final_model ──► pretrain/
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.artifacts import RunArtifacts
from pipeline.data import block_loaders, token_byte_lengths
from pipeline.loading import build_model
from pipeline.recipe import Recipe
from pipeline.training import TrainResult, train

NAME = "pretrain"


def run(recipe: Recipe, accelerator: Accelerator) -> TrainResult:
    """The pretraining stage of a recipe; the model lands in `output_dir/pretrain/`."""
    run_folders = RunArtifacts.of(recipe)
    tokenizer = AutoTokenizer.from_pretrained(run_folders.tokenizer)
    train_loader, validation_loader = block_loaders(
        recipe.data, tokenizer, batch_size=recipe.pretrain.batch_size, seed=recipe.seed, accelerator=accelerator
    )
    model = build_model(recipe.model, tokenizer)
    result = train(
        model, train_loader, validation_loader, recipe.pretrain, run_folders.pretrain, accelerator,
        byte_lengths=token_byte_lengths(tokenizer), run_name=NAME,
    )
    save_final_model(accelerator, result.model, tokenizer, run_folders.pretrain)
    return result


def save_final_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> None:
    """`save_pretrained` of the trained model (gathered from FSDP/DeepSpeed shards) and its tokenizer, so
    `AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load them."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()
