"""The report on disk (`pipeline.report`): the Markdown's numbers match the JSON, tables and fences survive odd
text, and a base-only report has no tuned column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.report import write_report


def lm(ppl: float, bpb: float) -> dict:
    return {"perplexity": ppl, "bits_per_byte": bpb, "loss": math.log(ppl), "tokens": 900, "documents": 9, "bytes": 2000}


def sample_report() -> dict:
    return {
        "general": {"base": lm(12.3456789, 1.23456), "tuned": lm(13.98765, 1.3), "change": {
            "perplexity": 13.98765 / 12.3456789 - 1, "bits_per_byte": 1.3 / 1.23456 - 1}},
        "domain": {"base": lm(40.5, 2.5), "tuned": lm(8.25, 1.1), "change": {
            "perplexity": 8.25 / 40.5 - 1, "bits_per_byte": 1.1 / 2.5 - 1}},
        "tasks": {"generation": {"base": {"exact_match": 0.1, "rouge_l": 0.25}, "tuned": {"exact_match": 0.6,
                  "rouge_l": 0.75}, "change": {"exact_match": 0.5, "rouge_l": 0.5}, "rows": 10, "few_shot": 2,
                  "preview": [{"prompt": "A00 means: ", "reference": "Cholera", "base": "Chol|era",
                               "tuned": "Cholera"}]}},
        "samples": [{"prompt": "The heart", "base": [" is ```odd```"], "tuned": [" is fine"]}],
        "settings": {"seed": 1, "general_set": "validation split of data (x)", "domain_set": "evaluate sources (y)"},
    }


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell} ")]


def test_report_files_and_the_markdown_numbers_match_the_json(tmp_path: Path) -> None:
    report = sample_report()
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert {p.name for p in tmp_path.glob("*.png")} == {"perplexity.png", "bits_per_byte.png", "task_generation.png"}
    markdown = (tmp_path / "report.md").read_text()
    verdict = markdown.split("\n\n")[1]
    assert verdict.startswith("The tuned model is better on the domain: perplexity 40.50 → 8.25 (-79.6%).")
    assert "General perplexity 12.35 → 13.99 (forgetting +13.3%)" in verdict
    assert "| set | metric | base | tuned | change (relative) |" in markdown  # forgetting has its own column

    checked = 0
    for name in ("general", "domain"):
        for set_name, metric, base, tuned, change in table_rows(markdown, name):
            entry = report[set_name]
            assert float(base) == pytest.approx(entry["base"][metric], abs=5e-5)
            assert float(tuned) == pytest.approx(entry["tuned"][metric], abs=5e-5)
            assert float(change.rstrip("%")) / 100 == pytest.approx(entry["change"][metric], abs=5e-5)
            checked += 1
    for _, metric, base, tuned, change in table_rows(markdown, "generation"):
        entry = report["tasks"]["generation"]
        assert (float(base), float(tuned), float(change)) == pytest.approx(
            (entry["base"][metric], entry["tuned"][metric], entry["change"][metric]), abs=5e-5)
        checked += 1
    assert checked == 2 * 2 + 2  # every metric row of both tables was compared
    assert "Chol\\|era" in markdown  # a pipe in a prediction does not break the table
    assert "````text\nThe heart is ```odd```\n````" in markdown  # backticks in a sample do not close its fence


def test_a_base_only_report_has_no_tuned_column(tmp_path: Path) -> None:
    report = sample_report()
    for name in ("general", "domain"):
        report[name] = {"base": report[name]["base"]}
    report["tasks"], report["samples"] = {}, []
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.split("\n\n")[1] == ("Only the base model was evaluated (no fine-tuned model): domain perplexity "
                                          "40.50; general perplexity 12.35.")
    assert "| set | metric | base |\n" in markdown
    assert not [line for line in markdown.splitlines() if line.startswith("|") and "tuned" in line]
    assert len(table_rows(markdown, "general")) == len(table_rows(markdown, "domain")) == 2
