"""`pipeline eval MODEL` (`pipeline.assess`): the held-out metrics of `pipeline.scoring` on any causal LM (a Quill, a
Llama saved by transformers, base + adapter), a recipe's evaluate sets as the stage scores them, lm-evaluation-harness
tasks on the same loaded model with the same bits per byte, the report files, and refusals before any compute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from test_clients import MAX_LENGTH, TASK, _documents, _task_folder, client, fresh_copy
from tiny import make_rows, rows_quill, rows_tokenizer
from transformers import LlamaForCausalLM, T5Config

from pipeline import assess as assess_module
from pipeline import evaluation
from pipeline.cli import main
from pipeline.export import llama_config
from pipeline.loading import merge_adapter
from pipeline.recipe import load_recipe
from pipeline.scoring import language_model_metrics

BATCH = 3


@pytest.fixture(scope="module")
def documents(trained_lm) -> list[str]:
    """Held-out pieces of exactly k * MAX_LENGTH tokens: lm-eval's rolling windows and ours line up (test_clients)."""
    return _documents(trained_lm.tokenizer, trained_lm.held_out)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, documents) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return path


def run_eval(capsys, *arguments: str) -> dict:
    """`pipeline eval ... --json`, its exit status checked and its stdout parsed (nothing else may be on it)."""
    assert main(["eval", *map(str, arguments), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def ours(model: torch.nn.Module, tokenizer, documents: list[str], block_size: int = MAX_LENGTH + 1) -> dict:
    return language_model_metrics(model, tokenizer, documents, block_size=block_size, batch_size=BATCH,
                                  accelerator=Accelerator(cpu=True))


# ------------------------------------------------------------------------------------------ any model, any file


def test_a_file_is_scored_by_the_one_definition_on_a_quill_and_on_a_llama(trained_lm, documents, docs_file, tmp_path,
                                                                          capsys) -> None:
    report = run_eval(capsys, trained_lm.folder, "--source", docs_file, "--batch-size", BATCH)
    name = str(docs_file)
    expected = ours(fresh_copy(trained_lm), trained_lm.tokenizer, documents)
    assert report["sets"] == {name: expected}  # the same function on the same documents: exactly
    assert expected["documents"] == len(documents) and expected["tokens"] > len(documents)
    # The default window is the model's positions (128 here).
    positions = trained_lm.model.config.max_position_embeddings
    assert report["settings"]["sets"][name] == {"source": name, "block_size": positions}
    assert report["lm_eval"] == {} and report["settings"]["device"] == "cpu"

    # The same weights as a LlamaForCausalLM saved by transformers (no pipeline code in the folder): same figures.
    llama_folder = tmp_path / "llama"
    llama = LlamaForCausalLM(llama_config(trained_lm.model.config))
    llama.load_state_dict(trained_lm.model.state_dict(), strict=True)
    llama.save_pretrained(llama_folder)
    trained_lm.tokenizer.save_pretrained(llama_folder)
    assert json.loads((llama_folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(llama_folder.glob("*.py"))
    from_llama = run_eval(capsys, llama_folder, "--source", docs_file, "--batch-size", BATCH)["sets"][name]
    assert from_llama == pytest.approx(expected, rel=1e-5)

    # --out: report.json is the report; report.md shows its numbers and settings. Without --json: the tables.
    out = tmp_path / "report"
    assert main(["eval", str(trained_lm.folder), "--source", str(docs_file), "--batch-size", str(BATCH),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    for metric in ("perplexity", "bits_per_byte"):
        assert f"| {name} | {metric} | {expected[metric]:.4f} |" in markdown
        assert f"| {name} | {metric} | {expected[metric]:.4f} |" in printed
    assert f"{expected['tokens']} tokens, {expected['bytes']} bytes, block size 128" in markdown
    assert "## Settings" in markdown and json.dumps(report["settings"], indent=2) in markdown
    assert main(["eval", str(trained_lm.folder), "--source", str(docs_file), "--out", str(out)]) == 1  # not overwritten
    assert "already exists" in capsys.readouterr().err


def test_an_adapter_changes_the_score_and_scores_as_the_merged_model(trained_lm, docs_file, tmp_path, capsys) -> None:
    adapter = tmp_path / "adapter"
    torch.manual_seed(1)  # init_lora_weights=False: a random, non-zero update
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(fresh_copy(trained_lm), config).save_pretrained(adapter)
    trained_lm.tokenizer.save_pretrained(adapter)  # as the finetune stage saves it: the merged folder gets it too
    merged = merge_adapter(adapter, trained_lm.folder, tmp_path / "merged")
    name = str(docs_file)

    base = run_eval(capsys, trained_lm.folder, "--source", docs_file)["sets"][name]
    tuned_report = run_eval(capsys, trained_lm.folder, "--adapter", adapter, "--source", docs_file)
    tuned = tuned_report["sets"][name]
    assert tuned_report["settings"]["adapter"] == str(adapter)
    assert tuned["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)
    assert run_eval(capsys, merged, "--source", docs_file)["sets"][name] == pytest.approx(tuned, rel=1e-5)


# ------------------------------------------------------------------------------------------ a recipe's held-out sets


def test_a_recipe_scores_what_its_evaluate_stage_scores(tmp_path, capsys) -> None:
    tokenizer = rows_tokenizer()
    rows, notes = tmp_path / "rows.jsonl", tmp_path / "notes.txt"
    rows.write_text("".join(json.dumps(row) + "\n" for row in make_rows()))
    notes.write_text("\n\n".join(" ".join(reversed(row["text"].split())) for row in make_rows(9)))
    base = tmp_path / "out" / "pretrain"
    rows_quill(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "seed": 3,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
        "data": {"sources": [{"name": str(rows)}], "validation_fraction": 0.2, "block_size": 48},
        "finetune": {"enabled": False},
        "evaluate": {"max_documents": 6, "batch_size": 4, "tasks": ["perplexity"], "domain": [{"name": str(notes)}]},
    }))
    stage = evaluation.run(load_recipe(recipe_file), Accelerator(cpu=True))
    capsys.readouterr()  # the stage's progress lines

    report = run_eval(capsys, base, "--recipe", recipe_file)
    assert report["sets"] == {"general": stage["general"]["base"], "domain": stage["domain"]["base"]}
    assert report["sets"]["general"]["documents"] == 6 and report["sets"]["domain"]["documents"] == 6
    assert report["settings"]["sets"]["general"] == {"source": f"validation split of data ({rows})", "block_size": 48}
    # --max-documents and --block-size replace the recipe's; --source sets come beside the recipe's.
    report = run_eval(capsys, base, "--recipe", recipe_file, "--max-documents", 2, "--block-size", 16,
                      "--source", notes)
    assert set(report["sets"]) == {"general", "domain", str(notes)}
    assert report["sets"]["general"]["documents"] == 2
    assert {entry["block_size"] for entry in report["settings"]["sets"].values()} == {16}


# ------------------------------------------------------------------------------------------ lm-evaluation-harness


def test_lm_eval_tasks_land_in_the_report_with_our_bits_per_byte(trained_lm, documents, docs_file, tmp_path,
                                                                 capsys) -> None:
    client("lm_eval")
    tasks = _task_folder(tmp_path / "tasks", documents)
    name = str(docs_file)
    out = tmp_path / "report"
    report = run_eval(capsys, trained_lm.folder, "--source", docs_file, "--lm-eval", TASK, "--lm-eval-include", tasks,
                      "--out", out)
    theirs = report["lm_eval"][TASK]
    assert set(theirs["metrics"]) == {"bits_per_byte"} and theirs["samples"] == len(documents)
    assert theirs["num_fewshot"] == 0 and theirs["higher_is_better"] == {"bits_per_byte": False}
    mine = report["sets"][name]
    assert mine["bits_per_byte"] == pytest.approx(theirs["metrics"]["bits_per_byte"], rel=1e-5)
    # It can fail: counting the EOSes (in our loss, not in bits per byte) moves the figure far more.
    with_eos = mine["loss"] * mine["tokens"] / (math.log(2) * mine["bytes"])
    assert with_eos > theirs["metrics"]["bits_per_byte"] + 1e-3
    assert report["settings"]["lm_eval"] | {"version": None} == {
        "tasks": [TASK], "include": str(tasks), "num_fewshot": None, "limit": None, "add_bos_token": False,
        "max_length": MAX_LENGTH, "version": None}
    markdown = (out / "report.md").read_text()
    assert f"| {TASK} | bits_per_byte | {theirs['metrics']['bits_per_byte']:.4f} | lower |" in markdown
    # Why add_bos_token=False: left to this tokenizer (it adds BOS), lm-eval scores a second BOS as text.
    stock = run_eval(capsys, trained_lm.folder, "--lm-eval", TASK, "--lm-eval-include", tasks, "--limit", 1,
                     "--lm-eval-tokenizer-bos")
    first = ours(fresh_copy(trained_lm), trained_lm.tokenizer, documents[:1])["bits_per_byte"]
    assert stock["lm_eval"][TASK]["metrics"]["bits_per_byte"] != pytest.approx(first, rel=1e-4)
    assert stock["settings"]["lm_eval"]["add_bos_token"] is None and stock["sets"] == {}

    # lm-eval scores the very model we load: with an adapter both move, and still agree.
    adapter = tmp_path / "adapter"
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(fresh_copy(trained_lm), config).save_pretrained(adapter)
    tuned = run_eval(capsys, trained_lm.folder, "--adapter", adapter, "--source", docs_file, "--lm-eval", TASK,
                     "--lm-eval-include", tasks, "--limit", 2)
    tuned_bpb = tuned["lm_eval"][TASK]["metrics"]["bits_per_byte"]
    assert tuned["lm_eval"][TASK]["samples"] == 2
    assert tuned_bpb == pytest.approx(ours(_with_adapter(trained_lm, adapter), trained_lm.tokenizer, documents[:2])
                                      ["bits_per_byte"], rel=1e-5)
    assert tuned_bpb != pytest.approx(theirs["metrics"]["bits_per_byte"], rel=1e-3)


def _with_adapter(trained_lm, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_copy(trained_lm), str(adapter)).eval()


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if `pipeline eval` loads a model: the refusals below come before it."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(assess_module, "load_for_inference", refuse)


def refusal(capsys, *arguments: str) -> str:
    assert main(["eval", *map(str, arguments)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_bad_sources_and_models_are_refused_before_anything_loads(trained_lm, docs_file, tmp_path, capsys,
                                                                  no_loading) -> None:
    model = trained_lm.folder
    err = refusal(capsys, model, "--source", "shakespear")
    assert "unknown source 'shakespear'" in err and "did you mean 'shakespeare'" in err
    missing = tmp_path / "nope.jsonl"
    assert f"data file {str(missing)!r} does not exist" in refusal(capsys, model, "--source", missing)
    assert "nothing to measure" in refusal(capsys, model)
    t5 = tmp_path / "t5"
    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=64).save_pretrained(t5)
    assert "not a causal language model" in refusal(capsys, t5, "--source", docs_file)


def test_missing_models_and_unknown_lm_eval_tasks_are_refused(trained_lm, documents, docs_file, tmp_path,
                                                             capsys) -> None:
    assert f"no model folder at {tmp_path / 'absent'}" in refusal(capsys, tmp_path / "absent", "--source", docs_file)
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
    assert "is a PEFT adapter, not a model" in refusal(capsys, adapter_only, "--source", docs_file)

    client("lm_eval")
    tasks = _task_folder(tmp_path / "tasks", documents)
    err = refusal(capsys, trained_lm.folder, "--source", docs_file, "--lm-eval", f"{TASK[:-1]}",
                  "--lm-eval-include", tasks)
    assert f"unknown lm-eval task {TASK[:-1]!r} (did you mean {TASK!r}" in err
    assert "no such folder" in refusal(capsys, trained_lm.folder, "--lm-eval", TASK, "--lm-eval-include",
                                       tmp_path / "none")
