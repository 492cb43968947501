"""Prompting and decoding: the prompts a model is given, the completions it writes, and how they are scored.

    solved rows + a query ──few_shot_prompt (a prompt_template) / chat_prompt (the chat template)──► prompt
    prompts ──generate_samples (left-padded batches, GenerationSection settings, seeded)──► completions
           └─generate_across_processes: the same, the prompts split over the processes and gathered in order
    completions + references ──score_generations (cut at the first line break)──► exact match, ROUGE-L

Every function takes plain arguments (a model, a tokenizer, prompts, a `GenerationSection`), never a recipe: the
evaluation stage uses them, and so can a ``generate``, ``chat`` or ``serve`` command.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import PreTrainedTokenizerBase

from pipeline.metrics import load_metric
from pipeline.recipe import GenerationSection

__all__ = [
    "EXAMPLE_SEPARATOR",
    "FEW_SHOT_POOL",
    "build_prompt",
    "chat_prompt",
    "beside_greedy",
    "describe_decoding",
    "few_shot_prompt",
    "split_delimiter",
    "generate_across_processes",
    "generate_samples",
    "generation_kwargs",
    "score_generations",
]

EXAMPLE_SEPARATOR = "\n\n"  # between the solved examples of a few-shot prompt
FEW_SHOT_POOL = 1_000  # training rows the evaluation draws few-shot examples from (the pre-flight checks it)

_metric = cache(load_metric)  # each metric module loaded once
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ prompts


def build_prompt(tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict[str, Any]], query: dict[str, Any],
                 template: str | None, response_column: str) -> str:
    """The prompt of ``query`` after the solved ``examples``, as fine-tuning renders rows: ``template`` (a
    ``finetune.prompt_template``), or the chat template when it is None."""
    if template is None:
        return chat_prompt(tokenizer, examples, query, response_column)
    return few_shot_prompt(examples, query, template, len(examples), response_column=response_column)


def few_shot_prompt(
    examples: Sequence[dict[str, Any]], query: dict[str, Any], template: str, k: int, *, response_column: str = "label"
) -> str:
    """The first ``k`` of ``examples`` solved, then the query: ``prompt_1 + response_1``, ..., ``prompt_query``,
    separated by a blank line. A prompt is ``template.format(**row)``; like fine-tuning, the template ends with
    whatever separates prompt from response (``"ICD-10-CM code {code} means: "``), so a solved example is the
    prompt and the response simply concatenated."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if len(examples) < k:
        raise ValueError(f"few_shot_prompt needs {k} solved examples, got {len(examples)}")
    solved = [_format(template, example) + str(example[response_column]) for example in examples[:k]]
    prompt, _ = split_delimiter(_format(template, query))  # the model writes the delimiter with its answer
    return EXAMPLE_SEPARATOR.join([*solved, prompt])


def split_delimiter(prompt: str) -> tuple[str, str]:
    """``(prompt, delimiter)``: a rendered template's trailing whitespace, which belongs to the response.

    Byte-level BPE splits a trailing space off as a lone token that running text almost never has (there the space
    starts the next word's token: " Cholera"), so a prompt ending in one makes every answer start wrong. As
    lm-evaluation-harness does with its ``target_delimiter``, the space goes in front of the response instead, both
    in the training examples and in what the model is asked to continue."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):]


def _format(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format(**row)
    except KeyError as error:
        raise ValueError(
            f"prompt template {template!r} uses {error}, which the row lacks (columns: {sorted(row)})"
        ) from None


def chat_prompt(tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict[str, Any]], query: dict[str, Any],
                response_column: str) -> str:
    """The chat-template form (no ``prompt_template``), as fine-tuning renders it: ``text`` is the user turn and the
    response the assistant turn; solved examples come first as earlier turns."""
    messages = []
    for example in examples:
        messages += [{"role": "user", "content": example["text"]},
                     {"role": "assistant", "content": str(example[response_column])}]
    messages.append({"role": "user", "content": query["text"]})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ decoding


def generation_kwargs(gen: GenerationSection, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The recipe's decoding settings as `generate` arguments. Unset ``top_k``/``top_p`` are passed as "off"
    (0 / 1.0): `generate` fills a None from its global defaults, which would sample from the top 50 tokens only."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "num_return_sequences": gen.num_return_sequences,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_k=gen.top_k or 0, top_p=gen.top_p or 1.0)
    return kwargs


SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": None}
"""The sampled continuation the report shows beside a greedy one: greedy decoding of a small model tends to loop,
and one sample shows what the model's distribution holds."""


def beside_greedy(gen: GenerationSection) -> GenerationSection | None:
    """The recipe's decoding turned into `SAMPLED` (one sequence), or None when the recipe already samples."""
    return None if gen.do_sample else gen.model_copy(update={**SAMPLED, "num_return_sequences": 1})


def describe_decoding(gen: GenerationSection) -> str:
    if not gen.do_sample:
        return "greedy"
    parts = [f"temperature {gen.temperature:g}"] + ([f"top-k {gen.top_k}"] if gen.top_k else [])
    return "sampled, " + ", ".join(parts + ([f"top-p {gen.top_p:g}"] if gen.top_p else []))


def generate_samples(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    gen: GenerationSection,
    *,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Complete each prompt with the recipe's decoding settings: ``[{"prompt": p, "completions": [text, ...]}]``,
    ``gen.num_return_sequences`` completions each (new tokens only, special tokens dropped).

    A prompt is encoded as the training stages see text, ``[bos] + tokens`` (no second BOS when the prompt already
    starts with one, as a rendered chat template does); a prompt too long for the model's positions
    (``config.max_position_embeddings`` less ``max_new_tokens``) keeps its last tokens, where the question is.
    Batches are left-padded, so every row's new tokens start at the same column and the model's positions come
    from the attention mask. Sampling is seeded with ``seed`` (the global RNG is restored afterwards); a result
    depends on the batch it was generated in.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_prompt = positions - gen.max_new_tokens if positions else None
    if max_prompt is not None and max_prompt < 2:
        raise ValueError(f"max_new_tokens={gen.max_new_tokens} leaves no room for a prompt in {positions} positions")
    kwargs = generation_kwargs(gen, tokenizer)
    n = gen.num_return_sequences
    samples = []
    model.eval()
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type=device.type), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            inputs = {name: tensor.to(device) for name, tensor in _encode_prompts(tokenizer, batch, max_prompt).items()}
            output = model.generate(**inputs, **kwargs)  # (B * n, prompt length + new tokens)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            samples += [{"prompt": prompt, "completions": texts[i * n : (i + 1) * n]} for i, prompt in enumerate(batch)]
    return samples


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int | None
                    ) -> dict[str, torch.Tensor]:
    bos = tokenizer.bos_token_id
    ids = tokenizer(prompts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = [row if bos is None or row[:1] == [bos] else [bos, *row] for row in ids]
    if max_length is not None:  # keep the start token and the end of the prompt
        cut = [len(row) for row in ids if len(row) > max_length]
        if cut:  # said, not silent: the model answers a shorter question than the one asked
            _log.warning(f"{len(cut)} prompt(s) of up to {max(cut)} tokens exceed the {max_length} the model's "
                         "positions leave beside max_new_tokens: their first tokens after BOS are dropped")
        ids = [row if len(row) <= max_length else row[:1] + row[len(row) - max_length + 1 :] for row in ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in ids)
    # Left padding by hand: `tokenizer.pad` needs a pad token, which some tokenizers lack.
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(row)) + row for row in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids]),
    }


def generate_across_processes(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    gen: GenerationSection,
    accelerator: Accelerator,
    *,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """`generate_samples` with the prompts split over the processes, gathered back in order on every process."""
    with accelerator.split_between_processes(prompts) as mine:
        samples = generate_samples(model, tokenizer, list(mine), gen, seed=seed, batch_size=batch_size)
    return gather_object(samples) if accelerator.num_processes > 1 else samples


# ------------------------------------------------------------------------------------------ scoring


def _answer(completion: str, stop: str) -> str:
    """The response part of a completion: up to ``stop`` (where a few-shot continuation starts the next example)."""
    return completion.lstrip().split(stop, 1)[0].strip()


def score_generations(completions: list[str], references: list[str]) -> tuple[dict[str, float], list[str]]:
    """Exact match and ROUGE-L of completions against references, and the predictions scored: each completion up
    to its first line break (first blank line when some reference spans lines), whitespace stripped."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    stop = "\n\n" if any("\n" in reference.strip() for reference in references) else "\n"
    predictions = [_answer(completion, stop) for completion in completions]
    references = [reference.strip() for reference in references]
    scores = {
        "exact_match": _metric("exact_match").compute(predictions=predictions, references=references)["exact_match"],
        "rouge_l": _metric("rouge_l").compute(predictions=predictions, references=references)["rouge_l"],
    }
    return scores, predictions
