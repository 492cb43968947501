"""Fine-tuning stage: LoRA (PEFT) on a base model with the shared training loop → a PEFT adapter (+ a merged model).

    artifacts.base_model ──loading.load_base──► fp32 model ──get_peft_model──► LoRA model ──┐
    finetune.data ──load_splits──► rows ──examples or packed blocks──► DataLoader ───────────────────┴──► train()
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
  response are encoded separately, as they are at generation time, and simply concatenated.
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

import re
import string
from functools import partial
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.adapter_card import AdapterFacts, write_adapter_card
from pipeline.artifacts import RunArtifacts, base_model, portable_location
from pipeline.data import (
    IGNORE_INDEX,
    block_loaders,
    cached_map,
    collate,
    held_out_sections,
    load_splits,
    token_byte_lengths,
)
from pipeline.generation import split_delimiter
from pipeline.loading import check_lora_targets, load_base, load_tokenizer, lora_config, merge_adapter
from pipeline.recipe import Recipe
from pipeline.training import TrainResult, save_trained, seed_everything, train

__all__ = ["NAME", "check_lora_targets", "classification_examples", "instruction_examples", "lora_config", "run"]

NAME = "finetune"

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


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


# ------------------------------------------------------------------------------------------ examples


def instruction_examples(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_template: str | None,
    response_column: str,
    max_length: int,
) -> Dataset:
    """Prompt → response rows as ``input_ids`` and ``labels`` (-100 on the prompt, response + EOS trained).

    ``prompt_template`` is a format string over the row's columns (``"ICD-10-CM code {code} means: "``); the
    example is ``[bos] + prompt + response + [eos]``, exactly one BOS; the prompt's trailing whitespace is encoded
    with the response (`generation.split_delimiter`: " Cholera", not " " + "Cholera"). With None, the tokenizer's chat template
    renders ``text`` as the user turn and the response as the assistant turn, and its ``{% generation %}``
    mask picks the trained tokens. Examples are cut to ``max_length`` tokens; those left without any response
    token are dropped. A `ClassLabel` response column gives its names. Cached like the pretraining blocks.
    """
    _check_columns(dataset, [response_column] + (["text"] if prompt_template is None else []), "finetune.label_column")
    if prompt_template is None:
        _check_chat_template(tokenizer)
    else:
        _check_template(prompt_template, dataset.column_names)
    feature = dataset.features[response_column]
    encode = partial(
        _encode_instruction, tokenizer=tokenizer, template=prompt_template, response_column=response_column,
        max_length=max_length, names=feature.names if isinstance(feature, ClassLabel) else None,
    )
    settings = {"task": "instruction", "template": prompt_template, "response_column": response_column,
                "max_length": max_length, "delimiter": "with the response"}
    examples = _cached_map(dataset, encode, tokenizer, settings, with_labels=datasets.Sequence(datasets.Value("int32")))
    if len(examples) == 0:
        raise ValueError(
            f"no instruction example keeps a response token within max_length={max_length}: the prompts are too long. "
            "Fix: raise finetune.data.block_size or shorten the prompt template."
        )
    return examples


def classification_examples(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, label_column: str, max_length: int
) -> Dataset:
    """``text`` → ``input_ids`` (the tokenizer's own special tokens, cut to ``max_length``) and the integer class
    in ``labels``, one per example. Cached like the pretraining blocks."""
    _check_columns(dataset, ["text", label_column], "finetune.label_column")
    _label_range(dataset, label_column)
    encode = partial(_encode_classification, tokenizer=tokenizer, label_column=label_column, max_length=max_length)
    settings = {"task": "classification", "label_column": label_column, "max_length": max_length}
    return _cached_map(dataset, encode, tokenizer, settings, with_labels=datasets.Value("int64"))


def _encode_instruction(
    batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, template: str | None, response_column: str,
    max_length: int, names: list[str] | None,
) -> dict[str, list[list[int]]]:
    responses = [names[r] if names is not None else str(r) for r in batch[response_column]]
    if template is None:
        conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": response}]
                         for text, response in zip(batch["text"], responses)]
        # The template writes the BOS itself, and tokenize=True encodes without adding another.
        chats = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        pairs = [(ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)])
                 for ids, mask in zip(chats["input_ids"], chats["assistant_masks"])]
    else:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        split = [split_delimiter(template.format(**row)) for row in rows]  # "code " -> "code", " title"
        prompts = tokenizer([prompt for prompt, _ in split], add_special_tokens=False)["input_ids"]
        answers = tokenizer([delimiter + response for (_, delimiter), response in zip(split, responses)],
                            add_special_tokens=False)["input_ids"]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        pairs = []
        for prompt, answer in zip(prompts, answers):
            target = [*answer, tokenizer.eos_token_id]
            pairs.append((bos + prompt + target, [IGNORE_INDEX] * (len(bos) + len(prompt)) + target))
    kept = [(ids[:max_length], labels[:max_length]) for ids, labels in pairs]
    # Labels are shifted in the loss: position 0 is never a target, so an example needs one at position >= 1.
    kept = [(ids, labels) for ids, labels in kept if any(label != IGNORE_INDEX for label in labels[1:])]
    return {"input_ids": [ids for ids, _ in kept], "labels": [labels for _, labels in kept]}


def _encode_classification(
    batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, label_column: str, max_length: int
) -> dict[str, list]:
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_attention_mask=False)
    return {"input_ids": encoded["input_ids"], "labels": batch[label_column]}


def _cached_map(dataset: Dataset, function: Any, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any],
                with_labels: Any) -> Dataset:
    """`data.cached_map` to ``input_ids`` + ``labels`` (bump `data.PREPROCESSING_VERSION` when an encoding changes)."""
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": with_labels})
    return cached_map(dataset, function, tokenizer=tokenizer, settings=settings, features=features,
                      kind=settings["task"], desc=f"Encoding {settings['task']}")


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
        _check_columns(split, ["text", column], "finetune.label_column")
    feature = splits[0].features[column]
    names = feature.names if isinstance(feature, ClassLabel) else None
    bounds = [_label_range(split, column) for split in splits]
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


def _label_range(dataset: Dataset, column: str) -> tuple[int, int]:
    """(min, max) of an integer label column; a clear error for strings, floats or missing labels."""
    feature = dataset.features[column]
    dtype = feature.dtype if isinstance(feature, datasets.Value) else ""
    if not isinstance(feature, ClassLabel) and not dtype.startswith(("int", "uint")):
        raise ValueError(
            f"classification labels must be integer class ids, but column {column!r} is {feature}. Fix: store ids "
            "0 .. num_labels-1 (or a datasets ClassLabel) in that column."
        )
    values = dataset.with_format("arrow")[column]
    if values.null_count:
        raise ValueError(f"column {column!r} has {values.null_count} rows without a label. Fix: drop or label them.")
    bounds = pc.min_max(values)
    return bounds["min"].as_py(), bounds["max"].as_py()


def _check_columns(dataset: Dataset, columns: list[str], key: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the fine-tuning data has no column {missing} (columns: {dataset.column_names}). Fix: set {key} (or the "
            "source's text_column) to one of them."
        )


def _check_template(template: str, columns: list[str]) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"finetune.prompt_template {template!r} is not a valid format string: {error}") from None
    unknown = [f for f in fields if not f or f.split(".")[0].split("[")[0] not in columns]
    if unknown:
        raise ValueError(
            f"finetune.prompt_template uses fields {unknown} that are not columns of the data ({columns}). Fix: write "
            "'{column}' with one of those columns (positional '{}' is not allowed); double braces for literal ones."
        )


def _check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    template = tokenizer.chat_template
    if not isinstance(template, str) or not _GENERATION_BLOCK.search(template):
        problem = "has no chat template" if not template else "has a chat template without {% generation %} blocks"
        raise ValueError(
            f"the tokenizer {problem}, so the prompt cannot be masked out of the loss. Fix: set "
            "finetune.prompt_template (e.g. 'Question: {text}\\nAnswer: '), or use a chat template that wraps the "
            "assistant's reply in {% generation %} ... {% endgeneration %}."
        )


def _byte_lengths(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
    """Bytes per token for bits per byte; None for tokenizers that are not byte-level BPE (no exact byte count)."""
    try:
        return token_byte_lengths(tokenizer)
    except ValueError:
        return None
