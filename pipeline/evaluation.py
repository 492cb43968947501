"""Evaluation stage: the base model and the tuned model side by side, on the same data with the same settings.

    plan     recipe ──artifacts.base_model, artifacts.tuned_model──► _Plan: models, tasks, sets (checked, nothing loaded)
    data     data.load_splits / evaluate sources ──► _Data: general and domain text, prompt rows, labelled rows
    measure  per model (base, then tuned; one in memory at a time: loading.load_base, loading.load_tuned)
               general, domain text ─ language_model_metrics (scoring) ──► perplexity, bits per byte
               held-out fine-tuning rows ─ generation.generate_samples ──► exact match, ROUGE-L (optionally few-shot)
                                         └ the classification head ─────► accuracy, macro-F1
               evaluate.generation.prompts ─ generation.generate_samples ──► sample completions
    assemble results ──_assemble──► the report ──report.write_report──► eval/report.json, report.md, *.png

What is measured (`recipe.evaluate`):

* ``perplexity`` (in ``tasks``): language modelling on a **general** set (``evaluate.general``, else the
  validation split of ``data``: the documents pretraining held out) and a **domain** set (``evaluate.domain``, else
  the validation split of ``finetune.data``), each capped at ``max_documents``. Rising general perplexity after
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
is held), or ``finetune/merged`` when it exists (`pipeline.artifacts.TunedModel`). With fine-tuning off only the
base is evaluated. The keys of ``report.json`` are documented in `pipeline.report`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import ClassLabel, Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from pipeline.artifacts import RunArtifacts, TunedModel, base_model, tuned_model
from pipeline.data import EvaluationSet, collate, evaluation_sets, held_out_sections, load_splits
from pipeline.generation import (
    FEW_SHOT_POOL,
    beside_greedy,
    build_prompt,
    describe_decoding,
    generate_across_processes,
    score_generations,
)
from pipeline.loading import load_base, load_tokenizer, load_tuned
from pipeline.metrics import load_metric
from pipeline.recipe import Recipe, recipe_to_dict
from pipeline.report import LM_METRICS, MODELS, write_report
from pipeline.scoring import language_model_metrics
from pipeline.sources import evenly_spaced
from pipeline.training import seed_everything

__all__ = ["NAME", "measure_pair", "run"]

NAME = "evaluate"
PREVIEW_ROWS = 5  # generation-task rows shown with their predictions in the report

_metric = cache(load_metric)  # each metric module loaded once

Measure = Callable[[torch.nn.Module, str], dict[str, Any]]
"""Measures one model (labelled "base" or "tuned") and returns its results."""


# ------------------------------------------------------------------------------------------ the stage


def run(recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    """The evaluation stage of a recipe: writes ``output_dir/eval/{report.json, report.md, *.png}`` (main process)
    and returns the report (every process). Raises before any compute when a model or a task's data is missing."""
    plan = _plan(recipe)
    tokenizer = load_tokenizer(plan.base, fallback=RunArtifacts.of(recipe).tokenizer)
    data = _load_data(recipe, plan, tokenizer, accelerator)
    results: dict[str, dict[str, Any]] = {"base": {}}

    def measure_lm(model: torch.nn.Module, label: str) -> dict[str, Any]:
        return _measure_causal_lm(model, tokenizer, plan, data, accelerator, label)

    def measure_classifier(model: torch.nn.Module, label: str) -> dict[str, Any]:
        scores = _classify(model, tokenizer, data, plan, accelerator)
        accelerator.print(f"[evaluate] {label}: classification {scores}")
        return {"classification": scores}

    phases: list[tuple[str, Path | None, Measure]] = []  # (task kind, tuned folder, measure)
    if plan.needs_causal_lm:
        phases.append(("causal_lm", plan.tuned.causal_lm if plan.tuned else None, measure_lm))
    if "classification" in plan.tasks:
        phases.append(("classification", plan.tuned.head if plan.tuned else None, measure_classifier))
    for kind, tuned, measure in phases:
        base, after = measure_pair(plan.base, tuned, kind, measure, tokenizer, accelerator, seed=recipe.seed,
                                   num_labels=plan.num_labels)
        results["base"].update(base)
        if after is not None:
            results.setdefault("tuned", {}).update(after)

    report = _assemble(plan, data, results)
    if accelerator.is_main_process:
        write_report(report, RunArtifacts.of(recipe).eval)
    accelerator.wait_for_everyone()
    return report


# ------------------------------------------------------------------------------------------ plan


@dataclass
class _Plan:
    """Everything the stage will do, decided and checked before anything is loaded."""

    recipe: Recipe
    base: str
    tuned: TunedModel | None  # None: fine-tuning is off, only the base is evaluated
    tasks: list[str]
    num_labels: int | None = None
    sets: dict[str, EvaluationSet] = field(default_factory=dict)  # general, domain: the language-modelling sets

    @property
    def needs_causal_lm(self) -> bool:
        return bool({"perplexity", "generation"} & set(self.tasks)) or bool(self.recipe.evaluate.generation.prompts)


def _plan(recipe: Recipe) -> _Plan:
    section, finetune = recipe.evaluate, recipe.finetune
    tuning = recipe.runs("finetune")
    base = base_model(recipe)
    implied = {"instruction": "generation", "classification": "classification"}.get(finetune.task) if tuning else None
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
    if "classification" in tasks and not (tuning and finetune.task == "classification"):
        raise ValueError(
            "evaluate.tasks lists 'classification', which needs the classification head of a fine-tuned model. Fix: "
            "set finetune.task: classification (and enable fine-tuning), or remove 'classification'."
        )
    plan = _Plan(recipe=recipe, base=base, tuned=tuned_model(recipe), tasks=tasks)
    if plan.tuned is not None:
        if plan.tuned.causal_lm is None and plan.needs_causal_lm:
            raise FileNotFoundError(
                f"{RunArtifacts.of(recipe).adapter} is missing: language modelling of a fine-tuned classifier needs "
                "its adapter. Fix: re-run the finetune stage, or evaluate only 'classification'."
            )
        if plan.tuned.classifier:
            plan.num_labels = _num_labels(plan.tuned.head)
    if "perplexity" in tasks:
        plan.sets = {s.name: s for s in evaluation_sets(recipe)}
    return plan


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
    held_out_by = held_out_sections(recipe)  # the split every stage used: these sets were never trained on
    with accelerator.main_process_first():  # the others read the main process's dataset caches
        if "general" in plan.sets:
            data.general = plan.sets["general"].load(recipe, cap)
        if "domain" in plan.sets:
            data.domain = plan.sets["domain"].load(recipe, cap)
        finetune_splits = load_splits(recipe.finetune.data, recipe.seed, held_out_by) if needs_rows else None
    if "generation" in plan.tasks:
        data.prompts, data.references = _generation_rows(recipe, tokenizer, *finetune_splits, cap)
    if "classification" in plan.tasks:
        data.texts, data.labels = _classification_rows(recipe, finetune_splits[1], cap, plan.num_labels)
    return data


def _generation_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: Dataset | IterableDataset,
                     validation: Dataset, cap: int | None) -> tuple[list[str], list[str]]:
    """Prompts of the held-out rows (with ``few_shot`` solved training rows first) and their reference responses."""
    finetune, k = recipe.finetune, recipe.evaluate.few_shot
    template, column = finetune.prompt_template, finetune.label_column
    _check_row_columns(validation, [column, *(_template_fields(template) if template else ["text"])])
    queries = _rows_with_names(evenly_spaced(validation, cap), column)
    pool: list[dict[str, Any]] = []
    if k:
        pool_rows = (train.take(FEW_SHOT_POOL) if isinstance(train, IterableDataset)
                     else evenly_spaced(train, FEW_SHOT_POOL))
        pool = _rows_with_names(pool_rows, column, features=train.features)
        if len(pool) < k:
            raise ValueError(f"evaluate.few_shot is {k} but the fine-tuning data has only {len(pool)} training rows. "
                             "Fix: lower evaluate.few_shot.")
    rng = np.random.default_rng(recipe.seed)  # the same examples for both models
    prompts = []
    for query in queries:
        examples = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
        prompts.append(build_prompt(tokenizer, examples, query, template, response_column=column))
    return prompts, [str(row[column]) for row in queries]


def _classification_rows(recipe: Recipe, validation: Dataset, cap: int | None, num_labels: int | None
                         ) -> tuple[list[str], list[int]]:
    column = recipe.finetune.label_column
    _check_row_columns(validation, ["text", column])
    rows = evenly_spaced(validation, cap)
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


# ------------------------------------------------------------------------------------------ measure


def measure_pair(
    base: str,
    tuned: Path | None,
    kind: str,
    measure: Measure,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    *,
    seed: int,
    num_labels: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``measure`` the base, then the tuned model (None: none), as a ``kind`` model (``causal_lm`` or
    ``classification``): an adapter is attached to the same weights in place; a merged folder is loaded once the
    base is released. Only one model is in memory at a time."""
    # Seeded as fine-tuning seeds it, a classifier's fresh head is the very head fine-tuning started from.
    seed_everything(seed)
    model = load_base(base, kind, num_labels, tokenizer).to(accelerator.device).eval()
    measured = measure(model, "base")
    if tuned is None:
        return measured, None
    if (tuned / "adapter_config.json").is_file():
        model = load_tuned(tuned, kind, tokenizer, base=model)  # attached in place: one copy of the weights
    else:
        del model  # a merged model replaces the base: release the base before loading it
        model = load_tuned(tuned, kind, tokenizer)
    return measured, measure(model.to(accelerator.device).eval(), "tuned")


def _measure_causal_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, plan: _Plan, data: _Data,
                       accelerator: Accelerator, label: str) -> dict[str, Any]:
    recipe, section = plan.recipe, plan.recipe.evaluate
    measured: dict[str, Any] = {}
    for name, texts, block_size in (("general", data.general, recipe.data.block_size),
                                    ("domain", data.domain, recipe.finetune.data.block_size)):
        if texts is not None:
            measured[name] = language_model_metrics(model, tokenizer, texts, block_size=block_size,
                                                    batch_size=section.batch_size, accelerator=accelerator)
            accelerator.print(f"[evaluate] {label}: {name} perplexity {measured[name]['perplexity']:.3f}, "
                              f"bits per byte {measured[name]['bits_per_byte']:.4f}")

    def generate(prompts: list[str]) -> list[dict[str, Any]]:
        return generate_across_processes(model, tokenizer, prompts, section.generation, accelerator,
                                         seed=recipe.seed, batch_size=section.batch_size)

    if "generation" in plan.tasks:
        completions = [sample["completions"][0] for sample in generate(data.prompts)]  # the first of several
        measured["generation"], measured["predictions"] = score_generations(completions, data.references)
        accelerator.print(f"[evaluate] {label}: generation {measured['generation']}")
    if section.generation.prompts:
        measured["samples"] = generate(section.generation.prompts)
        if (sampled := beside_greedy(section.generation)) is not None:
            measured["sampled"] = generate_across_processes(model, tokenizer, section.generation.prompts, sampled,
                                                            accelerator, seed=recipe.seed, batch_size=section.batch_size)
    return measured


def _classify(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: _Data, plan: _Plan,
              accelerator: Accelerator) -> dict[str, float]:
    """Accuracy and macro-F1 of the head's argmax on the held-out rows (encoded as fine-tuning encodes them)."""
    max_length = plan.recipe.finetune.data.block_size
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


# ------------------------------------------------------------------------------------------ assemble


def _assemble(plan: _Plan, data: _Data, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report (keys: `pipeline.report`) from each model's results."""
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
    gen = recipe.evaluate.generation
    sampled = beside_greedy(gen)
    for i, prompt in enumerate(gen.prompts):
        sample = {"prompt": prompt, "decoding": describe_decoding(gen),
                  **{m: results[m]["samples"][i]["completions"] for m in models}}
        if sampled is not None:
            sample["sampled"] = {"decoding": describe_decoding(sampled),
                                 **{m: results[m]["sampled"][i]["completions"] for m in models}}
        report["samples"].append(sample)
    report["settings"] = {
        "base_model": plan.base,
        "tuned_model": str(plan.tuned.head or plan.tuned.causal_lm) if "tuned" in models else None,
        "tasks": plan.tasks,
        "general_set": plan.sets["general"].description if "general" in plan.sets else None,
        "domain_set": plan.sets["domain"].description if "domain" in plan.sets else None,
        "block_size": {"general": recipe.data.block_size, "domain": recipe.finetune.data.block_size},
        "max_documents": recipe.evaluate.max_documents,
        "batch_size": recipe.evaluate.batch_size,
        "few_shot": recipe.evaluate.few_shot,
        "generation": recipe_to_dict(recipe.evaluate.generation),
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
