"""The evaluation report on disk: ``report.json`` as the evaluation stage assembled it, ``report.md`` (a verdict,
then tables) and bar charts of base vs tuned; and the report of one model (`pipeline eval`).

    report dict ──write_report──► folder/report.json
                              ├─► folder/report.md    verdict + language-modelling and task tables + samples + settings
                              └─► folder/*.png        perplexity, bits_per_byte, task_<name>: one bar per model
    model report ──write_model_report──► folder/report.json, folder/report.md (model_tables + settings)

It takes the report and a folder and imports nothing of the stages (the hub reads the same ``report.json``).

``report.json`` keys (stable)::

    general, domain: {"base": {...}, "tuned": {...}, "change": {...}} or null
        per model: perplexity, bits_per_byte, loss (nats/token), tokens (scored), documents, bytes;
        change: relative change tuned / base - 1 of perplexity and bits_per_byte (+0.05 = 5% worse)
    tasks: {"generation": {...}, "classification": {...}} (only the tasks that ran)
        per model: exact_match, rouge_l / accuracy, f1 (macro); change: absolute difference tuned - base;
        rows (scored rows), few_shot (generation), preview (first rows with their predictions, generation)
    samples: [{"prompt": str, "decoding": str, "base": [completion, ...], "tuned": [...],
               "sampled": {"decoding": str, "base": [...], "tuned": [...]}}]   (sampled: beside a greedy recipe only)
    settings: models, data, decoding and sizes used

The report of one model (`pipeline eval`, `pipeline.assess`), keys (stable)::

    sets: {name: {perplexity, bits_per_byte, loss, tokens, documents, bytes}}   a --source's name, or a recipe's
        general / domain; the same numbers as the stage's per-model entries
    lm_eval: {task: {"metrics": {name: value}, "samples": int, "num_fewshot": int, "higher_is_better": {...}}}
        lm-evaluation-harness's figures; a metric under a filter other than "none" is named "metric,filter"
    settings: model, adapter, recipe, sets ({name: {source, block_size}}), max_documents, batch_size, device, dtype,
        lm_eval (tasks, include, num_fewshot, limit, add_bos_token, max_length, version) or null
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LM_METRICS", "MODELS", "model_tables", "verdict", "write_model_report", "write_report"]

MODELS = ("base", "tuned")
LM_METRICS = ("perplexity", "bits_per_byte")  # shown in the tables and plots; lower is better


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write ``report.json``, ``report.md`` (a verdict, then tables) and bar charts of base vs tuned to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plot(report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(_markdown(report, plots))


def write_model_report(report: dict[str, Any], folder: Path) -> None:
    """Write one model's report (`pipeline eval`): ``report.json`` and ``report.md`` (its tables, then the
    settings)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    settings = report.get("settings", {})
    adapter = f" + adapter `{settings['adapter']}`" if settings.get("adapter") else ""
    lines = [f"# Evaluation: `{settings.get('model')}`{adapter}", "", model_tables(report),
             "## Settings", "", _fenced(json.dumps(settings, indent=2), "json"), ""]
    (folder / "report.md").write_text("\n".join(lines))


def model_tables(report: dict[str, Any]) -> str:
    """One model's numbers as Markdown: a language-modelling table (a row per set and metric, as in the stage's
    report) and the lm-evaluation-harness tasks in their own table."""
    lines = []
    sets = report.get("sets") or {}
    if sets:
        lines += ["## Language modelling (lower is better)", "", _row(["set", "metric", "value"]),
                  _row(["---"] * 3)]
        lines += [_row([name, metric, _number(entry[metric])]) for name, entry in sets.items() for metric in LM_METRICS]
        lines.append("")
        described = (report.get("settings") or {}).get("sets") or {}
        for name, entry in sets.items():
            where = described.get(name, {})
            lines.append(f"- {name}: {entry['documents']} documents, {entry['tokens']} tokens, {entry['bytes']} bytes, "
                         f"block size {where.get('block_size')} ({where.get('source') or name}).")
        lines.append("")
    tasks = report.get("lm_eval") or {}
    if tasks:
        lines += ["## lm-evaluation-harness", "", _row(["task", "metric", "value", "better"]), _row(["---"] * 4)]
        for name, entry in tasks.items():
            for metric, value in entry["metrics"].items():
                better = entry.get("higher_is_better", {}).get(metric.partition(",")[0])
                lines.append(_row([name, metric, _number(value), {True: "higher", False: "lower"}.get(better, "")]))
        lines.append("")
        for name, entry in tasks.items():
            lines.append(f"- {name}: {entry.get('samples')} samples, {entry.get('num_fewshot')}-shot.")
        lines.append("")
    return "\n".join(lines)


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
                decodings = [(sample.get("decoding", ""), sample[model])]
                if model in sample.get("sampled", {}):
                    decodings.append((sample["sampled"]["decoding"], sample["sampled"][model]))
                for decoding, completions in decodings:
                    for completion in completions:
                        title = f"**{model}** ({decoding})" if decoding else f"**{model}**"
                        lines += [title, "", _fenced(sample["prompt"] + completion), ""]
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
        charts.append((metric, f"{_label(metric)} of held-out text (lower is better)", groups))
    for task, entry in (report.get("tasks") or {}).items():
        models = [m for m in MODELS if m in entry]
        groups = {_label(metric): {m: entry[m][metric] for m in models} for metric in entry[models[0]]}
        charts.append((f"task_{task}", f"{task} task (higher is better)", groups))

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
            ax.set_ylabel("perplexity (log scale)")
        elif stem in LM_METRICS:
            ax.set_ylabel(_label(stem))
        else:  # task scores live in [0, 1]: the whole range, so that all-zero bars read as zero, not as noise
            ax.set_ylim(0, 1.08)
            ax.set_ylabel("score (0 to 1)")
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}.png", dpi=100)
        plt.close(fig)
        written.append(f"{stem}.png")
    return written
