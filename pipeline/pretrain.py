"""Pretraining stage: tokenizer + corpus → token blocks → Quill from its config (or a given model) → the shared
training loop → `output_dir/pretrain/`, a `save_pretrained` folder that `AutoModelForCausalLM` loads.

    recipe.data ──block_loaders──► packed blocks ─┐
    recipe.model ──build_model──► fp32 model ─────┴──► train() ──► save_trained ──► pretrain/
"""

from __future__ import annotations


from accelerate import Accelerator
from transformers import AutoTokenizer

from pipeline.artifacts import RunArtifacts
from pipeline.data import block_loaders, held_out_sections, token_byte_lengths
from pipeline.loading import build_model
from pipeline.recipe import Recipe
from pipeline.training import TrainResult, save_trained, train

NAME = "pretrain"


def run(recipe: Recipe, accelerator: Accelerator) -> TrainResult:
    """The pretraining stage of a recipe; the model lands in `output_dir/pretrain/`."""
    run_folders = RunArtifacts.of(recipe)
    tokenizer = AutoTokenizer.from_pretrained(run_folders.tokenizer)
    train_loader, validation_loader = block_loaders(
        recipe.data, tokenizer, batch_size=recipe.pretrain.batch_size, seed=recipe.seed, accelerator=accelerator,
        held_out_by=held_out_sections(recipe),  # never train on a document the recipe evaluates as held out
    )
    model = build_model(recipe.model, tokenizer)
    result = train(
        model, train_loader, validation_loader, recipe.pretrain, run_folders.pretrain, accelerator,
        byte_lengths=token_byte_lengths(tokenizer), run_name=NAME,
    )
    save_trained(accelerator, result.model, tokenizer, run_folders.pretrain)
    return result
