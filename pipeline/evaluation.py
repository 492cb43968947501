"""Evaluation stage: the base model and the tuned model side by side, on the same data with the same settings.

    general held-out text ─┐
    domain held-out text  ─┴─ language_model_metrics ──► perplexity, bits per byte; the change is forgetting
    held-out fine-tuning rows ─ generation: generate_samples ──► exact match, ROUGE-L (optionally few-shot)
                              └ classification: the head ─────► accuracy, macro-F1
    evaluate.generation.prompts ─ generate_samples ──────────► sample completions
                                           all ──► write_report ──► eval/report.json, report.md, *.png

What is measured (`recipe.evaluate`):

* ``perplexity`` (in ``tasks``): language modelling on a **general** set (``evaluate.general``, else the validation
  split of ``data``: the documents pretraining held out) and a **domain** set (``evaluate.domain``, else the
  validation split of ``finetune.data``), each capped at ``max_documents``. Rising general perplexity after
  fine-tuning is forgetting; the report shows the change.
* ``generation`` (in ``tasks``, or implied by ``finetune.task: instruction``): each held-out row's prompt
  (``finetune.prompt_template``, or the chat template) is completed with the ``evaluate.generation`` decoding
  settings and scored against its response column. With ``few_shot: k`` the prompt first holds k solved training
  rows (in-context evaluation, the only way an untuned base can do the task). A completion is cut at the first
  line break (at the first blank line when some reference spans lines), since a model continuing a few-shot prompt
  goes on to write the next example.
* ``classification`` (in ``tasks``, or implied by ``finetune.task: classification``): the classification head on
  held-out rows; the base gets the freshly initialised head fine-tuning started from (seeded), a chance reference.

The tuned model is the base plus the adapter (``finetune/adapter``, attached in place, so one copy of the weights
is held), or ``finetune/merged`` when it exists. With fine-tuning disabled only the base is evaluated.

``report.json`` keys (stable)::

    general, domain: {"base": {...}, "tuned": {...}, "change": {...}} or null
        per model: perplexity, bits_per_byte, loss (nats/token), tokens (scored), documents, bytes;
        change: relative change tuned / base - 1 of perplexity and bits_per_byte (+0.05 = 5% worse)
    tasks: {"generation": {...}, "classification": {...}} (only the tasks that ran)
        per model: exact_match, rouge_l / accuracy, f1 (macro); change: absolute difference tuned - base;
        rows (scored rows), few_shot (generation), preview (first rows with their predictions, generation)
    samples: [{"prompt": str, "base": [completion, ...], "tuned": [...]}]
    settings: models, data, decoding and sizes used
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import ClassLabel, Dataset, IterableDataset, concatenate_datasets
from peft import PeftConfig, PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from pipeline.data import IGNORE_INDEX, collate, load_corpus
from pipeline.finetune import base_location, load_base, load_tokenizer
from pipeline.metrics import load_metric
from pipeline.recipe import DataSection, GenerationSection, Recipe, SourceSection
from pipeline.sources import load_source
from pipeline.training import seed_everything

__all__ = [
    "few_shot_prompt",
    "generate_samples",
    "generation_kwargs",
    "language_model_metrics",
    "run_evaluation",
    "score_generations",
    "write_report",
]

MODELS = ("base", "tuned")
LM_METRICS = ("perplexity", "bits_per_byte")  # shown in the tables and plots; lower is better
EXAMPLE_SEPARATOR = "\n\n"  # between the solved examples of a few-shot prompt
PREVIEW_ROWS = 5  # generation-task rows shown with their predictions in the report
_FEW_SHOT_POOL = 1_000  # training rows few-shot examples are drawn from


# ------------------------------------------------------------------------------------------ the stage


def run_evaluation(recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    """The evaluation stage of a recipe: writes ``output_dir/eval/{report.json, report.md, *.png}`` (main process)
    and returns the report (every process). Raises before any compute when a model or a task's data is missing."""
    plan = _plan(recipe)
    tokenizer = load_tokenizer(plan.base, recipe.output_dir)
    data = _load_data(recipe, plan, tokenizer, accelerator)
    results: dict[str, dict[str, Any]] = {"base": {}}

    def measure_lm(model: torch.nn.Module, label: str) -> dict[str, Any]:
        return _measure_causal_lm(model, tokenizer, plan, data, accelerator, label)

    def measure_classifier(model: torch.nn.Module, label: str) -> dict[str, Any]:
        scores = _classify(model, tokenizer, data, plan, accelerator)
        accelerator.print(f"[evaluate] {label}: classification {scores}")
        return {"classification": scores}

    phases = []  # (task kind, tuned artefact, measure): one model in memory at a time
    if plan.needs_causal_lm:
        phases.append(("causal_lm", plan.tuned_causal_lm, measure_lm))
    if "classification" in plan.tasks:
        phases.append(("classification", plan.tuned_classifier, measure_classifier))
    for kind, tuned, measure in phases:
        base, after = _measure_pair(plan, kind, tuned, measure, tokenizer, accelerator)
        results["base"].update(base)
        if after is not None:
            results.setdefault("tuned", {}).update(after)

    report = _assemble(plan, data, results)
    if accelerator.is_main_process:
        write_report(report, recipe.output_dir / "eval")
    accelerator.wait_for_everyone()
    return report


@dataclass
class _Plan:
    """Everything the stage will do, decided and checked before anything is loaded."""

    recipe: Recipe
    base: str
    tuned_causal_lm: Path | None  # adapter folder or merged folder
    tuned_classifier: Path | None
    tasks: list[str]
    num_labels: int | None = None
    general_sources: list[SourceSection] | None = None
    domain_sources: list[SourceSection] | None = None
    general_is_held_out: bool = True  # the validation split of a training data section, not a dedicated set
    domain_is_held_out: bool = True

    @property
    def needs_causal_lm(self) -> bool:
        return bool({"perplexity", "generation"} & set(self.tasks)) or bool(self.recipe.evaluate.generation.prompts)


def _plan(recipe: Recipe) -> _Plan:
    section, finetune = recipe.evaluate, recipe.finetune
    tuned = finetune.enabled and finetune.train.enabled
    base = _base_location(recipe)
    implied = {"instruction": "generation", "classification": "classification"}.get(finetune.task) if tuned else None
    tasks = list(dict.fromkeys([*section.tasks, *([implied] if implied else [])]))
    # Generation scores prompt -> response rows: the instruction task's, or a causal LM's given a prompt_template
    # (ICD-10-CM documents open with "CODE title", so a model tuned on them answers "{code} " with the title).
    prompted_lm = finetune.task == "causal_lm" and finetune.prompt_template is not None
    if "generation" in tasks and finetune.task != "instruction" and not prompted_lm:
        raise ValueError(
            "evaluate.tasks lists 'generation', which scores prompt -> response rows of the fine-tuning data, but "
            f"finetune.task is {finetune.task!r} without a prompt_template. Fix: use finetune.task: instruction (with "
            "label_column naming the response column), set finetune.prompt_template (and label_column) for a causal "
            "LM, or remove 'generation' (evaluate.generation.prompts alone gives sample completions)."
        )
    if "classification" in tasks and not (tuned and finetune.task == "classification"):
        raise ValueError(
            "evaluate.tasks lists 'classification', which needs the classification head of a fine-tuned model. Fix: "
            "set finetune.task: classification (and enable fine-tuning), or remove 'classification'."
        )
    plan = _Plan(recipe=recipe, base=base, tuned_causal_lm=None, tuned_classifier=None, tasks=tasks)
    if tuned:
        adapter, merged = _finetune_artefacts(recipe)
        classifier = finetune.task == "classification"
        # A merged classifier has no usable LM head: language modelling goes through the adapter on the causal LM.
        plan.tuned_causal_lm = adapter if classifier else (merged or adapter)
        plan.tuned_classifier = (merged or adapter) if classifier else None
        if plan.tuned_causal_lm is None and plan.needs_causal_lm:
            raise FileNotFoundError(
                f"{recipe.output_dir / 'finetune' / 'adapter'} is missing: language modelling of a fine-tuned "
                "classifier needs its adapter. Fix: re-run the finetune stage, or evaluate only 'classification'."
            )
        if classifier:
            plan.num_labels = _num_labels(plan.tuned_classifier)
    if "perplexity" in tasks:
        plan.general_sources = section.general or recipe.data.sources
        plan.general_is_held_out = section.general is None
        if section.domain is not None or (tuned and finetune.data is not None):
            plan.domain_sources = section.domain or finetune.data.sources
            plan.domain_is_held_out = section.domain is None
    return plan


def _base_location(recipe: Recipe) -> str:
    """The model fine-tuning started from (see `pipeline.finetune.base_location`), or the only model there is."""
    if not (recipe.finetune.enabled or recipe.pretrain.enabled):
        return recipe.model.path  # the recipe checks that one of the three is there
    return base_location(recipe)


def _finetune_artefacts(recipe: Recipe) -> tuple[Path | None, Path | None]:
    """(adapter folder, merged folder) of the finetune stage, each None when absent; an error when both are."""
    folder = recipe.output_dir / "finetune"
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else None
    merged = folder / "merged" if (folder / "merged" / "config.json").is_file() else None
    if adapter is None and merged is None:
        raise FileNotFoundError(
            f"no fine-tuned model in {folder}: expected adapter/ (adapter_config.json) or merged/ (config.json). "
            "Fix: run the finetune stage first (pipeline run RECIPE --stages finetune), or set finetune.enabled: false "
            "to evaluate the base model alone."
        )
    return adapter, merged


def _num_labels(tuned: Path) -> int:
    """Classes of the tuned classifier, read from its saved head, so the base's fresh head has the same shape."""
    if (tuned / "config.json").is_file():
        config = json.loads((tuned / "config.json").read_text())
        return config.get("num_labels") or len(config["id2label"])
    from safetensors import safe_open

    with safe_open(str(tuned / "adapter_model.safetensors"), framework="pt") as weights:
        for key in weights.keys():
            if key.endswith(("score.weight", "classifier.weight")):
                return weights.get_slice(key).get_shape()[0]
    raise ValueError(f"the adapter in {tuned} saved no classification head (score/classifier): re-run fine-tuning")


# ------------------------------------------------------------------------------------------ data


@dataclass
class _Data:
    """The evaluation sets, loaded once and shared by both models."""

    general: Dataset | None = None
    domain: Dataset | None = None
    prompts: list[str] = field(default_factory=list)  # generation task
    references: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # classification task
    labels: list[int] = field(default_factory=list)


def _load_data(recipe: Recipe, plan: _Plan, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator) -> _Data:
    cap = recipe.evaluate.max_documents
    data = _Data()
    needs_rows = bool({"generation", "classification"} & set(plan.tasks))
    with accelerator.main_process_first():  # the others read the main process's dataset caches
        if plan.general_sources is not None:
            data.general = (_evenly(_splits(recipe.data, recipe.seed)[1], cap) if plan.general_is_held_out
                            else _dedicated_texts(plan.general_sources, cap))
        finetune_splits = None
        if needs_rows or (plan.domain_sources is not None and plan.domain_is_held_out):
            finetune_splits = _splits(recipe.finetune.data, recipe.seed)
        if plan.domain_sources is not None:
            data.domain = (_evenly(finetune_splits[1], cap) if plan.domain_is_held_out
                           else _dedicated_texts(plan.domain_sources, cap))
    if "generation" in plan.tasks:
        data.prompts, data.references = _generation_rows(recipe, tokenizer, *finetune_splits, cap)
    if "classification" in plan.tasks:
        data.texts, data.labels = _classification_rows(recipe, finetune_splits[1], cap, plan.num_labels)
    return data


def _splits(section: DataSection, seed: int) -> tuple[Dataset | IterableDataset, Dataset]:
    """(train, validation) exactly as the training stages split ``section``: same sources, seed and caps."""
    return load_corpus(
        section.sources, seed=seed,
        validation_fraction=section.validation_fraction, max_documents=section.max_documents,
        streaming=section.streaming,
    )


def _dedicated_texts(sources: list[SourceSection], cap: int | None) -> Dataset:
    """The documents of evaluation-only sources (``evaluate.general`` / ``domain``): all of them, or ``cap`` evenly
    spaced over their concatenation, so each source keeps its share."""
    parts = [load_source(source) for source in sources]
    return _evenly(concatenate_datasets([part.select_columns(["text"]) for part in parts]), cap)


def _evenly(dataset: Dataset, cap: int | None) -> Dataset:
    """At most ``cap`` rows, evenly spaced: concatenated sources each keep their share."""
    if cap is None or len(dataset) <= cap:
        return dataset
    return dataset.select([i * len(dataset) // cap for i in range(cap)])


def _generation_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: Dataset | IterableDataset,
                     validation: Dataset, cap: int | None) -> tuple[list[str], list[str]]:
    """Prompts of the held-out rows (with ``few_shot`` solved training rows first) and their reference responses."""
    finetune, k = recipe.finetune, recipe.evaluate.few_shot
    template, column = finetune.prompt_template, finetune.label_column
    _check_row_columns(validation, [column, *(_template_fields(template) if template else ["text"])])
    queries = _rows_with_names(_evenly(validation, cap), column)
    pool: list[dict[str, Any]] = []
    if k:
        pool_rows = train.take(_FEW_SHOT_POOL) if isinstance(train, IterableDataset) else _evenly(train, _FEW_SHOT_POOL)
        pool = _rows_with_names(pool_rows, column, features=train.features)
        if len(pool) < k:
            raise ValueError(f"evaluate.few_shot is {k} but the fine-tuning data has only {len(pool)} training rows. "
                             "Fix: lower evaluate.few_shot.")
    rng = np.random.default_rng(recipe.seed)  # the same examples for both models
    prompts = []
    for query in queries:
        examples = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
        if template is None:
            prompts.append(_chat_prompt(tokenizer, examples, query, column))
        else:
            prompts.append(few_shot_prompt(examples, query, template, k, response_column=column))
    return prompts, [str(row[column]) for row in queries]


def _classification_rows(recipe: Recipe, validation: Dataset, cap: int | None, num_labels: int | None
                         ) -> tuple[list[str], list[int]]:
    column = recipe.finetune.label_column
    _check_row_columns(validation, ["text", column])
    rows = _evenly(validation, cap)
    labels = [int(label) for label in rows[column]]
    if any(not 0 <= label < num_labels for label in labels):
        raise ValueError(f"held-out labels in column {column!r} fall outside the tuned head's {num_labels} classes")
    return list(rows["text"]), labels


def _rows_with_names(rows: Dataset | IterableDataset, column: str, features: Any = None) -> list[dict[str, Any]]:
    """Rows as dicts; a `ClassLabel` response becomes its name, as fine-tuning trained it."""
    feature = (features or rows.features or {}).get(column)
    listed = list(rows)
    if isinstance(feature, ClassLabel):
        for row in listed:
            row[column] = feature.int2str(row[column])
    return listed


def _template_fields(template: str) -> list[str]:
    return [name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name]


def _check_row_columns(dataset: Dataset, columns: list[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the held-out fine-tuning rows have no column {missing} (columns: {dataset.column_names}); with several "
            "sources only the columns they share are kept. Fix: finetune.label_column / prompt_template, or the "
            "sources."
        )


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
    return EXAMPLE_SEPARATOR.join([*solved, _format(template, query)])


def _format(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format(**row)
    except KeyError as error:
        raise ValueError(
            f"prompt template {template!r} uses {error}, which the row lacks (columns: {sorted(row)})"
        ) from None


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], query: dict[str, Any],
                 column: str) -> str:
    """The chat-template form (no ``prompt_template``), as fine-tuning renders it: ``text`` is the user turn and the
    response the assistant turn; solved examples come first as earlier turns."""
    messages = []
    for example in examples:
        messages += [{"role": "user", "content": example["text"]},
                     {"role": "assistant", "content": str(example[column])}]
    messages.append({"role": "user", "content": query["text"]})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ language modelling


def language_model_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts_dataset: Dataset | Sequence[str],
    *,
    block_size: int,
    batch_size: int,
    accelerator: Accelerator,
    max_documents: int | None = None,
) -> dict[str, float]:
    """Perplexity and bits per byte of ``model`` on the documents of ``texts_dataset`` (a ``text`` column or strings).

    Each document is scored on its own as ``[bos] + tokens + [eos]``: every token of the text and the closing EOS
    is a target, predicted from the tokens before it in the document. A document longer than ``block_size`` is
    cut into windows of ``block_size`` tokens that overlap by one token, so each target is predicted exactly once
    (with at most ``block_size - 1`` tokens of context). Sums are pooled per document and passed to the local
    ``perplexity`` and ``bits_per_byte`` metric modules.

    Perplexity and ``loss`` are per target token and include the closing EOS (the model must learn to stop).
    Bits per byte is the standard one (as lm-evaluation-harness computes it): the NLL in bits of the text's own
    tokens, over the UTF-8 bytes of the texts; the EOS stands for no byte of the text and is left out of it.

    ``model`` must be on ``accelerator.device``. Windows are split over the processes by the prepared loader and
    gathered with ``gather_for_metrics``.
    Returns ``perplexity``, ``bits_per_byte``, ``loss`` (nats per target token), ``tokens`` (targets scored),
    ``documents`` and ``bytes``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a token and the token it predicts), got {block_size}")
    texts = _texts(texts_dataset, max_documents)
    windows = _windows(tokenizer, texts, block_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, any id works
    collate_fn = partial(_collate_windows, pad_token_id=pad_id)
    loader = accelerator.prepare(DataLoader(windows, batch_size=batch_size, collate_fn=collate_fn))
    sums = torch.zeros(len(texts), 3, dtype=torch.float64)  # per document: NLL of all targets, targets, text NLL
    model.eval()
    with torch.no_grad():
        for batch in loader:
            per_window = accelerator.gather_for_metrics(_window_nll(model, batch)).cpu()  # (B, 4)
            sums.index_add_(0, per_window[:, 0].long(), per_window[:, 1:])
    nll, targets, text_nll = sums.T
    n_bytes = [len(text.encode("utf-8")) for text in texts]
    perplexity = _metric("perplexity").compute(nll_sum=nll.tolist(), n_tokens=targets.long().tolist())
    bits_per_byte = _metric("bits_per_byte").compute(nll_sum=text_nll.tolist(), n_bytes=n_bytes)
    return {
        "perplexity": perplexity["perplexity"],
        "bits_per_byte": bits_per_byte["bits_per_byte"],
        "loss": perplexity["loss"],
        "tokens": int(targets.sum()),
        "documents": len(texts),
        "bytes": sum(n_bytes),
    }


def _texts(texts_dataset: Dataset | Sequence[str], max_documents: int | None) -> list[str]:
    if isinstance(texts_dataset, Dataset):
        if "text" not in texts_dataset.column_names:
            raise ValueError(f"the dataset has no 'text' column (columns: {texts_dataset.column_names})")
        texts_dataset = _evenly(texts_dataset, max_documents)["text"]
    elif max_documents is not None and len(texts_dataset) > max_documents:
        texts_dataset = [texts_dataset[i * len(texts_dataset) // max_documents] for i in range(max_documents)]
    texts = [text for text in texts_dataset if text]
    if not texts:
        raise ValueError("no text to score: every document is empty")
    return texts


def _windows(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int) -> list[dict[str, Any]]:
    """Per document, windows of ``block_size`` tokens overlapping by one, longest first (less padding per batch).
    ``text`` marks the tokens of the text itself (not the added BOS and EOS): the targets counted in bits per byte."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    windows = []
    for document, ids in enumerate(encoded):
        sequence, text = [start, *ids, *end], [0, *[1] * len(ids), *[0] * len(end)]
        for offset in range(0, len(sequence) - 1, block_size - 1):
            window = slice(offset, offset + block_size)
            windows.append({"input_ids": sequence[window], "text": text[window], "document": document})
    return sorted(windows, key=lambda window: -len(window["input_ids"]))


def _collate_windows(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    batch = collate(rows, pad_token_id)  # right-padded, labels -100 on padding
    texts = [torch.tensor(row["text"]) for row in rows]
    batch["text"] = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)  # 0 on padding, like the labels
    batch["document"] = torch.tensor([row["document"] for row in rows])
    return batch


def _window_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 4) float64 per window: document index, summed NLL (nats) of its targets, their number, and summed NLL
    of the targets that are tokens of the text (for bits per byte)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    count = (targets != IGNORE_INDEX).sum(-1)
    text_nll = (nll * batch["text"][:, 1:]).sum(-1)
    return torch.stack([batch["document"].double(), nll.sum(-1).double(), count.double(), text_nll.double()], dim=-1)


@cache
def _metric(name: str) -> Any:
    return load_metric(name)


# ------------------------------------------------------------------------------------------ generation


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
        ids = [row if len(row) <= max_length else row[:1] + row[len(row) - max_length + 1 :] for row in ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in ids)
    # Left padding by hand: `tokenizer.pad` needs a pad token, which some tokenizers lack.
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(row)) + row for row in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids]),
    }


def _generate_everywhere(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                         recipe: Recipe, accelerator: Accelerator) -> list[dict[str, Any]]:
    """`generate_samples` with the prompts split over the processes, gathered back in order."""
    with accelerator.split_between_processes(prompts) as mine:
        samples = generate_samples(model, tokenizer, list(mine), recipe.evaluate.generation,
                                   seed=recipe.seed, batch_size=recipe.evaluate.batch_size)
    return gather_object(samples) if accelerator.num_processes > 1 else samples


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


# ------------------------------------------------------------------------------------------ models


def _measure_pair(plan: _Plan, kind: str, tuned: Path | None, measure: Any, tokenizer: PreTrainedTokenizerBase,
                  accelerator: Accelerator) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Measure the base, then the tuned model: the adapter attached to the same weights in place, or the merged
    folder loaded once the base is released. Only one model is in memory at a time."""
    # Seeded as fine-tuning seeds it, a classifier's fresh head is the very head fine-tuning started from.
    seed_everything(plan.recipe.seed)
    model = load_base(plan.base, kind, plan.num_labels, tokenizer).to(accelerator.device).eval()
    base = measure(model, "base")
    if tuned is None:
        return base, None
    if (tuned / "adapter_config.json").is_file():
        config = PeftConfig.from_pretrained(str(tuned))
        # A classification adapter tunes the body too: on the causal LM it shows what that did to language modelling.
        config.task_type = "SEQ_CLS" if kind == "classification" else "CAUSAL_LM"
        model = PeftModel.from_pretrained(model, str(tuned), config=config).to(accelerator.device)
    else:
        del model
        auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
        model = auto.from_pretrained(tuned, dtype=torch.float32).to(accelerator.device)
        if kind == "classification" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return base, measure(model.eval(), "tuned")


def _measure_causal_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, plan: _Plan, data: _Data,
                       accelerator: Accelerator, label: str) -> dict[str, Any]:
    recipe, section = plan.recipe, plan.recipe.evaluate
    measured: dict[str, Any] = {}
    for name, texts, block_size in (("general", data.general, recipe.data.block_size),
                                    ("domain", data.domain, (recipe.finetune.data or recipe.data).block_size)):
        if texts is not None:
            measured[name] = language_model_metrics(model, tokenizer, texts, block_size=block_size,
                                                    batch_size=section.batch_size, accelerator=accelerator)
            accelerator.print(f"[evaluate] {label}: {name} perplexity {measured[name]['perplexity']:.3f}, "
                              f"bits per byte {measured[name]['bits_per_byte']:.4f}")
    if "generation" in plan.tasks:
        samples = _generate_everywhere(model, tokenizer, data.prompts, recipe, accelerator)
        completions = [sample["completions"][0] for sample in samples]  # the first, when several are drawn
        measured["generation"], measured["predictions"] = score_generations(completions, data.references)
        accelerator.print(f"[evaluate] {label}: generation {measured['generation']}")
    if section.generation.prompts:
        measured["samples"] = _generate_everywhere(model, tokenizer, section.generation.prompts, recipe, accelerator)
    return measured


def _classify(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: _Data, plan: _Plan,
              accelerator: Accelerator) -> dict[str, float]:
    """Accuracy and macro-F1 of the head's argmax on the held-out rows (encoded as fine-tuning encodes them)."""
    max_length = (plan.recipe.finetune.data or plan.recipe.data).block_size
    batch_size = plan.recipe.evaluate.batch_size
    predictions: list[int] = []
    with accelerator.split_between_processes(data.texts) as mine, torch.no_grad():
        mine = list(mine)
        for start in range(0, len(mine), batch_size):
            encoded = tokenizer(mine[start : start + batch_size], truncation=True, max_length=max_length,
                                return_attention_mask=False)["input_ids"]
            batch = collate([{"input_ids": ids} for ids in encoded], tokenizer.pad_token_id)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))  # equal lengths: no padding
            logits = model(input_ids=batch["input_ids"].to(accelerator.device),
                           attention_mask=mask.to(accelerator.device)).logits
            predictions += logits.argmax(-1).tolist()
    if accelerator.num_processes > 1:
        predictions = gather_object(predictions)
    return {
        "accuracy": _metric("accuracy").compute(predictions=predictions, references=data.labels)["accuracy"],
        "f1": _metric("f1").compute(predictions=predictions, references=data.labels, average="macro")["f1"],
    }


# ------------------------------------------------------------------------------------------ the report


def _assemble(plan: _Plan, data: _Data, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    recipe = plan.recipe
    models = [m for m in MODELS if m in results]
    report: dict[str, Any] = {"general": None, "domain": None, "tasks": {}, "samples": [], "settings": {}}
    for name in ("general", "domain"):
        if all(name in results[m] for m in models) and models:
            report[name] = _compared({m: results[m][name] for m in models}, relative=True)
    if "generation" in plan.tasks:
        entry = _compared({m: results[m]["generation"] for m in models}, relative=False)
        entry.update(rows=len(data.prompts), few_shot=recipe.evaluate.few_shot, preview=[
            {"prompt": data.prompts[i], "reference": data.references[i],
             **{m: results[m]["predictions"][i] for m in models}}
            for i in range(min(PREVIEW_ROWS, len(data.prompts)))
        ])
        report["tasks"]["generation"] = entry
    if "classification" in plan.tasks:
        entry = _compared({m: results[m]["classification"] for m in models}, relative=False)
        entry.update(rows=len(data.texts), num_labels=plan.num_labels)
        report["tasks"]["classification"] = entry
    for i, prompt in enumerate(recipe.evaluate.generation.prompts):
        report["samples"].append({"prompt": prompt, **{m: results[m]["samples"][i]["completions"] for m in models}})
    report["settings"] = {
        "base_model": plan.base,
        "tuned_model": str(plan.tuned_classifier or plan.tuned_causal_lm) if "tuned" in models else None,
        "tasks": plan.tasks,
        "general_set": _describe_set(plan.general_sources, plan.general_is_held_out, "data"),
        "domain_set": _describe_set(plan.domain_sources, plan.domain_is_held_out, "finetune.data"),
        "block_size": {"general": recipe.data.block_size, "domain": (recipe.finetune.data or recipe.data).block_size},
        "max_documents": recipe.evaluate.max_documents,
        "batch_size": recipe.evaluate.batch_size,
        "few_shot": recipe.evaluate.few_shot,
        "generation": asdict(recipe.evaluate.generation),
        "seed": recipe.seed,
    }
    return report


def _compared(by_model: dict[str, dict[str, float]], relative: bool) -> dict[str, Any]:
    """{"base": ..., "tuned": ..., "change": ...}: relative change (lower-is-better LM metrics) or difference."""
    entry: dict[str, Any] = dict(by_model)
    if "base" in by_model and "tuned" in by_model:
        base, tuned = by_model["base"], by_model["tuned"]
        keys = LM_METRICS if relative else list(base)
        entry["change"] = {k: (tuned[k] / base[k] - 1.0 if relative else tuned[k] - base[k]) for k in keys}
    return entry


def _describe_set(sources: list[SourceSection] | None, held_out: bool, section: str) -> str | None:
    if sources is None:
        return None
    names = ", ".join(source.name for source in sources)
    return f"validation split of {section} ({names})" if held_out else f"evaluate sources ({names})"


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write ``report.json``, ``report.md`` (a verdict, then tables) and bar charts of base vs tuned to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plot(report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(_markdown(report, plots))


def verdict(report: dict[str, Any]) -> str:
    """One paragraph: is the tuned model better on the domain, what did it forget, how it does on the tasks."""
    general, domain, tasks = report.get("general"), report.get("domain"), report.get("tasks") or {}
    if not any("tuned" in (entry or {}) for entry in (general, domain, *tasks.values())):
        measured = "; ".join(f"{name} perplexity {entry['base']['perplexity']:.2f}"
                             for name, entry in (("domain", domain), ("general", general)) if entry)
        return f"Only the base model was evaluated (no fine-tuned model){': ' + measured if measured else ''}."
    sentences = []
    if domain:
        base, tuned = domain["base"]["perplexity"], domain["tuned"]["perplexity"]
        sentences.append(f"The tuned model is {'better' if tuned < base else 'not better'} on the domain: perplexity "
                         f"{base:.2f} → {tuned:.2f} ({domain['change']['perplexity']:+.1%}).")
    if general:
        base, tuned = general["base"]["perplexity"], general["tuned"]["perplexity"]
        change = general["change"]["perplexity"]
        effect = f"forgetting {change:+.1%}" if change > 0 else f"no forgetting, {change:+.1%}"
        sentences.append(f"General perplexity {base:.2f} → {tuned:.2f} ({effect}).")
    for name, entry in tasks.items():
        scores = ", ".join(f"{_label(metric)} {entry['base'][metric]:.3f} → {entry['tuned'][metric]:.3f}"
                           for metric in entry["base"])
        shots = f" ({entry['few_shot']}-shot)" if entry.get("few_shot") else ""
        sentences.append(f"{name.capitalize()}{shots}: {scores}.")
    return " ".join(sentences)


_LABELS = {"perplexity": "perplexity", "bits_per_byte": "bits per byte", "exact_match": "exact match",
           "rouge_l": "ROUGE-L", "accuracy": "accuracy", "f1": "macro-F1"}


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric)


def _markdown(report: dict[str, Any], plots: list[str]) -> str:
    lines = ["# Evaluation: base vs tuned", "", verdict(report), ""]
    lm_sets = [(name, report[name]) for name in ("general", "domain") if report.get(name)]
    if lm_sets:
        models = [m for m in MODELS if m in lm_sets[0][1]]
        change = "change" in lm_sets[0][1]
        lines += ["## Language modelling (held-out text, lower is better)", "",
                  _row(["set", "metric", *models, *(["change (relative)"] if change else [])]),
                  _row(["---"] * (2 + len(models) + change))]
        for name, entry in lm_sets:
            for metric in LM_METRICS:
                cells = [name, metric, *(_number(entry[m][metric]) for m in models)]
                lines.append(_row(cells + ([f"{entry['change'][metric]:+.2%}"] if change else [])))
        lines.append("")
        for name, entry in lm_sets:
            first = entry[models[0]]
            where = report["settings"].get(f"{name}_set") or name
            lines.append(f"- {name}: {first['documents']} documents, {first['tokens']} tokens, {first['bytes']} bytes "
                         f"({where}).")
        lines.append("")
    tasks = report.get("tasks") or {}
    if tasks:
        models = [m for m in MODELS if m in next(iter(tasks.values()))]
        change = "change" in next(iter(tasks.values()))
        lines += ["## Tasks (held-out rows, higher is better)", "",
                  _row(["task", "metric", *models, *(["change (absolute)"] if change else [])]),
                  _row(["---"] * (2 + len(models) + change))]
        for name, entry in tasks.items():
            for metric in entry[models[0]]:
                cells = [name, metric, *(_number(entry[m][metric]) for m in models)]
                lines.append(_row(cells + ([f"{entry['change'][metric]:+.4f}"] if change else [])))
        lines.append("")
        for name, entry in tasks.items():
            shots = f", {entry['few_shot']}-shot prompts" if entry.get("few_shot") else ""
            lines.append(f"- {name}: {entry['rows']} rows{shots}.")
        lines.append("")
        preview = tasks.get("generation", {}).get("preview") or []
        if preview:
            lines += ["### Generation: first rows", "", _row(["prompt (end)", "reference", *models]),
                      _row(["---"] * (2 + len(models)))]
            lines += [_row([_cell(row["prompt"][-80:]), _cell(row["reference"]), *(_cell(row[m]) for m in models)])
                      for row in preview]
            lines.append("")
    if report.get("samples"):
        lines += ["## Samples", ""]
        for i, sample in enumerate(report["samples"], 1):
            lines += [f"### Prompt {i}", "", _fenced(sample["prompt"]), ""]
            for model in (m for m in MODELS if m in sample):
                for completion in sample[model]:
                    lines += [f"**{model}**", "", _fenced(sample["prompt"] + completion), ""]
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    lines += ["## Settings", "", _fenced(json.dumps(report.get("settings", {}), indent=2), "json"), ""]
    return "\n".join(lines)


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "↵ ") or " "


def _fenced(text: str, language: str = "text") -> str:
    fence = "`" * max(3, _longest_backtick_run(text) + 1)  # a fence longer than any run inside the text
    return f"{fence}{language}\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def _plot(report: dict[str, Any], folder: Path) -> list[str]:
    """Grouped bars (one group per set or task metric, one bar per model); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: list[tuple[str, str, dict[str, dict[str, float]]]] = []  # (file stem, title, {group: {model: value}})
    lm_sets = {name: report[name] for name in ("general", "domain") if report.get(name)}
    for metric in LM_METRICS if lm_sets else ():
        groups = {name: {m: entry[m][metric] for m in MODELS if m in entry} for name, entry in lm_sets.items()}
        charts.append((metric, f"{_label(metric)} (lower is better)", groups))
    for task, entry in (report.get("tasks") or {}).items():
        models = [m for m in MODELS if m in entry]
        groups = {_label(metric): {m: entry[m][metric] for m in models} for metric in entry[models[0]]}
        charts.append((f"task_{task}", f"{task} (higher is better)", groups))

    written = []
    for stem, title, groups in charts:
        models = [m for m in MODELS if any(m in values for values in groups.values())]
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.6))
        width = 0.8 / len(models)
        positions = np.arange(len(groups))
        for i, model in enumerate(models):
            values = [values.get(model, np.nan) for values in groups.values()]
            bars = ax.bar(positions + (i - (len(models) - 1) / 2) * width, values, width, label=model)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(positions, list(groups))
        if stem == "perplexity":  # base and tuned differ by orders of magnitude across domains
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}.png", dpi=100)
        plt.close(fig)
        written.append(f"{stem}.png")
    return written
