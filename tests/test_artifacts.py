"""The run map decides once which model is the base and which the tuned one; every stage asks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.artifacts import RunArtifacts, base_model, portable_location, tuned_model
from pipeline.recipe import recipe_from_dict


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("first document\n\nsecond document\n", encoding="utf-8")
    return path


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "quill"}))
    return path


def recipe(tmp_path: Path, data_file: Path, **sections):
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "data": {"sources": [{"name": str(data_file)}]},
                             **sections})


def test_the_base_is_the_pretrain_output_then_finetune_base_then_model_path(tmp_path, data_file) -> None:
    given = model_folder(tmp_path / "given")
    default = recipe(tmp_path, data_file)
    run = RunArtifacts.of(default)
    assert base_model(default, check=False) == str(run.pretrain)
    with pytest.raises(FileNotFoundError, match="the pretrain stage has not run"):
        base_model(default)  # checked before any compute
    model_folder(run.pretrain)
    assert base_model(default) == str(run.pretrain)

    explicit = recipe(tmp_path, data_file, finetune={"base": str(given)})
    assert base_model(explicit) == str(given)
    # Without pretraining the loader fills finetune.base from model.path: both stages agree on it.
    continued = recipe(tmp_path, data_file, model={"path": str(given)}, pretrain={"enabled": False})
    assert base_model(continued) == str(given) == continued.finetune.base
    # Fine-tuning off: its base plays no part, the pretrain output is the model.
    ignored = recipe(tmp_path, data_file, finetune={"enabled": False, "base": str(given)})
    assert base_model(ignored) == str(run.pretrain)
    only = recipe(tmp_path, data_file, model={"path": str(given)}, pretrain={"enabled": False},
                  finetune={"enabled": False})
    assert base_model(only) == str(given)


def test_a_local_base_without_config_names_the_key_and_the_fix(tmp_path, data_file) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = recipe(tmp_path, data_file, finetune={"base": str(empty)})
    with pytest.raises(FileNotFoundError, match=r"finetune\.base .* holds no config\.json\. Fix"):
        base_model(broken)
    assert base_model(recipe(tmp_path, data_file, finetune={"base": "someone/quill"})) == "someone/quill"  # Hub id


def test_the_tuned_model_prefers_the_merged_folder_except_for_a_classifier_lm(tmp_path, data_file) -> None:
    causal = recipe(tmp_path, data_file)
    run = RunArtifacts.of(causal)
    with pytest.raises(FileNotFoundError, match="no fine-tuned model"):
        tuned_model(causal)
    run.adapter.mkdir(parents=True)
    (run.adapter / "adapter_config.json").write_text("{}")
    assert tuned_model(causal).causal_lm == run.adapter and tuned_model(causal).head is None
    model_folder(run.merged)
    assert tuned_model(causal).causal_lm == run.merged

    classifier = recipe(tmp_path, data_file, finetune={"task": "classification"})
    tuned = tuned_model(classifier)
    assert (tuned.causal_lm, tuned.head) == (run.adapter, run.merged)  # a merged head has no LM head to score with
    assert tuned_model(recipe(tmp_path, data_file, finetune={"enabled": False})) is None


def test_every_stage_has_its_own_folder(tmp_path, data_file) -> None:
    run = RunArtifacts.of(recipe(tmp_path, data_file))
    folders = [run.stage_folder(s) for s in ("tokenizer", "pretrain", "finetune", "evaluate", "hub")]
    assert len(set(folders)) == 5 and all(f.parent == run.root for f in folders)
    assert run.adapter.parent == run.merged.parent == run.finetune and run.upload.parent == run.hub
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        run.stage_folder("train")


def test_portable_location_keeps_hub_ids_and_makes_local_paths_relative(tmp_path, monkeypatch) -> None:
    (tmp_path / "runs" / "q" / "pretrain").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs")
    assert portable_location("owner/model") == "owner/model"  # a Hub id is left as it is
    assert portable_location(tmp_path / "runs" / "q" / "pretrain") == "q/pretrain"
    assert portable_location(str(tmp_path / "elsewhere")) == "../elsewhere"  # relative even outside the directory
    assert portable_location(tmp_path / "runs" / "q" / "pretrain", start=tmp_path) == "runs/q/pretrain"
