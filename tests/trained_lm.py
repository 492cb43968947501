"""A tiny Quill trained for a few hundred steps on Shakespeare, so generation and client tests see a model whose
outputs depend on its context (a random model's greedy tokens barely do). Built once per test session
(`trained_lm` in conftest.py); about 20 s on 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.corpora.shakespeare import shakespeare
from pipeline.tokenizer import train_tokenizer

BLOCK, BATCH, STEPS, LEARNING_RATE = 64, 16, 400, 3e-3
TRAIN_CHARACTERS, HELD_OUT_CHARACTERS = 600_000, 20_000


@dataclass
class TrainedLM:
    folder: Path  # save_pretrained folder: weights, config, exported code, tokenizer
    model: QuillForCausalLM  # in eval mode, fp32
    tokenizer: PreTrainedTokenizerBase
    held_out: str  # text the model never trained on
    final_loss: float


def corpus() -> tuple[str, str]:
    text = "\n\n".join(shakespeare()["text"])
    return text[:TRAIN_CHARACTERS], text[TRAIN_CHARACTERS : TRAIN_CHARACTERS + HELD_OUT_CHARACTERS]


def build(folder: Path, **config_overrides) -> TrainedLM:
    torch.manual_seed(0)
    train_text, held_out = corpus()
    tokenizer = train_tokenizer([train_text[i : i + 2000] for i in range(0, len(train_text), 2000)], vocab_size=512,
                                model_max_length=2 * BLOCK)
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False, verbose=False)["input_ids"])
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    config = QuillConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2 * BLOCK, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_overrides)
    model = QuillForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TrainedLM(folder, model, tokenizer, held_out, loss.item())
