"""Every recipe in recipes/ is valid as shipped, and names its prerequisites clearly when they are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.recipe import RecipeError, load_recipe
from pipeline.runner import plan

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
