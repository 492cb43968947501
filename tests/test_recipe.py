"""The recipe schema: YAML pitfalls, overrides, every malformed recipe rejected up front, hashing, round trips."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from pipeline.recipe import (
    PretrainSection,
    Recipe,
    RecipeError,
    TrainSection,
    dump_recipe,
    from_dict,
    load_recipe,
    recipe_from_dict,
    recipe_json_schema,
    recipe_to_dict,
    section_hash,
    yaml12,
)
from pipeline.recipe.schema import Int, PathValue

MINIMAL = "output_dir: out\ndata:\n  sources: [{name: data.txt}]\n"

# Every section away from its defaults, so a field lost in a round trip shows up.
FULL = """
output_dir: out
seed: 7
tokenizer: {vocab_size: 1000, min_frequency: 3, sources: [{name: data.txt, weight: 2.0}], max_documents: 50}
model:
  hidden_size: 64
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  intermediate_size: 128
  hidden_act: gelu
  position_embedding_type: learned
  max_position_embeddings: 128
  rope_theta: 5.0e+5
  dropout: 0.1
  tie_word_embeddings: false
  attn_implementation: eager
data:
  sources: [{name: data.txt, max_documents: 10}, {name: icd10cm, weight: 0.5}]
  validation_fraction: 0.1
  block_size: 64
  document_masking: true
  num_proc: 2
pretrain:
  max_steps: 50
  num_epochs: 3
  learning_rate: 1e-3
  warmup_steps: 5
  lr_scheduler: linear
  max_grad_norm: null
  mixed_precision: bf16
  trackers: [jsonl, tensorboard]
  resume: never
finetune:
  base: null
  task: classification
  num_labels: 4
  label_column: chapter_id
  data: {sources: [{name: icd10cm, max_documents: 20}], block_size: 32, packing: false}
  lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj], use_rslora: true, modules_to_save: [score]}
  train: {max_steps: 20, learning_rate: 2e-3, warmup_steps: 2}
  merge: true
evaluate:
  general: [{name: data.txt}]
  max_documents: null
  few_shot: 2
  tasks: [perplexity, classification]
  generation: {prompts: ["E11", "1:30", "1e-4", "no"], do_sample: true, temperature: 0.7, top_k: 5, top_p: 0.9,
               num_return_sequences: 2}
hub: {push: true, repo_id: someone/quill-icd, private: true, revision: dev, commit_message: first}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding one small text source, `data.txt`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("first document\n\nsecond document\n", encoding="utf-8")
    return tmp_path


def _load(text: str, overrides=()) -> Recipe:
    Path("recipe.yaml").write_text(text, encoding="utf-8")
    return load_recipe("recipe.yaml", overrides)


# --------------------------------------------------------------------------------------- round trips


def test_full_recipe_round_trips(workdir):
    recipe = _load(FULL)
    plain = recipe_to_dict(recipe)
    assert json.loads(json.dumps(plain)) == plain  # plain data only (paths are strings)
    assert recipe_from_dict(plain) == recipe
    # Non-default values survive, so the round trip compared something.
    assert recipe.model.position_embedding_type == "learned" and recipe.finetune.lora.modules_to_save == ["score"]
    assert recipe.evaluate.generation.prompts == ["E11", "1:30", "1e-4", "no"]

    assert copy.deepcopy(recipe) == recipe and copy.deepcopy(recipe) is not recipe
    assert recipe_to_dict(recipe.finetune.lora) == plain["finetune"]["lora"]  # a section alone, too

    dump_recipe(recipe, workdir / "run" / "recipe.yaml")
    assert load_recipe(workdir / "run" / "recipe.yaml") == recipe
    assert [p.name for p in (workdir / "run").iterdir()] == ["recipe.yaml"]  # no partial file left behind


def test_defaults_are_resolved_from_other_sections(workdir):
    recipe = _load(MINIMAL)
    assert recipe.tokenizer.sources == recipe.data.sources  # None -> data.sources
    assert recipe.finetune.data == recipe.data  # None -> the top-level data
    assert recipe.finetune.base is None  # the pretrain output
    # A finetune-only recipe on an existing local model: the base becomes that model.
    (workdir / "base-model").mkdir()
    recipe = _load(MINIMAL + "model: {path: base-model}\npretrain: {enabled: false}\n")
    assert recipe.finetune.base == str(workdir / "base-model")
    # A given tokenizer is not trained, so it gets no training sources.
    assert _load(MINIMAL + "tokenizer: {path: gpt2}\n").tokenizer.sources is None


def test_relative_paths_resolve_against_the_working_directory(workdir, monkeypatch):
    recipe = _load(MINIMAL.replace("out\n", "runs/a\n"))
    assert recipe.output_dir == workdir / "runs" / "a"
    assert recipe.data.sources[0].name == str(workdir / "data.txt")
    assert recipe.evaluate.general is None  # None stays None: the evaluation stage picks the split
    monkeypatch.setenv("HOME", str(workdir / "home"))
    assert _load(MINIMAL.replace("out\n", "~/x\n")).output_dir == workdir / "home" / "x"


def test_token_is_kept_out_of_dumps_and_hashes(workdir):
    recipe = _load(MINIMAL + "hub: {token: hf_secret}\n")
    assert recipe.hub.token == "hf_secret"
    assert recipe_to_dict(recipe)["hub"]["token"] is None
    assert recipe_to_dict(recipe, secrets=True)["hub"]["token"] == "hf_secret"
    dump_recipe(recipe, "dumped.yaml")
    assert "hf_secret" not in Path("dumped.yaml").read_text()
    assert section_hash(recipe, "hub") == section_hash(_load(MINIMAL), "hub")


# --------------------------------------------------------------------------------------- YAML 1.1 pitfalls


def test_yaml11_pitfalls_are_converted(workdir):
    text = MINIMAL + (
        "seed: 042\n"
        "pretrain: {learning_rate: 1e-4, mixed_precision: no, max_steps: 1e3, warmup_steps: 1_0}\n"
        "finetune: {train: {mixed_precision: off}}\n"
        "evaluate: {generation: {prompts: [1:30, 2024-01-01]}}\n"
    )
    # What plain PyYAML makes of these lines: the traps the recipe loader removes.
    plain = yaml.safe_load(text)
    assert plain["seed"] == 34 and plain["pretrain"]["learning_rate"] == "1e-4"
    assert plain["pretrain"]["mixed_precision"] is False and plain["evaluate"]["generation"]["prompts"][0] == 90

    recipe = _load(text)
    assert recipe.seed == 42  # documented: leading zeros are decimal (YAML 1.2), not octal
    assert recipe.pretrain.learning_rate == 0.0001 and isinstance(recipe.pretrain.learning_rate, float)
    assert recipe.pretrain.mixed_precision == "no" and recipe.finetune.train.mixed_precision == "no"
    assert recipe.pretrain.max_steps == 1000 and isinstance(recipe.pretrain.max_steps, int)
    assert recipe.pretrain.warmup_steps == 10
    assert recipe.evaluate.generation.prompts == ["1:30", "2024-01-01"]


def test_plain_pyyaml_output_is_converted_too(workdir):
    """A mapping from `yaml.safe_load` holds '1e-4' as a string: float fields still accept it."""
    recipe = recipe_from_dict(yaml.safe_load(MINIMAL + "pretrain: {learning_rate: 1e-4, adam_epsilon: '1e-6'}\n"))
    assert recipe.pretrain.learning_rate == 1e-4 and recipe.pretrain.adam_epsilon == 1e-6
    section = from_dict(TrainSection, {"learning_rate": "2e-4", "max_steps": "1e2"})
    assert section.learning_rate == 2e-4 and section.max_steps == 100
    with pytest.raises(RecipeError, match=r"pretrain\.max_steps: expected an integer, got the number 2\.5"):
        from_dict(TrainSection, {"max_steps": 2.5}, path="pretrain")


def test_dumped_strings_that_look_like_numbers_stay_strings(workdir):
    recipe = _load(MINIMAL + "evaluate: {generation: {prompts: ['1e-4', '042', 'no', '0x1F']}}\n")
    dump_recipe(recipe, "dumped.yaml")
    assert load_recipe("dumped.yaml").evaluate.generation.prompts == ["1e-4", "042", "no", "0x1F"]


def test_from_dict_converts_generic_annotations():
    """A caller's own model built from the recipe's scalar types gets the recipe's conversions and wording."""

    class Extra(BaseModel):
        where: PathValue
        counts: dict[str, Int] = Field(default_factory=dict)
        anything: dict[str, Any] | None = None
        tags: list[Literal["a", "b"]] = Field(default_factory=list)

    value = from_dict(Extra, {"where": "~/x", "counts": {"n": "1e2"}, "anything": {"k": [1, "v"]}, "tags": ["b"]})
    assert value == Extra(where=Path.home() / "x", counts={"n": 100}, anything={"k": [1, "v"]}, tags=["b"])
    with pytest.raises(RecipeError) as caught:
        from_dict(Extra, {"where": "", "counts": {"n": 1.5}, "tags": ["c"]}, path="extra")
    assert [path for path, _ in caught.value.problems] == ["extra.where", "extra.counts.n", "extra.tags[0]"]


# --------------------------------------------------------------------------------------- overrides


def test_overrides_set_scalars_lists_and_list_items(workdir):
    recipe = _load(
        MINIMAL,
        [
            "pretrain.learning_rate=1e-3",
            "data.sources=[{name: icd10cm, max_documents: 5}, {name: data.txt}]",
            "data.sources[1].weight=2",
            "finetune.lora.target_modules=[q_proj, v_proj]",
            "evaluate.generation.prompts=[hello]",
            "seed=1",
            "seed=2",  # the last one wins
        ],
    )
    assert recipe.pretrain.learning_rate == 1e-3
    assert [s.name for s in recipe.data.sources] == ["icd10cm", str(Path.cwd() / "data.txt")]
    assert recipe.data.sources[0].max_documents == 5 and recipe.data.sources[1].weight == 2.0
    assert recipe.finetune.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.evaluate.generation.prompts == ["hello"] and recipe.seed == 2


def test_override_creates_a_section_the_recipe_left_out(workdir):
    recipe = _load(MINIMAL + "finetune:\n", ["finetune.data.block_size=64", "finetune.data.sources=[{name: icd10cm}]"])
    assert recipe.finetune.data.block_size == 64 and recipe.finetune.data.sources[0].name == "icd10cm"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("pretrain.lerning_rate=1e-3", ["pretrain.lerning_rate: unknown key", "Did you mean 'learning_rate'?"]),
        ("pretrian.max_steps=3", ["pretrian: unknown key", "Did you mean 'pretrain'?"]),
        ("pretrain.learning_rate", ["is not KEY=VALUE", "pretrain.learning_rate=1e-3"]),
        ("pretrain.learning_rate=abc", ["pretrain.learning_rate: expected a number, got the string 'abc'"]),
        ("data.sources[3].weight=2", ["data.sources[3]: override", "index out of range, the recipe lists 1"]),
        ("seed.value=3", ["seed: override", "is an integer, it has no key 'value'"]),
        ("pretrain[0]=3", ["pretrain: override", "not a list"]),
        ("data.sources=[{name: data.txt}", ["data.sources: override value", "not valid YAML"]),
        ("pretrain.max-steps=3", ["'max-steps' is not a key"]),
    ],
)
def test_bad_overrides_are_reported(workdir, override, expected):
    with pytest.raises(RecipeError) as caught:
        _load(MINIMAL, [override])
    for text in expected:
        assert text in str(caught.value)


# --------------------------------------------------------------------------------------- malformed recipes

MALFORMED = [
    (MINIMAL + "  streaming: true\n  packing: false\n", ["data.streaming: needs packing: true"]),
    (MINIMAL + "model: {attn_implementation: flash_attention_2}\n", ["pretrain.mixed_precision: is 'no' but flash_attention_2"]),
    (MINIMAL + "model: {attn_implementation: flex_attention, dropout: 0.1}\n", ["model.dropout: must be 0 with flex_attention"]),
    # (recipe YAML, substrings the error must contain: the key path, what was expected / found, the fix)
    (MINIMAL + "pretrain: {lerning_rate: 1e-3}\n", ["pretrain.lerning_rate: unknown key", "Did you mean 'learning_rate'?"]),
    (MINIMAL + "pretrain: {lr: 1e-3}\n", ["pretrain.lr: unknown key", "Did you mean 'learning_rate'?"]),
    (MINIMAL + "pretrian: {max_steps: 3}\n", ["pretrian: unknown key", "Did you mean 'pretrain'?"]),
    (MINIMAL + "pretrain: {learning_rate: -1e-4}\n", ["pretrain.learning_rate: must be > 0, got -0.0001"]),
    (MINIMAL + "pretrain: {learning_rate: fast}\n", ["pretrain.learning_rate: expected a number, got the string 'fast'", "Fix: write a number"]),
    (MINIMAL + "pretrain: {warmup_steps: 500, max_steps: 100}\n", ["pretrain.warmup_steps: (500) exceeds max_steps (100)", "Fix: lower warmup_steps"]),
    (MINIMAL + "pretrain: {batch_size: 0}\n", ["pretrain.batch_size: must be >= 1, got 0"]),
    (MINIMAL + "pretrain: {keep_last: -1}\n", ["pretrain.keep_last: must be >= 0, got -1"]),
    (MINIMAL + "pretrain: {max_steps: 2.5}\n", ["pretrain.max_steps: expected an integer, got the number 2.5", "whole number"]),
    (MINIMAL + "pretrain: {mixed_precision: yes}\n", ["pretrain.mixed_precision: expected one of 'no', 'bf16', 'fp16', got the boolean true", "quoted"]),
    (MINIMAL + "pretrain: {compile: 'yes'}\n", ["pretrain.compile: expected true or false, got the string 'yes'", "remove the quotes"]),
    (MINIMAL + "pretrain: {max_grad_norm: .inf}\n", ["pretrain.max_grad_norm: expected a number or null, got the number inf", "finite"]),
    (MINIMAL + "pretrain: {trackers: wandb}\n", ["pretrain.trackers: expected a list of strings, got the string 'wandb'", "[wandb]"]),
    (MINIMAL + "pretrain: {trackers: [jsonl, tensorbord]}\n", ["pretrain.trackers[1]: expected one of 'jsonl'", "Did you mean 'tensorboard'?"]),
    (MINIMAL + "pretrain: {max_steps: 10, max_steps: 20}\n", ["duplicate key 'max_steps'", "line 4"]),
    (MINIMAL + "pretrain: {resume: missing-ckpt}\n", ["pretrain.resume: checkpoint", "missing-ckpt", "does not exist"]),
    (MINIMAL + "model: {num_attention_heads: 4, num_key_value_heads: 3}\n", ["model.num_key_value_heads: must divide num_attention_heads (4), got 3", "e.g. 2"]),
    (MINIMAL + "model: {hidden_size: 250}\n", ["model.num_attention_heads: must divide hidden_size (250), got 4", "e.g. 5"]),
    (MINIMAL + "model: {max_position_embeddings: 128}\n", ["data.block_size: (256) exceeds model.max_position_embeddings (128)"]),
    (MINIMAL + "model: {position_embedding_type: rotary}\n", ["model.position_embedding_type: expected one of 'rope', 'sinusoidal', 'learned', got the string 'rotary'"]),
    (MINIMAL + "model: {hidden_act: swish2}\n", ["model.hidden_act: expected one of 'silu'"]),
    (MINIMAL + "model: {path: ./no-such-model}\n", ["model.path: './no-such-model' is neither an existing local folder"]),
    (MINIMAL + "tokenizer: {vocab_size: 100}\n", ["tokenizer.vocab_size: must be more than 256, got 100"]),
    ("output_dir: out\ndata: {sources: [{name: data.txt}], validation_fraction: 1.0}\n", ["data.validation_fraction: must be in (0, 1), got 1.0"]),
    ("output_dir: out\ndata: {sources: []}\n", ["data.sources: must list at least one source"]),
    ("output_dir: out\ndata: {sources: [{weight: 2}]}\n", ["data.sources[0].name: is required (a string) but missing"]),
    ("output_dir: out\ndata: {sources: [{name: data.txt}, {name: missing.txt}]}\n", ["data.sources[1].name: data file", "missing.txt", "does not exist"]),
    ("output_dir: out\ndata: {sources: [{name: data.txt}], packing: false, document_masking: true}\n", ["data.document_masking: only applies to packed blocks"]),
    ("output_dir: out\n", ["data: is required (a mapping) but missing"]),
    ("data: {sources: [{name: data.txt}]}\n", ["output_dir: is required (a path) but missing"]),
    ("- output_dir: out\n", ["<recipe>: must be a mapping of sections, got a list"]),
    ("output_dir: out\ndata: {sources: [{name: data.txt}\n", ["<recipe>: is not valid YAML", "line"]),
    (MINIMAL + "seed: -1\n", ["seed: must be in [0, 4294967295], got -1"]),
    (MINIMAL + "finetune: {lora: {r: 0}}\n", ["finetune.lora.r: must be >= 1, got 0"]),
    (MINIMAL + "finetune: {task: causal_lm, num_labels: 3}\n", ["finetune.num_labels: is only used by task 'classification'"]),
    (MINIMAL + "finetune: {data: {sources: [{name: data.txt}], block_size: 1024}}\n", ["finetune.data.block_size: (1024) exceeds model.max_position_embeddings (512)"]),
    (MINIMAL + "pretrain: {enabled: false}\n", ["finetune.base: is not set and there is nothing to fine-tune"]),
    # finetune.enabled is the one switch of fine-tuning: the training loop settings have none.
    (MINIMAL + "finetune: {train: {enabled: false}}\n", ["finetune.train.enabled: unknown key", "Valid keys: max_steps"]),
    (MINIMAL + "pretrain: {enabled: false}\nfinetune: {enabled: false}\n", ["evaluate.enabled: is true but no model is trained or given"]),
    (MINIMAL + "evaluate: {few_shot: -1}\n", ["evaluate.few_shot: must be >= 0, got -1"]),
    (MINIMAL + "evaluate: {tasks: [perplexity, bleu]}\n", ["evaluate.tasks[1]: expected one of 'perplexity', 'classification', 'generation', got the string 'bleu'"]),
    (MINIMAL + "evaluate: {generation: {top_p: 1.5}}\n", ["evaluate.generation.top_p: must be in (0, 1], got 1.5"]),
    (MINIMAL + "evaluate: {generation: {do_sample: true, temperature: 0}}\n", ["evaluate.generation.temperature: must be > 0, got 0.0", "do_sample: false"]),
    (MINIMAL + "evaluate: {generation: {num_return_sequences: 3}}\n", ["evaluate.generation.num_return_sequences: is 3 but greedy decoding", "do_sample: true"]),
    (MINIMAL + "hub: {push: true}\n", ["hub.repo_id: is required when push is true"]),
    (MINIMAL + "hub: {repo_id: 'not a/valid/id'}\n", ["hub.repo_id: 'not a/valid/id' is not a valid Hub repo id"]),
    (MINIMAL + "hub: {revision: 0123}\n", ["hub.revision: expected a string or null, got the number 123", "quotes"]),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED, ids=[f"case{i:02d}" for i in range(len(MALFORMED))])
def test_malformed_recipe_is_rejected_before_anything_is_written(workdir, text, expected):
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(RecipeError) as caught:
        _load(text)
    message = str(caught.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert sorted(p.name for p in workdir.iterdir()) == sorted(before + ["recipe.yaml"])  # output_dir not created


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 20


def test_all_problems_are_reported_together(workdir):
    text = (
        "output_dir: out\n"
        "data: {sources: [{name: missing.txt}], block_size: 0}\n"
        "pretrain: {lerning_rate: 1e-3, batch_size: 0}\n"
        "hub: {push: true}\n"
    )
    with pytest.raises(RecipeError) as caught:
        _load(text)
    paths = [path for path, _ in caught.value.problems]
    assert paths == ["data.block_size", "pretrain.lerning_rate", "pretrain.batch_size", "hub.repo_id", "data.sources[0].name"]
    assert "5 problems" in str(caught.value) and "recipe.yaml" in str(caught.value)


def test_environment_checks_run_once_the_values_are_valid(workdir):
    """A missing file is reported together with cross-field problems of a well-typed recipe."""
    text = "output_dir: out\ndata: {sources: [{name: missing.txt}]}\npretrain: {warmup_steps: 2000}\n"
    with pytest.raises(RecipeError) as caught:
        _load(text)
    assert [path for path, _ in caught.value.problems] == ["pretrain.warmup_steps", "data.sources[0].name"]


def test_missing_recipe_file(workdir):
    with pytest.raises(RecipeError, match=r"(?s)nope\.yaml.*recipe file not found"):
        load_recipe("nope.yaml")


def test_output_dir_that_is_a_file(workdir):
    Path("out").write_text("not a folder")
    with pytest.raises(RecipeError, match="output_dir: .* is a file"):
        _load(MINIMAL)


# --------------------------------------------------------------------------------------- section_hash


def test_section_hash_tracks_relevant_fields_only(workdir):
    base = _load(MINIMAL)
    assert section_hash(base, "model") == section_hash(_load(MINIMAL), "model")  # stable across loads
    assert section_hash(base, "model") != section_hash(_load(MINIMAL + "model: {hidden_size: 128}\n"), "model")
    assert section_hash(base, "model") == section_hash(_load(MINIMAL + "pretrain: {learning_rate: 1e-3}\n"), "model")
    # Logging cadence and trackers cannot change the trained weights: no rerun for them.
    chatty = _load(MINIMAL + "pretrain: {log_every: 1, eval_every: 5, trackers: [jsonl, tensorboard]}\n")
    assert section_hash(base, "pretrain") == section_hash(chatty, "pretrain")
    assert section_hash(base, "pretrain") != section_hash(_load(MINIMAL + "pretrain: {max_steps: 500}\n"), "pretrain")
    # max_time is hashed once set (a budget changes the model), and leaves the hashes of runs without it as they were.
    assert section_hash(base, "pretrain") != section_hash(_load(MINIMAL + "pretrain: {max_time: 300}\n"), "pretrain")
    # The tokenizer trains on data.sources by default, so its hash follows them.
    other_data = _load("output_dir: out\ndata: {sources: [{name: icd10cm}]}\n")
    assert section_hash(base, "tokenizer") != section_hash(other_data, "tokenizer")
    # Several sections: order-independent, and different from each one alone.
    assert section_hash(base, "model", "tokenizer") == section_hash(base, "tokenizer", "model")
    assert section_hash(base, "model", "seed") != section_hash(base, "model")
    assert section_hash(base, "finetune.lora") != section_hash(_load(MINIMAL + "finetune: {lora: {r: 4}}\n"), "finetune.lora")
    with pytest.raises(ValueError, match="Did you mean 'tokenizer'"):
        section_hash(base, "tokeniser")


# --------------------------------------------------------------------------------------- stage switches


def test_runs_is_the_one_answer_to_is_this_stage_on(workdir):
    recipe = _load(MINIMAL)
    assert isinstance(recipe.pretrain, PretrainSection) and not hasattr(recipe.finetune.train, "enabled")
    assert [recipe.runs(stage) for stage in ("tokenizer", "pretrain", "finetune", "evaluate", "hub")] == [True] * 4 + [False]
    off = _load(MINIMAL + "model: {path: gpt2}\npretrain: {enabled: false}\nfinetune: {enabled: false}\n"
                "evaluate: {enabled: false}\nhub: {push: true, repo_id: someone/model}\n")
    assert [off.runs(stage) for stage in ("tokenizer", "pretrain", "finetune", "evaluate", "hub")] == [True] * 1 + [False] * 3 + [True]
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        recipe.runs("train")


def test_disabled_finetune_skips_its_checks_and_defaults(workdir):
    """finetune.enabled: false is enough: no flash-attention precision check for its loop (its data section is
    still filled, as evaluation and the hub read it)."""
    recipe = _load(MINIMAL + "model: {attn_implementation: flash_attention_2}\npretrain: {mixed_precision: bf16}\n"
                   "finetune: {enabled: false}\n")
    assert recipe.finetune.data == recipe.data
    with pytest.raises(RecipeError, match=r"finetune\.train\.mixed_precision: is 'no' but flash_attention_2"):
        _load(MINIMAL + "model: {attn_implementation: flash_attention_2}\npretrain: {mixed_precision: bf16}\n")


# --------------------------------------------------------------------------------------- JSON schema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "recipes" / "recipe.schema.json"
SHIPPED = sorted(SCHEMA_FILE.parent.glob("*.yaml"))
REGENERATE = (
    'python -c "import json; from pipeline.recipe import recipe_json_schema; '
    'print(json.dumps(recipe_json_schema(), indent=2))" > recipes/recipe.schema.json'
)


def _documented_keys(schema: dict[str, Any]) -> dict[str, dict[str, str]]:
    """What the recipe code decides, whatever pydantic's layout: each section's keys and their documentation."""
    sections = [("Recipe", schema), *schema["$defs"].items()]
    return {name: {key: prop.get("description") for key, prop in section["properties"].items()} for name, section in sections}


def test_committed_json_schema_is_current():
    committed, current = json.loads(SCHEMA_FILE.read_text(encoding="utf-8")), recipe_json_schema()
    stale = f"recipes/recipe.schema.json is out of date with pipeline/recipe/schema.py. Regenerate it:\n  {REGENERATE}"
    assert _documented_keys(committed) == _documented_keys(current), stale
    if committed["$comment"] == current["$comment"]:  # written by this pydantic version: byte for byte
        assert committed == current, stale


def test_json_schema_documents_and_closes_every_section():
    schema = recipe_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["title"]
    for name, section in [("Recipe", schema), *schema["$defs"].items()]:
        assert section["additionalProperties"] is False, name  # an unknown key is an error in editors too
        for key, prop in section["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no docstring"
    learning_rate = schema["$defs"]["TrainSection"]["properties"]["learning_rate"]
    assert learning_rate["description"] == "Peak learning rate (AdamW)." and learning_rate["exclusiveMinimum"] == 0
    assert "enabled" not in schema["$defs"]["TrainSection"]["properties"]
    assert "enabled" in schema["$defs"]["PretrainSection"]["properties"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_point_at_and_satisfy_the_json_schema(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# yaml-language-server: $schema=recipe.schema.json\n")
    jsonschema.Draft202012Validator(recipe_json_schema()).validate(yaml12.load(text))


def test_json_schema_rejects_an_unknown_key():
    validator = jsonschema.Draft202012Validator(recipe_json_schema())
    valid = yaml12.load(MINIMAL)
    validator.validate(valid)
    for bad in ({**valid, "pretrian": {}}, {**valid, "pretrain": {"lerning_rate": 1e-3}},
                {**valid, "finetune": {"train": {"enabled": False}}}):
        with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
            validator.validate(bad)


def test_pipeline_schema_prints_the_published_schema(capsys):
    from pipeline.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == recipe_json_schema()


def test_an_unknown_key_does_not_hide_its_sections_own_rules(workdir):
    """Every problem in one run: a typo'd key and a rule between two fields of the same section are both reported,
    but a rule is not judged on a default that stands in for a rejected value."""
    with pytest.raises(RecipeError) as caught:
        _load(MINIMAL + "pretrain: {max_steps: 10, warmup_steps: 50, lerning_rate: 1e-3}\n"
              "model: {hidden_size: 30, num_attention_heads: 4, bogus: 1}\n")
    keys = [key for key, _ in caught.value.problems]
    assert sorted(keys) == ["model.bogus", "model.num_attention_heads", "pretrain.lerning_rate", "pretrain.warmup_steps"]
    with pytest.raises(RecipeError) as caught:
        _load(MINIMAL + "pretrain: {max_steps: 0, warmup_steps: 1500}\n")
    assert [key for key, _ in caught.value.problems] == ["pretrain.max_steps"]  # not "1500 exceeds the default 1000"
