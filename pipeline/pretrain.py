"""Pretraining stage: tokenizer + corpus → token blocks → Quill from its config (or a given model) → the shared
training loop → `output_dir/pretrain/`, a `save_pretrained` folder that `AutoModelForCausalLM` loads.

    recipe.data ──load_corpus──► documents ──tokenize_and_pack──► blocks ──DataLoader──► train() ──► save_final_model
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.data import collate, load_corpus, token_byte_lengths, tokenize_and_pack
from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.recipe import DataSection, ModelSection, Recipe, TrainSection
from pipeline.training import TrainResult, train

def quill_config(section: ModelSection, tokenizer: PreTrainedTokenizerBase) -> QuillConfig:
    """The model section of a recipe as a QuillConfig whose vocabulary and special ids come from the tokenizer."""
    return QuillConfig(
        vocab_size=len(tokenizer),
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers,
        num_attention_heads=section.num_attention_heads,
        num_key_value_heads=section.num_key_value_heads,
        hidden_act=section.hidden_act,
        position_embedding_type=section.position_embedding_type,
        max_position_embeddings=section.max_position_embeddings,
        rope_theta=section.rope_theta,
        rms_norm_eps=section.rms_norm_eps,
        attention_dropout=section.dropout,
        hidden_dropout=section.dropout,
        tie_word_embeddings=section.tie_word_embeddings,
        initializer_range=section.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(section: ModelSection, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh Quill from the recipe, or `section.path` (any causal LM) to continue pretraining.
    Trainable weights are always fp32: mixed precision autocasts the compute, and a bf16 master copy would
    swallow small updates (transformers 5 loads in the checkpoint's dtype by default)."""
    if section.path is not None:
        model = AutoModelForCausalLM.from_pretrained(section.path, dtype=torch.float32)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but model {section.path} only embeds "
                f"{model.get_input_embeddings().num_embeddings}: use the model's own tokenizer (tokenizer.path)"
            )
    else:
        model = QuillForCausalLM(quill_config(section, tokenizer))
    model.set_attn_implementation(section.attn_implementation)
    return model


def block_loaders(
    data: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of packed (or single-document) blocks. Tokenization runs on the main process
    first; the other ranks then read its cache files instead of tokenizing again."""
    with accelerator.main_process_first():
        train_docs, validation_docs = load_corpus(
            data.sources, seed=seed, validation_fraction=data.validation_fraction, max_documents=data.max_documents,
            streaming=data.streaming, validation_documents=data.validation_documents,
        )
        pack = partial(
            tokenize_and_pack, tokenizer=tokenizer, block_size=data.block_size, packing=data.packing,
            document_masking=data.document_masking, num_proc=data.num_proc,
        )
        train_blocks, validation_blocks = pack(train_docs), pack(validation_docs)
    collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    shuffle = not data.streaming  # an IterableDataset is read in order (shuffle it with a buffer upstream)
    train_loader = DataLoader(train_blocks, batch_size=batch_size, shuffle=shuffle, drop_last=True, collate_fn=collate_fn)
    validation_loader = DataLoader(validation_blocks, batch_size=eval_batch_size or batch_size, collate_fn=collate_fn)
    return train_loader, validation_loader


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


def run_pretrain(recipe: Recipe, accelerator: Accelerator) -> TrainResult:
    """The pretraining stage of a recipe; the model lands in `output_dir/pretrain/`."""
    folder = recipe.output_dir / "pretrain"
    tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir / "tokenizer")
    cfg: TrainSection = recipe.pretrain
    train_loader, validation_loader = block_loaders(
        recipe.data, tokenizer, batch_size=cfg.batch_size, seed=recipe.seed, accelerator=accelerator
    )
    model = build_model(recipe.model, tokenizer)
    result = train(
        model, train_loader, validation_loader, cfg, folder, accelerator,
        byte_lengths=token_byte_lengths(tokenizer), run_name="pretrain",
    )
    save_final_model(accelerator, result.model, tokenizer, folder)
    return result
