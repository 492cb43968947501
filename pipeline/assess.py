"""`pipeline eval MODEL`: the project's held-out metrics on any causal LM and any text, and lm-evaluation-harness
tasks on the same loaded model, in one report.

    plan     --source NAME (sources.validate_source), --recipe (its evaluate sets), --lm-eval TASKS (names looked up
             in lm-eval's index), the model's config (a causal LM?): every refusal before anything is loaded
    load     documents (sources.load_source; data.load_splits for a recipe's held-out sets), then the model
             (inference.load_for_inference: any folder or Hub id, + --adapter) on --device in --dtype
    measure  lm-eval: HFLM(pretrained=<the loaded model>) ──simple_evaluate──► each task's metrics
             each set: scoring.language_model_metrics ──► perplexity, bits per byte, loss, tokens, documents, bytes
    assemble the report (keys: `pipeline.report`) ──report.write_model_report──► DIR/report.json, report.md

Bits per byte is one measure here and in lm-eval: a ``loglikelihood_rolling`` task over the same documents gives
our figure (tested), because the bridge runs lm-eval with ``max_length = block_size - 1`` (its full rolling windows
are then ours) and ``add_bos_token=False`` (lm-eval 0.4.13 would otherwise let the tokenizer add a BOS and then
put its own prefix BOS in front, scoring the second BOS as text). Exactly so for documents of at most
``block_size - 1`` tokens, or a multiple of it: lm-eval gives a longer document's last, partial window more
context (up to a whole window) than ours, which starts where the previous one ended.

``--recipe RECIPE`` scores the documents the recipe's evaluate stage scores, with its block sizes and
``evaluate.max_documents``: ``general`` (``evaluate.general``, else the validation split of ``data``) and, when
fine-tuning is on or ``evaluate.domain`` is set, ``domain`` (``evaluate.domain``, else the validation split of
``finetune.data``), so that any model can be set beside the run's own report.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import AutoConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from pipeline.data import evaluation_sets
from pipeline.inference import context_length, load_for_inference
from pipeline.recipe import Recipe, load_recipe
from pipeline.scoring import language_model_metrics
from pipeline.sources import (
    SourceSpec,
    as_source_spec,
    did_you_mean,
    load_source,
    validate_source,
)

__all__ = ["BATCH_SIZE", "DEVICES", "DTYPES", "LmEval", "assess", "lm_eval_task_manager"]

BATCH_SIZE = 8
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LM_EVAL_MISSING = "pip install 'pipeline[clients]'"
_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")


@dataclass(frozen=True)
class LmEval:
    """lm-evaluation-harness tasks to run on the model (`lm_eval.simple_evaluate`)."""

    tasks: tuple[str, ...]
    """Task, group or tag names; glob patterns such as ``blimp_*`` too."""
    include: Path | None = None
    """A folder of task YAMLs (`TaskManager(include_path=...)`), looked up before lm-eval's own tasks."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: each task's default)."""
    limit: int | float | None = None
    """Documents per task: a count, or a fraction in (0, 1) (None: all)."""
    tokenizer_bos: bool = False
    """Let the tokenizer add its BOS, as lm-eval does by default (``add_bos_token`` unset). Off by default: then
    ``loglikelihood_rolling`` tasks score exactly the text's tokens, as we do; on, contexts of other task types
    start with the BOS a Llama-style tokenizer adds, as in a stock ``lm_eval --model hf`` run."""


@dataclass
class _Set:
    """One set of documents to score, loaded only when every check has passed."""

    name: str
    source: str  # where its documents come from, for the report
    load: Callable[[], Dataset | list[str]]
    block_size: int | None  # None: the model's context


@dataclass
class _Plan:
    model: str
    adapter: str | None
    sets: list[_Set]
    device: str
    dtype: torch.dtype
    batch_size: int
    block_size: int | None
    max_documents: int | None
    recipe: str | None = None
    lm_eval: LmEval | None = None
    task_manager: Any = None  # lm_eval.tasks.TaskManager, indexed once
    settings: dict[str, Any] = field(default_factory=dict)


def assess(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    sources: Sequence[SourceSpec | str] = (),
    recipe: Recipe | str | Path | None = None,
    lm_eval: LmEval | None = None,
    block_size: int | None = None,
    batch_size: int | None = None,
    max_documents: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Measure ``model`` (+ ``adapter``) on ``sources`` (each a set named after it), on the held-out sets of
    ``recipe`` (``general``, ``domain``) and on ``lm_eval`` tasks; returns the report (keys: `pipeline.report`).

    ``block_size`` (default: a recipe set's own, else the model's positions) is the window of
    `pipeline.scoring.language_model_metrics`; lm-eval gets ``max_length = block_size - 1`` (default: the model's
    positions - 1). ``batch_size`` defaults to the recipe's ``evaluate.batch_size`` (the stage's very batches, so
    its very float32 sums), else `BATCH_SIZE`. ``max_documents`` caps each source as a recipe's source field does
    (the first N, or N evenly spaced for the built-in corpora) and replaces ``evaluate.max_documents`` for a
    recipe's sets.

    Raises `ValueError` / `FileNotFoundError` naming the fix before any scoring: the settings, sources, recipe,
    lm-eval task names and a local model's config before anything is loaded; the model folder, the adapter, block
    sizes and the documents' columns once the model and its tokenizer are loaded. `ImportError` when ``lm_eval``
    is asked for and missing."""
    plan = _plan(model, adapter, sources, recipe, lm_eval, block_size, batch_size, max_documents, device, dtype)
    loaded, tokenizer = load_for_inference(plan.model, plan.adapter)
    sizes = {s.name: _block_size(plan.block_size or s.block_size, loaded, s.name) for s in plan.sets}
    max_length = None if plan.lm_eval is None else _block_size(plan.block_size, loaded, "lm-eval") - 1
    documents = {s.name: s.load() for s in plan.sets}
    accelerator = Accelerator(cpu=plan.device == "cpu")
    loaded = loaded.to(device=accelerator.device, dtype=plan.dtype).eval()
    report: dict[str, Any] = {"sets": {}, "lm_eval": {}, "settings": plan.settings}
    if max_length is not None:  # first: a task whose data cannot load fails before our sets are scored
        report["lm_eval"] = _run_lm_eval(loaded, tokenizer, plan, max_length)
        plan.settings["lm_eval"]["max_length"] = max_length
    for s in plan.sets:
        metrics = language_model_metrics(loaded, tokenizer, documents[s.name], block_size=sizes[s.name],
                                         batch_size=plan.batch_size, accelerator=accelerator)
        report["sets"][s.name] = metrics
        plan.settings["sets"][s.name]["block_size"] = sizes[s.name]
        _say(f"{s.name}: perplexity {metrics['perplexity']:.3f}, bits per byte {metrics['bits_per_byte']:.4f} "
             f"({metrics['documents']} documents, {metrics['tokens']} tokens)")
    return report


# ------------------------------------------------------------------------------------------ plan


def _plan(model: str | Path, adapter: str | Path | None, sources: Sequence[SourceSpec | str],
          recipe: Recipe | str | Path | None, lm_eval: LmEval | None, block_size: int | None,
          batch_size: int | None, max_documents: int | None, device: str, dtype: str) -> _Plan:
    _check_count("batch_size", batch_size, optional=True)
    _check_count("max_documents", max_documents, optional=True)
    if block_size is not None and block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a token and the token it predicts), got {block_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not sources and recipe is None and lm_eval is None:
        raise ValueError("nothing to measure: give --source NAME (a corpus, a file, a Hub dataset), --recipe RECIPE "
                         "or --lm-eval TASKS")
    recipe_path = None if recipe is None or isinstance(recipe, Recipe) else str(recipe)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
    if batch_size is None:
        batch_size = recipe.evaluate.batch_size if recipe is not None else BATCH_SIZE
    sets = [*(_recipe_sets(recipe, max_documents) if recipe is not None else []),
            *(_source_set(source, max_documents) for source in sources)]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"two sets share a name: {names}; give each --source once (a recipe's sets are 'general' "
                         "and 'domain')")
    _check_causal_lm(model)
    plan = _Plan(model=str(model), adapter=None if adapter is None else str(adapter), sets=sets,
                 device=_device(device), dtype=getattr(torch, dtype), batch_size=batch_size, block_size=block_size,
                 max_documents=max_documents, recipe=recipe_path or (str(recipe.output_dir) if recipe else None),
                 lm_eval=lm_eval)
    if lm_eval is not None:
        plan.task_manager = lm_eval_task_manager(lm_eval)
    plan.settings = {
        "model": plan.model, "adapter": plan.adapter, "recipe": plan.recipe,
        "sets": {s.name: {"source": s.source, "block_size": s.block_size} for s in sets},
        "max_documents": max_documents, "batch_size": batch_size, "device": plan.device, "dtype": dtype,
        "lm_eval": None if lm_eval is None else _lm_eval_settings(lm_eval),
    }
    return plan


def _check_count(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device here: use --device cpu (or auto)")
    return device


def _check_causal_lm(model: str | Path) -> None:
    """Refuse a local folder whose config is not a causal LM's (an encoder-decoder, a classifier), before its
    weights are read. Other problems (no folder, an adapter folder, a Hub id) are `load_for_inference`'s."""
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        return
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError):
        return  # an unknown model type: from_pretrained says so, with its own message
    architectures = list(getattr(config, "architectures", None) or [])
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{folder} holds a {config.model_type!r} model {architectures}, which is not a causal "
                         "language model (AutoModelForCausalLM cannot load it): pass a decoder-only LM, e.g. a run's "
                         "pretrain/ or finetune/merged/, or a LlamaForCausalLM folder")
    if architectures and all(name.endswith(_HEADS) for name in architectures):
        raise ValueError(f"{folder} holds a {architectures[0]} (a task head, not a language-model head): its "
                         "next-token scores would come from an untrained head. Pass the causal LM it was built "
                         "on instead")


def _source_set(source: SourceSpec | str, max_documents: int | None) -> _Set:
    spec = as_source_spec(source)
    if max_documents is not None:
        spec = SourceSpec(**{**asdict(spec), "max_documents": max_documents})
    validate_source(spec)  # an unknown name, a missing file: refused now
    return _Set(spec.name, _describe(spec), lambda: load_source(spec), None)


def _describe(spec: SourceSpec) -> str:
    default = SourceSpec(name=spec.name)
    changed = [f"{f.name}={getattr(spec, f.name)!r}" for f in fields(SourceSpec)
               if f.name not in ("name", "weight") and getattr(spec, f.name) != getattr(default, f.name)]
    return spec.name + (f" ({', '.join(changed)})" if changed else "")


def _recipe_sets(recipe: Recipe, max_documents: int | None) -> list[_Set]:
    """The sets the recipe's evaluate stage scores, chosen and loaded as it does (`data.evaluation_sets`)."""
    cap = recipe.evaluate.max_documents if max_documents is None else max_documents
    chosen = evaluation_sets(recipe)
    for evaluation_set in chosen:
        if not evaluation_set.held_out:
            for source in evaluation_set.sources:
                validate_source(source)
    return [_Set(s.name, s.description, lambda s=s: s.load(recipe, cap), s.section.block_size) for s in chosen]


def _block_size(block_size: int | None, model: torch.nn.Module, what: str) -> int:
    context = context_length(model)
    if block_size is None:
        if context is None:
            raise ValueError("the model's config gives no max_position_embeddings: pass --block-size")
        return context
    if context is not None and block_size > context:
        raise ValueError(f"{what}: block size {block_size} exceeds the model's {context} positions. Fix: pass "
                         f"--block-size {context} (or less)")
    return block_size


def _say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr)  # stdout stays the report's (--json)


# ------------------------------------------------------------------------------------------ lm-evaluation-harness


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"--lm-eval needs lm-evaluation-harness ({error}): {LM_EVAL_MISSING}") from None
    return lm_eval


def lm_eval_task_manager(spec: LmEval) -> Any:
    """An lm-eval `TaskManager` that knows every task of ``spec``, or `ValueError` naming the unknown ones. The
    ``include`` folder is indexed alone first: lm-eval's own index of thousands of tasks takes seconds, so it is
    built only when a task is not in the folder."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if not spec.tasks or any(not task.strip() for task in spec.tasks):
        raise ValueError(f"--lm-eval needs task names, comma-separated, got {list(spec.tasks)}")
    if spec.num_fewshot is not None and spec.num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {spec.num_fewshot}")
    if spec.limit is not None and not (spec.limit > 0 and (spec.limit < 1 or float(spec.limit).is_integer())):
        raise ValueError(f"limit must be a count >= 1 or a fraction in (0, 1), got {spec.limit}")
    managers = []
    if spec.include is not None:
        if not Path(spec.include).is_dir():
            raise FileNotFoundError(f"--lm-eval-include {spec.include}: no such folder of task YAML files")
        managers.append(lambda: TaskManager(include_path=str(spec.include), include_defaults=False))
    managers.append(lambda: TaskManager(include_path=None if spec.include is None else str(spec.include)))
    for make in managers:
        manager = make()
        missing = _missing_tasks(manager, spec.tasks)
        if not missing:
            return manager
    hints = "; ".join(f"{task!r}{did_you_mean(task, manager.all_tasks, cutoff=0.75)}" for task in missing)
    where = f"{spec.include} nor " if spec.include is not None else ""
    raise ValueError(f"unknown lm-eval task {hints}: not in {where}lm-eval {_import_lm_eval().__version__}'s tasks. "
                     "Fix: check the name (`lm_eval ls tasks` lists them), or put its YAML in a folder and pass "
                     "--lm-eval-include FOLDER")


def _missing_tasks(manager: Any, tasks: Sequence[str]) -> list[str]:
    matched = set(manager.match_tasks(list(tasks)))
    return [task for task in tasks if task not in matched and not any(c in task for c in "*?[")]


def _lm_eval_settings(spec: LmEval) -> dict[str, Any]:
    return {"tasks": list(spec.tasks), "include": None if spec.include is None else str(spec.include),
            "num_fewshot": spec.num_fewshot, "limit": spec.limit,
            "add_bos_token": None if spec.tokenizer_bos else False, "max_length": None,
            "version": _import_lm_eval().__version__}


def _run_lm_eval(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, plan: _Plan, max_length: int
                 ) -> dict[str, dict[str, Any]]:
    """Each task's metrics, lm-eval running on the very model we score (adapter attached; loaded once)."""
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    spec = plan.lm_eval
    # "`pretrained` model kwarg is not of type `str`" and the like: expected here, noise to a user.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=plan.batch_size,
              max_length=max_length, add_bos_token=None if spec.tokenizer_bos else False)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=plan.task_manager,
                                     num_fewshot=spec.num_fewshot, limit=spec.limit, bootstrap_iters=0,
                                     log_samples=False)
    tasks = {}
    for task, values in output["results"].items():
        metrics = {_metric_name(key): value for key, value in values.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
        tasks[task] = {"metrics": metrics, "samples": output.get("n-samples", {}).get(task, {}).get("effective"),
                       "num_fewshot": output.get("n-shot", {}).get(task),
                       "higher_is_better": output.get("higher_is_better", {}).get(task, {})}
        _say(f"lm-eval {task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return tasks


def _metric_name(key: str) -> str:
    """lm-eval's ``"metric,filter"`` as ``metric`` (no filter) or ``metric,filter``."""
    name, _, filter_name = key.partition(",")
    return name if filter_name == "none" else key
