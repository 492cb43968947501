"""Fine-tuning examples from rows, as the finetune stage trains on them and `pipeline data` shows them.

    rows ──instruction_examples──► [bos] + prompt + response + [eos], labels -100 on the prompt (a template, or the
                                   tokenizer's chat template and its {% generation %} mask)
    rows ──classification_examples──► input_ids + one integer label

Both are cached with `data.cached_map` under a fingerprint of data, tokenizer and settings.
"""

from __future__ import annotations

import re
import string
from functools import partial
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset
from transformers import PreTrainedTokenizerBase

from pipeline.data import IGNORE_INDEX, cached_map
from pipeline.generation import split_delimiter

__all__ = ["check_columns", "classification_examples", "instruction_examples", "label_range"]

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


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
    check_columns(dataset, [response_column] + (["text"] if prompt_template is None else []), "finetune.label_column")
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
    check_columns(dataset, ["text", label_column], "finetune.label_column")
    label_range(dataset, label_column)
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


def label_range(dataset: Dataset, column: str) -> tuple[int, int]:
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


def check_columns(dataset: Dataset, columns: list[str], key: str) -> None:
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
