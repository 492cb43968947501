"""Every recipe in recipes/ is valid as shipped, and names its prerequisites clearly when they are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.recipe import RecipeError, load_recipe
from pipeline.plan import plan

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_the_ones_the_readme_names() -> None:
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "medical-lora.yaml"}
    readme = (RECIPES[0].parents[1] / "README.md").read_text()
    for name in ("quickstart.yaml", "medical-lora.yaml"):
        assert f"recipes/{name}" in readme


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_each_recipe_validates_and_plans(path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for folder in ("runs/quickstart/tokenizer", "runs/quickstart/pretrain"):  # what the quickstart leaves behind
        (tmp_path / folder).mkdir(parents=True)
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'out'}"])
    summary = plan(recipe)
    if recipe.pretrain.enabled:
        assert summary["parameters"] > 0 and summary["pretrain"]["tokens"] > 0
    assert not (tmp_path / "out").exists()  # validating and planning write nothing


def test_a_recipe_that_builds_on_missing_artefacts_says_which(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as error:
        load_recipe(RECIPES[0].parent / "icd-chapter-classification.yaml")
    message = str(error.value)
    assert "tokenizer.path" in message and "finetune.base" in message and "runs/quickstart" in message


def test_the_gpu_recipe_runs_end_to_end_when_shrunk(tmp_path: Path, monkeypatch) -> None:
    """medical-lora.yaml's own switches (bf16 autocast, document masking, rsLoRA, TensorBoard, two tokenizer sources,
    sampled generation) on a CPU-sized model."""
    import json

    from pipeline.runner import run_recipe

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    shrink = [
        f"output_dir={out}", "tokenizer.vocab_size=1024", "tokenizer.sources[0].max_documents=100",
        "tokenizer.sources[1].max_documents=500", "model.hidden_size=64", "model.num_hidden_layers=2",
        "data.max_documents=100", "data.block_size=128", "pretrain.max_steps=20", "pretrain.batch_size=4",
        "pretrain.warmup_steps=2", "pretrain.eval_every=10", "pretrain.save_every=10",
        "finetune.data.sources[0].max_documents=500", "finetune.data.block_size=128", "finetune.train.max_steps=10",
        "finetune.train.batch_size=4", "finetune.train.warmup_steps=2", "finetune.train.eval_every=5",
        "finetune.train.save_every=5", "evaluate.max_documents=10", "evaluate.generation.max_new_tokens=8",
    ]
    recipe = load_recipe(RECIPES[0].parent / "medical-lora.yaml", shrink)
    assert recipe.data.document_masking and recipe.pretrain.mixed_precision == "bf16"
    run_recipe(recipe, log=lambda _: None)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["domain"]["tuned"]["perplexity"] < report["domain"]["base"]["perplexity"]
    adapter = json.loads((out / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["r"] == 32
    assert list((out / "pretrain").rglob("events.out.tfevents.*"))
    assert len(report["samples"]) == 4 and all(len(s["tuned"]) == 1 for s in report["samples"])
