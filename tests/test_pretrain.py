"""Tokenizer + pretraining stages through the runner: loss goes down, artefacts load, reruns are skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.recipe import recipe_from_dict
from pipeline.runner import run_recipe


def tiny_recipe(output_dir: Path, **sections) -> dict:
    recipe = {
        "output_dir": str(output_dir),
        "seed": 0,
        "tokenizer": {"vocab_size": 400},
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64},
        "data": {"sources": [{"name": "shakespeare", "max_documents": 30}], "block_size": 32, "validation_fraction": 0.1},
        "pretrain": {"max_steps": 30, "batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 3, "log_every": 5,
                     "eval_every": 15, "save_every": 15, "eval_batches": None},
        "finetune": {"enabled": False},
        "evaluate": {"enabled": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("pretrain-run")
    outcomes = run_recipe(recipe_from_dict(tiny_recipe(out)), log=lambda _: None)
    return out, outcomes


def test_pretraining_lowers_the_loss_and_evaluates_on_held_out_blocks(pretrained) -> None:
    out, outcomes = pretrained
    assert [(o.stage, o.status) for o in outcomes][:2] == [("tokenizer", "ran"), ("pretrain", "ran")]
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_perplexity"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-6)
    assert 0 < evals[-1]["eval_bits_per_byte"] < 8
    # the validation metrics cover exactly the held-out blocks: no training block is evaluated
    from pipeline.data import load_corpus, tokenize_and_pack

    tokenizer = AutoTokenizer.from_pretrained(out / "pretrain")
    _, validation = load_corpus([{"name": "shakespeare", "max_documents": 30}], seed=0, validation_fraction=0.1)
    blocks = tokenize_and_pack(validation, tokenizer, block_size=32)
    targets = sum(sum(1 for t in row[1:] if t != -100) for row in blocks["labels"])
    assert evals[-1]["eval_tokens"] == targets
    assert (out / "pretrain" / "loss_curve.png").stat().st_size > 1000


def test_the_final_model_and_tokenizer_load_with_the_auto_classes(pretrained) -> None:
    out, _ = pretrained
    model = AutoModelForCausalLM.from_pretrained(out / "pretrain").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "pretrain")
    assert model.config.vocab_size == len(tokenizer) <= 400
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    # the saved final weights are the last checkpoint's weights
    checkpoint = load_file(out / "pretrain" / "checkpoints" / "checkpoint-00000030" / "model.safetensors")
    torch.testing.assert_close(model.model.embed_tokens.weight, checkpoint["model.embed_tokens.weight"], rtol=0, atol=0)
    fertility = json.loads((out / "tokenizer" / "fertility.json").read_text())
    assert fertility["tokens_per_word"] > 1 and fertility["bytes_per_token"] > 1


def test_a_rerun_with_the_same_recipe_skips_and_a_changed_one_reruns(pretrained, tmp_path: Path) -> None:
    out, _ = pretrained
    weights = (out / "pretrain" / "model.safetensors").read_bytes()
    again = run_recipe(recipe_from_dict(tiny_recipe(out)), log=lambda _: None)
    assert [o.status for o in again][:2] == ["skipped (up to date)"] * 2
    assert (out / "pretrain" / "model.safetensors").read_bytes() == weights
    # logging cadence does not change the artefact: still up to date
    cadence = tiny_recipe(out, pretrain={"log_every": 1})
    assert [o.status for o in run_recipe(recipe_from_dict(cadence), log=lambda _: None)][1] == "skipped (up to date)"


def test_a_changed_recipe_reruns_the_stage_and_keeps_the_old_artefact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = tiny_recipe(out, pretrain={"max_steps": 4, "save_every": 4, "eval_every": 4})
    run_recipe(recipe_from_dict(small), log=lambda _: None)
    old_weights = (out / "pretrain" / "model.safetensors").read_bytes()
    changed = tiny_recipe(out, pretrain={"max_steps": 4, "save_every": 4, "eval_every": 4, "learning_rate": 1e-3})
    outcomes = run_recipe(recipe_from_dict(changed), log=lambda _: None)
    assert [o.status for o in outcomes][:2] == ["skipped (up to date)", "ran"]
    moved = list(out.glob("pretrain.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "model.safetensors").read_bytes() == old_weights
    assert (out / "pretrain" / "model.safetensors").read_bytes() != old_weights


def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path: Path, capsys) -> None:
    settings = {"max_steps": 8, "save_every": 4, "eval_every": 100, "log_every": 1}
    uninterrupted = tmp_path / "uninterrupted"
    run_recipe(recipe_from_dict(tiny_recipe(uninterrupted, pretrain=settings)), log=lambda _: None)
    out = tmp_path / "run"
    recipe = tiny_recipe(out, pretrain=settings)
    run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    # as if the process died right after the step-4 checkpoint: stage incomplete, later work gone
    marker = out / "pretrain" / "stage.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    shutil.rmtree(out / "pretrain" / "checkpoints" / "checkpoint-00000008")
    (out / "pretrain" / "model.safetensors").unlink()
    messages: list[str] = []
    capsys.readouterr()
    outcomes = run_recipe(recipe_from_dict(recipe), log=messages.append)
    assert outcomes[1].status == "ran" and not any("moved" in m for m in messages)  # resumed in place
    assert "checkpoint-00000004 at step 4" in capsys.readouterr().out
    logged = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (uninterrupted / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 9))  # steps 5-8 logged once, not twice
    assert [r.get("loss") for r in logged] == [r.get("loss") for r in expected]
    resumed = load_file(out / "pretrain" / "model.safetensors")
    reference = load_file(uninterrupted / "pretrain" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def test_a_missing_text_column_stops_before_any_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(out, data={"sources": [{"name": "shakespeare", "text_column": "speech"}]})
    with pytest.raises(ValueError, match="speech"):
        run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    assert not (out / "pretrain").exists() and not (out / "tokenizer" / "tokenizer.json").exists()


def test_a_corpus_too_small_for_one_block_stops_before_any_training(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    recipe = tiny_recipe(out, tokenizer={"vocab_size": 300, "min_frequency": 1},
                         data={"sources": [{"name": str(corpus)}], "block_size": 64, "validation_fraction": 0.5})
    with pytest.raises(ValueError, match="block_size"):
        run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    assert not (out / "pretrain" / "checkpoints").exists() and not (out / "pretrain" / "metrics.jsonl").exists()


def test_a_recipe_under_two_cpu_ranks_trains_like_one_process(tmp_path: Path) -> None:
    """`accelerate launch` with two gloo ranks and half the per-device batch: the same losses, one log, one model."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    settings = {"max_steps": 12, "eval_every": 6, "save_every": 6, "log_every": 3}
    single = tmp_path / "single"
    run_recipe(recipe_from_dict(tiny_recipe(single, pretrain={**settings, "batch_size": 8})), log=lambda _: None)
    recipe = tmp_path / "recipe.yaml"
    from pipeline.recipe import dump_recipe

    dump_recipe(recipe_from_dict(tiny_recipe(tmp_path / "ddp", pretrain={**settings, "batch_size": 4})), recipe)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", "0",
               "-m", "pipeline", "run", str(recipe), "--num-processes", "2"]
    result = subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "processes: 2" in result.stdout and result.stdout.count("pretrain: ran") == 1  # the main process reports
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (single / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp] == [r["step"] for r in one]
    for a, b in zip(ddp, one):
        assert a.get("eval_tokens") == b.get("eval_tokens")  # no sample evaluated twice to even out batches
        for key in ("loss", "lr", "eval_loss", "eval_bits_per_byte"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    ddp_weights = load_file(tmp_path / "ddp" / "pretrain" / "model.safetensors")
    one_weights = load_file(single / "pretrain" / "model.safetensors")
    for key in one_weights:
        torch.testing.assert_close(ddp_weights[key], one_weights[key], rtol=1e-3, atol=1e-4, msg=key)


def test_streaming_pretraining_reads_the_corpus_lazily_and_trains(tmp_path: Path) -> None:
    from pipeline.sources import load_source

    corpus = tmp_path / "plays.jsonl"
    with corpus.open("w") as handle:
        for row in load_source({"name": "shakespeare", "max_documents": 30}):
            handle.write(json.dumps({"text": row["text"]}) + "\n")
    out = tmp_path / "run"
    recipe = tiny_recipe(out, data={"sources": [{"name": str(corpus)}], "streaming": True, "validation_documents": 3},
                         pretrain={"max_steps": 20, "eval_every": 20, "save_every": 20, "log_every": 5})
    run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and records[-1]["eval_tokens"] > 0
    assert AutoModelForCausalLM.from_pretrained(out / "pretrain").config.vocab_size == 400


def test_a_compiled_run_saves_a_model_that_reloads_with_its_trained_weights(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(out, pretrain={"max_steps": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 2, "compile": True})
    run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    saved = load_file(out / "pretrain" / "model.safetensors")
    assert not any(key.startswith("_orig_mod") for key in saved)  # torch.compile's wrapper prefix
    checkpoint = load_file(out / "pretrain" / "checkpoints" / "checkpoint-00000002" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out / "pretrain")
    assert model.state_dict().keys() - {"lm_head.weight"} <= checkpoint.keys()  # tied head saved once
    for key, value in model.state_dict().items():
        if key in checkpoint:
            torch.testing.assert_close(value, checkpoint[key], rtol=0, atol=0, msg=key)


def test_existing_tokenizer_and_model_are_used_instead_of_built(pretrained, tmp_path: Path) -> None:
    source, _ = pretrained
    out = tmp_path / "continued"
    recipe = tiny_recipe(out, tokenizer={"path": str(source / "tokenizer")},
                         model={"path": str(source / "pretrain"), "hidden_size": 64},  # ignored: the model exists
                         pretrain={"max_steps": 2, "warmup_steps": 1, "eval_every": 2, "save_every": 2})
    run_recipe(recipe_from_dict(recipe), log=lambda _: None)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (source / "tokenizer" / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer" / "fertility.json").exists()  # nothing was trained
    continued = AutoModelForCausalLM.from_pretrained(out / "pretrain")
    original = AutoModelForCausalLM.from_pretrained(source / "pretrain")
    assert continued.config.hidden_size == original.config.hidden_size == 32
    # training continued from the given weights: two small steps away from them, far from a fresh init
    drift = (continued.model.embed_tokens.weight - original.model.embed_tokens.weight).abs().max().item()
    assert 0 < drift < 0.05


def test_dry_run_prints_the_resolved_recipe_and_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:
    import yaml

    from pipeline.cli import main
    from pipeline.recipe import load_recipe, recipe_to_dict
    from pipeline.plan import plan

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "never-written"
    args = ["run", str(root / "recipes" / "quickstart.yaml"), f"output_dir={out}", "pretrain.max_steps=70", "--dry-run"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    recipe_text, plan_text = printed.split("# plan\n")
    recipe = load_recipe(root / "recipes" / "quickstart.yaml", [f"output_dir={out}", "pretrain.max_steps=70"])
    assert yaml.safe_load(recipe_text) == recipe_to_dict(recipe)
    planned = json.loads(plan_text)
    assert planned == json.loads(json.dumps(plan(recipe)))
    assert planned["pretrain"]["tokens"] == 70 * 16 * 128 and planned["parameters"] > 1_000_000
    assert not out.exists()
