"""Fine-tuning stage: LoRA (PEFT) on a base model with the shared training loop → a PEFT adapter (+ a merged model).

    artifacts.base_model ──loading.load_base──► fp32 model ──get_peft_model──► LoRA model ─────────┐
    finetune.data ──load_splits──► rows ──pipeline.examples or packed blocks──► DataLoader ───┴──► train()
    train() ──save_trained──► finetune/adapter/ ──merge_adapter (finetune.merge)──► finetune/merged/

Tasks (``finetune.task``):

* ``causal_lm``: domain text, tokenized and packed exactly like pretraining (`data.block_loaders`). The
  validation loss, perplexity and bits per byte are logged by the loop.
* ``instruction``: prompt → response pairs. ``finetune.label_column`` names the **response** column and
  ``finetune.prompt_template`` is a Python format string over the row's columns; the prompt's tokens get label
  -100, so only the response and its EOS are trained. With no template, the tokenizer's chat template renders
  the row's ``text`` as the user turn and the response as the assistant turn (the template must mark replies
  with ``{% generation %}``, as ours does). For ICD-10-CM, code → title::

      finetune: {task: instruction, prompt_template: "ICD-10-CM code {code} means: ", label_column: title,
                 data: {sources: [{name: icd10cm}]}}

  End the template with the separator you want before the response (a space or a newline): prompt and
  response are encoded separately, as they are at generation time, the separator with the response
  (`pipeline.examples`).
* ``classification``: `AutoModelForSequenceClassification` on ``text`` with the integer (or `ClassLabel`)
  labels of ``finetune.label_column`` (icd10cm: ``chapter_id``); ``num_labels`` from the recipe, else from the
  data. PEFT trains the new head in full (``modules_to_save``, which it fills with ``score``/``classifier``
  for this task type) and saves it with the adapter. Accuracy is measured by the evaluation stage.

Instruction and classification examples are at most ``finetune.data.block_size`` tokens, one example per row,
right-padded per batch (`data.collate`). Outputs in ``output_dir/finetune/``: the loop's ``metrics.jsonl``,
``checkpoints/`` and ``loss_curve.png``; ``adapter/`` (PEFT adapter + tokenizer, loads with
``PeftModel.from_pretrained(base, dir)`` or ``AutoPeftModelForCausalLM.from_pretrained(dir)``); and with
``finetune.merge``, ``merged/``: the adapter merged into the base in float32, a plain ``from_pretrained`` folder.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.adapter_card import AdapterFacts, write_adapter_card
from pipeline.artifacts import RunArtifacts, base_model, portable_location
from pipeline.data import (
    block_loaders,
    collate,
    held_out_sections,
    load_splits,
    token_byte_lengths,
)
from pipeline.examples import check_columns, classification_examples, instruction_examples, label_range
from pipeline.loading import check_lora_targets, load_base, load_tokenizer, lora_config, merge_adapter
from pipeline.recipe import Recipe
from pipeline.training import TrainResult, save_trained, seed_everything, train

__all__ = ["NAME", "check_lora_targets", "lora_config", "run"]

NAME = "finetune"



# ------------------------------------------------------------------------------------------ the stage


def run(recipe: Recipe, accelerator: Accelerator) -> TrainResult:
    """The fine-tuning stage of a recipe: LoRA on the base, trained with ``recipe.finetune.train``.

    Writes ``output_dir/finetune/{metrics.jsonl, checkpoints/, loss_curve.png, adapter/}`` and, with
    ``finetune.merge``, ``merged/``. Returns the loop's `TrainResult`; its model is the prepared PEFT model
    (for classification wrapped in `_WindowNormalizedLoss`, whose ``.model`` is the PEFT model).
    """
    section, cfg = recipe.finetune, recipe.finetune.train
    run_folders = RunArtifacts.of(recipe)
    base = base_model(recipe)  # fails here, before any compute, when the base is missing
    tokenizer = load_tokenizer(base, fallback=run_folders.tokenizer)
    seed_everything(recipe.seed)  # the head and LoRA init depend on the recipe, not on what ran before

    # Raw rows are cheap to load; classification needs them to size its head before the model is built.
    documents = None if section.task == "causal_lm" else _load_documents(recipe, accelerator)
    labels = None
    if section.task == "classification":
        labels = _label_space(documents, section.label_column, section.num_labels)
    peft_config = lora_config(section.lora, section.task)
    untuned = _setup_base(base, section.task, labels, tokenizer)
    check_lora_targets(untuned, peft_config)  # before any tokenization: a typo fails in seconds
    model = get_peft_model(untuned, peft_config)
    # adapter_config.json names the base for AutoPeftModel*: a Hub id, or a path relative to where the run started.
    model.peft_config["default"].base_model_name_or_path = portable_location(base)
    trainable, total = model.get_nb_trainable_parameters()

    if section.task == "causal_lm":
        train_loader, eval_loader = block_loaders(
            section.data, tokenizer, batch_size=cfg.batch_size, seed=recipe.seed, accelerator=accelerator,
            held_out_by=held_out_sections(recipe),
        )
    else:
        train_loader, eval_loader = _example_loaders(recipe, tokenizer, documents, accelerator)
    byte_lengths = _byte_lengths(tokenizer)
    if section.task == "classification":
        # `train` evaluates causal-LM labels only; the evaluation stage measures accuracy.
        eval_loader, byte_lengths, model = None, None, _WindowNormalizedLoss(model)

    result = train(model, train_loader, eval_loader, cfg, run_folders.finetune, accelerator,
                   byte_lengths=byte_lengths, run_name=NAME)
    wrapped = isinstance(accelerator.unwrap_model(result.model), _WindowNormalizedLoss)
    save_trained(accelerator, result.model, tokenizer, run_folders.adapter, inner="model" if wrapped else None)
    if accelerator.is_main_process:  # over PEFT's empty template
        write_adapter_card(run_folders.adapter, AdapterFacts(
            base=base, task=section.task, sources=[source.name for source in section.data.sources],
            steps=result.state.step, r=section.lora.r, alpha=section.lora.alpha, dropout=section.lora.dropout,
            target_modules=section.lora.target_modules, trainable=trainable, total=total,
            validation=result.final_eval))
    if section.merge:
        if accelerator.is_main_process:
            # A plain fp32 copy of the base on this process alone: under ZeRO-3, from_pretrained would otherwise
            # partition it with a collective the other ranks (waiting below) never join.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            merge_adapter(run_folders.adapter, _setup_base(base, section.task, labels, tokenizer), run_folders.merged)
        accelerator.wait_for_everyone()
    return result


def _setup_base(base: str, task: str, labels: tuple[int, dict[int, str] | None] | None,
                tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """`load_base`, with the class names in the config when the label column is a `ClassLabel`."""
    num_labels, id2label = labels or (None, None)
    model = load_base(base, task, num_labels, tokenizer)
    if id2label is not None:
        model.config.id2label, model.config.label2id = id2label, {name: i for i, name in id2label.items()}
    return model


# ------------------------------------------------------------------------------------------ model and adapter


class _WindowNormalizedLoss(torch.nn.Module):
    """Turns a classification head's per-micro-batch mean loss into Σ loss / ``num_items_in_batch``, the loop's
    contract: a mean per micro-batch would weigh gradient accumulation and ranks wrongly (×window×ranks).
    Transformers' causal LMs honour ``num_items_in_batch`` themselves; sequence-classification heads do not."""

    def __init__(self, model: PeftModel):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | int | None = None,
                **inputs: Any) -> Any:
        outputs = self.model(labels=labels, **inputs)
        if labels is not None and num_items_in_batch is not None:
            outputs.loss = outputs.loss * labels.shape[0] / num_items_in_batch
        return outputs

    def __getattr__(self, name: str) -> Any:  # gradient checkpointing, config, ... reach the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


# ------------------------------------------------------------------------------------------ data helpers


def _load_documents(recipe: Recipe, accelerator: Accelerator) -> tuple[Dataset, Dataset]:
    data = recipe.finetune.data
    if data.streaming:
        raise ValueError(
            f"task {recipe.finetune.task!r} reads its examples in memory. Fix: set finetune.data.streaming: false "
            "(streaming is for task causal_lm)."
        )
    with accelerator.main_process_first():
        return load_splits(data, recipe.seed, held_out_sections(recipe))


def _example_loaders(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, documents: tuple[Dataset, Dataset],
                     accelerator: Accelerator) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of instruction or classification examples (right-padded per batch)."""
    section, batch_size = recipe.finetune, recipe.finetune.train.batch_size
    if section.task == "instruction":
        encode = partial(instruction_examples, tokenizer=tokenizer, prompt_template=section.prompt_template,
                         response_column=section.label_column, max_length=section.data.block_size)
        collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    else:
        encode = partial(classification_examples, tokenizer=tokenizer, label_column=section.label_column,
                         max_length=section.data.block_size)
        collate_fn = partial(_collate_classification, pad_token_id=tokenizer.pad_token_id)
    with accelerator.main_process_first():  # the other ranks read the main process's cache files
        train_examples, validation_examples = (encode(split) for split in documents)
    train_loader = DataLoader(train_examples, batch_size=batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate_fn)
    validation_loader = DataLoader(validation_examples, batch_size=batch_size, collate_fn=collate_fn)
    return train_loader, validation_loader


def _collate_classification(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` pads the token ids; the labels are one class per example, (B,)."""
    batch = collate([{"input_ids": example["input_ids"]} for example in examples], pad_token_id)
    # Always a mask: without it the head finds the last token by pad_token_id, which is EOS for many external bases.
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    return batch


def _label_space(splits: tuple[Dataset, ...], column: str, num_labels: int | None) -> tuple[int, dict[int, str] | None]:
    """(num_labels, id2label or None): the recipe's count, else a `ClassLabel`'s, else the largest label + 1."""
    for split in splits:
        check_columns(split, ["text", column], "finetune.label_column")
    feature = splits[0].features[column]
    names = feature.names if isinstance(feature, ClassLabel) else None
    bounds = [label_range(split, column) for split in splits]
    low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
    count = num_labels or (len(names) if names else high + 1)
    if low < 0 or high >= count:
        raise ValueError(
            f"labels in column {column!r} range over [{low}, {high}] but num_labels is {count}. Fix: labels must be "
            "0 .. num_labels-1; raise finetune.num_labels or fix the data."
        )
    if count < 2:
        raise ValueError(f"column {column!r} holds a single class (0): classification needs at least two")
    return count, dict(enumerate(names)) if names and len(names) == count else None


def _byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
    """Bytes per token for bits per byte; None for tokenizers that are not byte-level BPE (no exact byte count)."""
    try:
        return token_byte_lengths(tokenizer)
    except ValueError:
        return None
