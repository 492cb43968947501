"""Faults a recipe shows before any compute: the pre-flight checks (`pipeline.preflight`) refuse the campaign's
late-validation recipes — shipped recipes with one mutation — before any stage runs, every problem at once, and
nothing is written; a launch config that cannot apply on this hardware is refused with the command that works; recipe
loading stays bounded on hostile files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import preflight
from pipeline.cli import main
from pipeline.recipe import RecipeError, load_recipe
from pipeline.recipe.loader import MAX_LISTED
from pipeline.runner import run_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture(autouse=True)
def _plain_launch(monkeypatch) -> None:
    """Each test starts as plain `pipeline run`: none of the variables `accelerate launch` exports."""
    for name in ACCELERATE_ENV:
        monkeypatch.delenv(name, raising=False)


def quickstart(tmp_path: Path, *overrides: str):
    return load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'run'}", *overrides])


def refused(recipe, stages=None) -> dict[str, str]:
    """Run the recipe; it must be refused before anything is written. Returns {key: message} of the problems."""
    with pytest.raises(RecipeError) as caught:
        run_recipe(recipe, stages=stages)
    assert not Path(recipe.output_dir).exists()  # not even recipe.yaml
    return dict(caught.value.problems)


def test_the_late_validation_recipes_are_refused_at_once_before_any_stage(tmp_path) -> None:
    """Each of these failed only at stage time, some after a full pretraining; together they are one refusal."""
    recipe = quickstart(
        tmp_path,
        "tokenizer.vocab_size=258",                          # 256 bytes + 4 special tokens do not fit
        "finetune.lora.target_modules=[q_proj, qkv_proj]",   # no module is called qkv_proj
        "finetune.label_column=titel",                       # the generation task's response column
        "finetune.data.sources[0].max_documents=40",         # 38 training rows at most ...
        "evaluate.few_shot=50",                              # ... for 50 solved examples
    )
    problems = refused(recipe)
    assert set(problems) == {"tokenizer.vocab_size", "finetune.lora.target_modules", "finetune.label_column",
                             "evaluate.few_shot"}
    assert "smallest vocabulary is 260" in problems["tokenizer.vocab_size"]
    assert "['qkv_proj'] match no module" in problems["finetune.lora.target_modules"]
    assert "q_proj" in problems["finetune.lora.target_modules"] and "Fix" in problems["finetune.lora.target_modules"]
    assert "'titel' is not a column" in problems["finetune.label_column"] and "'title'" in problems["finetune.label_column"]
    assert "at most 38 training rows" in problems["evaluate.few_shot"]
    assert all("Fix:" in message for message in problems.values())


def test_a_classification_label_column_is_checked_against_the_data_and_the_head_model(tmp_path) -> None:
    recipe = quickstart(tmp_path, "finetune.task=classification", "finetune.prompt_template=null",
                        "finetune.label_column=chapter", "finetune.lora.modules_to_save=[scores]",
                        "evaluate.tasks=[perplexity, classification]")
    problems = refused(recipe)
    assert "integer class ids" in problems["finetune.label_column"]  # 'chapter' holds strings; chapter_id is the id
    assert "QuillForSequenceClassification" in problems["finetune.lora.modules_to_save"]
    assert "['scores']" in problems["finetune.lora.modules_to_save"]


def test_a_text_column_the_source_lacks_is_named_with_its_index(tmp_path) -> None:
    problems = refused(quickstart(tmp_path, "finetune.data.sources[0].text_column=titel"))
    assert "'titel' is not a column of 'icd10cm'" in problems["finetune.data.sources[0].text_column"]


def test_pure_recipe_contradictions_are_refused_when_the_recipe_loads(tmp_path) -> None:
    with pytest.raises(RecipeError) as caught:
        quickstart(tmp_path, "finetune.prompt_template=null",  # generation scores prompts: none to give
                   "finetune.task=instruction", "finetune.data.streaming=true", "evaluate.tasks=[classification]")
    problems = caught.value.problems
    keys = [key for key, _ in problems]
    assert keys.count("evaluate.tasks") == 1 and "finetune.data.streaming" in keys
    assert "classification head" in dict(problems)["evaluate.tasks"]
    with pytest.raises(RecipeError, match=r"evaluate\.tasks: lists 'generation'.*without a finetune\.prompt_template"):
        quickstart(tmp_path, "finetune.prompt_template=null")


def test_a_folder_without_a_model_or_tokenizer_is_named_by_the_field_the_user_set(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    problems = refused(quickstart(tmp_path, f"tokenizer.path={empty}", f"model.path={empty}", "pretrain.enabled=false"))
    assert set(problems) == {"tokenizer.path", "model.path"}  # not finetune.base, which the loader filled from it
    assert "holds no tokenizer" in problems["tokenizer.path"] and "holds no config.json" in problems["model.path"]
    problems = refused(quickstart(tmp_path, f"finetune.base={tmp_path / 'config-only'}"))
    assert "holds a config.json but no weights" in problems["finetune.base"]


def test_only_the_selected_stages_are_checked(tmp_path) -> None:
    recipe = quickstart(tmp_path, "finetune.lora.target_modules=[qkv_proj]")
    assert preflight.problems(recipe, ["tokenizer"]) == []
    assert [key for key, _ in preflight.problems(recipe, ["finetune"])] == ["finetune.lora.target_modules"]


def test_dry_run_reports_the_pre_flight_problems(tmp_path, capsys) -> None:
    code = main(["run", str(QUICKSTART), f"output_dir={tmp_path / 'run'}", "tokenizer.vocab_size=259", "--dry-run"])
    assert code == 2
    assert "tokenizer.vocab_size: (259) cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ launch


def test_fsdp_or_deepspeed_on_cpu_is_refused_with_the_launch_that_works(tmp_path, monkeypatch) -> None:
    recipe = quickstart(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    problems = refused(recipe)
    assert "MULTI_CPU" in problems["ACCELERATE_USE_FSDP"]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml" in problems[
        "ACCELERATE_USE_FSDP"]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "DeepSpeed" in refused(recipe)["ACCELERATE_USE_DEEPSPEED"]
    assert preflight.problems(recipe, ["tokenizer"]) == []  # nothing trains: nothing to shard


def test_a_launch_mixed_precision_other_than_the_recipes_is_refused_not_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    problems = refused(quickstart(tmp_path))
    for key in ("pretrain.mixed_precision", "finetune.train.mixed_precision"):
        assert f"add {key}=bf16 to the command" in problems[key] and "--mixed_precision no" in problems[key]
    assert preflight.problems(quickstart(tmp_path, "pretrain.mixed_precision=bf16",
                                         "finetune.train.mixed_precision=bf16")) == []
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # fp16 on CPUs: accelerate would train in fp32
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    problems = refused(quickstart(tmp_path, "pretrain.mixed_precision=fp16", "finetune.enabled=false"))
    assert "does not apply on the CPU" in problems["pretrain.mixed_precision"]
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    # A plain `accelerate launch` exports "no" whatever the user wants: the recipe's value applies, nothing to refuse.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert preflight.problems(quickstart(tmp_path, "pretrain.mixed_precision=bf16")) == []


def test_accelerate_launch_of_the_fsdp_config_on_cpu_is_refused(tmp_path) -> None:
    """The campaign's launch: recipes/accelerate/fsdp.yaml on CPU ranks trained as MULTI_CPU with exit 0."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    text = tmp_path / "scenes.txt"  # a small local file: the pre-flight peek at a corpus is not what is tested
    text.write_text("\n\n".join(f"Scene {i}: the king rides to the castle." for i in range(20)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "pipeline", "run",
               str(QUICKSTART), f"output_dir={tmp_path / 'run'}", f"data.sources=[{{name: {text}}}]",
               "finetune.enabled=false", "evaluate.enabled=false"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT, check=False)
    assert result.returncode != 0, result.stderr[-2000:]  # the rank exits 2; torchrun's launcher reports 1
    assert "ACCELERATE_USE_FSDP: is set" in result.stderr
    assert "pretrain.mixed_precision: is 'no' but the accelerate launch asks for 'bf16'" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ hostile recipe files


def test_a_recipe_of_many_unknown_keys_is_answered_with_a_capped_list(tmp_path) -> None:
    hostile = tmp_path / "hostile.yaml"
    keys = [f"k{i}: 1" for i in range(3000)]
    hostile.write_text("output_dir: out\ndata: {sources: [{name: shakespeare}]}\n" + "\n".join(keys))
    with pytest.raises(RecipeError) as caught:
        load_recipe(hostile)
    message = str(caught.value)
    assert len(caught.value.problems) == 3000 and "(3000 problems)" in message
    assert message.count("\n  - ") == MAX_LISTED and f"… and {3000 - MAX_LISTED} more problems" in message
    assert message.count("Valid keys:") == 1  # the section's keys are listed once, not for every problem


def test_a_huge_or_non_utf8_recipe_file_is_refused_with_where(tmp_path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text("output_dir: out\n# " + "x" * 1_100_000 + "\n")
    with pytest.raises(RecipeError, match=r"is 1,100,019 bytes; a recipe is a few KB"):
        load_recipe(huge)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("output_dir: out  # café\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=rf"(?s){latin.name}.*not UTF-8 text: byte offset 22 \(line 1\) holds 0xe9"):
        load_recipe(latin)
