"""The LoRA fine-tuning stage: only the adapter trains, adapter and merged model round-trip with identical logits,
instruction prompts are masked out of the loss, classification heads are saved, bad bases and targets fail early."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.data import IGNORE_INDEX, collate
from pipeline import finetune as finetune_stage
from pipeline.examples import classification_examples, instruction_examples
from pipeline.finetune import lora_config
from pipeline.loading import load_base
from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.recipe import LoraSection, dump_recipe, load_recipe, recipe_from_dict
from pipeline.tokenizer import train_tokenizer
from pipeline.training import build_accelerator

WORDS = ["cholera", "typhoid", "fever", "acute", "chronic", "infection", "of", "the", "lung", "heart", "kidney",
         "with", "without", "complication", "unspecified", "disorder", "due", "to", "virus", "bacteria"]
TEMPLATE = "ICD-10-CM code {code} means: "


def rows(n: int = 64) -> list[dict]:
    """ICD-10-CM-like rows: text, code, title and a 3-way chapter id."""
    out = []
    for i in range(n):
        title = " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 2 + i % 4))
        code = f"{'ABC'[i % 3]}{i:02d}"
        out.append({"text": f"{code} {title}", "code": code, "title": title, "chapter_id": i % 3})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_quill) -> Path:
    """A tiny Quill and its tokenizer saved together, as the pretrain stage leaves them."""
    folder = tmp_path_factory.mktemp("base")
    texts = [r["text"] for r in rows()] + [TEMPLATE.format(code=r["code"]) for r in rows()]
    tokenizer = train_tokenizer(texts * 4, vocab_size=300)
    tiny_quill(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "icd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


def make_recipe(tmp_path: Path, base: Path | None, data_file: Path, **finetune):
    train = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0, "weight_decay": 0.0,
             "eval_every": 2, "log_every": 1, "save_every": 100, "resume": "never", **finetune.pop("train", {})}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, **finetune.pop("lora", {})}
    section = {"data": {"sources": [{"name": str(data_file)}], "block_size": 32, "validation_fraction": 0.1},
               "lora": lora, "train": train, **finetune}
    if base is not None:
        section["base"] = str(base)
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "data": {"sources": [{"name": str(data_file)}]},
                             "finetune": section})


def finetune(recipe):
    accelerator = build_accelerator(recipe.finetune.train, recipe.output_dir / "finetune")
    return accelerator, finetune_stage.run(recipe, accelerator)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def base_name(peft_name: str) -> str:
    """A PEFT model's parameter name as it is in the base checkpoint."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def assert_base_untouched(peft_model, base_dir: Path) -> None:
    base = load_file(base_dir / "model.safetensors")
    trained = {base_name(k): v for k, v in peft_model.state_dict().items()
               if "lora_" not in k and "modules_to_save" not in k}
    shared = base.keys() & trained.keys()
    assert shared == base.keys(), base.keys() - trained.keys()  # every base tensor was compared
    changed = [k for k in shared if not torch.equal(base[k], trained[k].cpu())]
    assert changed == []


# ---------------------------------------------------------------------------------------------- causal LM
def test_lora_trains_only_the_adapter_and_adapter_and_merged_model_round_trip(tmp_path, base_dir, data_file,
                                                                             capsys) -> None:
    recipe = make_recipe(tmp_path, base_dir, data_file, merge=True)
    accelerator, result = finetune(recipe)
    out = recipe.output_dir / "finetune"
    peft_model = accelerator.unwrap_model(result.model)

    assert_base_untouched(peft_model, base_dir)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(adapter[k].abs().sum() > 0 for k in lora_b)  # lora_B starts at zero: every adapter trained
    assert all("lora_" in k for k in adapter)  # nothing but the adapter is saved

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_bits_per_byte" in r for r in records) and (out / "loss_curve.png").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert_names_base_portably(config["base_model_name_or_path"], base_dir)
    card = (out / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card  # not PEFT's template
    assert not re.search(rf"(?<!\.\.){re.escape(str(tmp_path))}", card)  # only relative paths (../../tmp/...)
    assert f"LoRA adapter for `{config['base_model_name_or_path']}`" in card and "for 4 optimizer steps" in card
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert f"{trainable:,} of {total:,}" in card
    evaluations = [r for r in records if "eval_loss" in r]
    assert f"loss {evaluations[-1]['eval_loss']:.4f}" in card
    printed = capsys.readouterr().out  # every validation reaches the terminal, not only metrics.jsonl
    for r in evaluations:
        assert (f"step {r['step']}: validation loss {r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.2f}, "
                f"bits per byte {r['eval_bits_per_byte']:.4f}") in printed

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = logits_of(peft_model, ids)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert not torch.allclose(logits_of(base, ids), expected, atol=1e-4)  # the adapter does change the model
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(logits_of(reloaded, ids), expected, rtol=0, atol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    torch.testing.assert_close(logits_of(auto, ids), expected, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.float32 and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)
    for folder in ("adapter", "merged"):
        assert len(AutoTokenizer.from_pretrained(out / folder)) == len(AutoTokenizer.from_pretrained(base_dir))


def test_missing_base_fails_before_training(tmp_path, data_file) -> None:
    recipe = make_recipe(tmp_path, None, data_file)  # default base: output_dir/pretrain, never built
    with pytest.raises(FileNotFoundError, match=r"pretrain.*Fix: run pretraining first"):
        finetune(recipe)
    empty = tmp_path / "empty-base"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        finetune(make_recipe(tmp_path, empty, data_file))
    assert not (recipe.output_dir / "finetune" / "metrics.jsonl").exists()


def test_default_base_is_the_pretrain_folder(tmp_path, base_dir, data_file) -> None:
    recipe = make_recipe(tmp_path, None, data_file, train={"max_steps": 1})
    shutil.copytree(base_dir, recipe.output_dir / "pretrain")
    finetune(recipe)
    config = json.loads((recipe.output_dir / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert_names_base_portably(config["base_model_name_or_path"], recipe.output_dir / "pretrain")


def assert_names_base_portably(named: str, base: Path) -> None:
    """A relative path, from the working directory (where AutoPeftModel resolves it), to the base it was trained on."""
    assert not Path(named).is_absolute(), named
    assert (Path.cwd() / named).resolve() == base.resolve()


def test_target_modules_that_match_nothing_fail_with_the_layer_names(tmp_path, base_dir, data_file) -> None:
    recipe = make_recipe(tmp_path, base_dir, data_file, lora={"target_modules": ["q_proj", "query"]})
    with pytest.raises(ValueError, match=r"\['query'\] match no module.*'down_proj'.*'q_proj'"):
        finetune(recipe)
    assert not (recipe.output_dir / "finetune" / "metrics.jsonl").exists()


def test_lora_config_carries_the_recipe_switches() -> None:
    section = LoraSection(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                          use_dora=True, modules_to_save=["lm_head"])
    config = lora_config(section, "causal_lm")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.modules_to_save == ["lm_head"]
    assert config.use_rslora and config.use_dora and config.task_type == "CAUSAL_LM"
    assert lora_config(LoraSection(), "classification").task_type == "SEQ_CLS"
    assert lora_config(LoraSection(target_modules=["all-linear"]), "instruction").target_modules == "all-linear"
    plain = lora_config(LoraSection(r=4, alpha=8), "causal_lm")
    assert not plain.use_rslora and not plain.use_dora

    # rsLoRA scales by alpha / sqrt(r), plain LoRA by alpha / r
    torch.manual_seed(0)
    tiny = QuillForCausalLM(QuillConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))
    rs = get_peft_model(tiny, lora_config(LoraSection(r=4, alpha=8, use_rslora=True), "causal_lm"))
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        lora_config(LoraSection(), "summarize")


# ---------------------------------------------------------------------------------------------- instruction
def test_instruction_examples_mask_the_prompt_and_train_response_and_eos(base_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = Dataset.from_list(rows(6))
    examples = instruction_examples(data, tokenizer, prompt_template=TEMPLATE, response_column="title", max_length=64)
    assert len(examples) == 6
    assert TEMPLATE.endswith(" ")
    for row, example in zip(data, examples):
        # The template's trailing space is encoded with the response, as in running text: " Cholera", not " ", "Cholera".
        prompt = tokenizer(TEMPLATE.format(**row).rstrip(), add_special_tokens=False)["input_ids"]
        response = tokenizer(" " + row["title"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(prompt + response[:-1]) == TEMPLATE.format(**row) + row["title"]
        assert tokenizer(TEMPLATE.format(**row), add_special_tokens=False)["input_ids"] != prompt  # a lone " " token
        assert response[:-1] == tokenizer(TEMPLATE.format(**row) + row["title"], add_special_tokens=False)[
            "input_ids"][len(prompt):]  # the very tokens of the whole text
        n_prompt = 1 + len(prompt)
        assert example["input_ids"] == [tokenizer.bos_token_id] + prompt + response  # exactly one BOS
        assert example["input_ids"].count(tokenizer.bos_token_id) == 1
        assert example["labels"] == [IGNORE_INDEX] * n_prompt + response
    # Cached on disk under a fingerprint of data, tokenizer and settings: a rerun reads it, a new template does not.
    again = instruction_examples(data, tokenizer, prompt_template=TEMPLATE, response_column="title", max_length=64)
    assert examples.cache_files and again.cache_files == examples.cache_files
    other = instruction_examples(data, tokenizer, prompt_template="{code}: ", response_column="title", max_length=64)
    assert other.cache_files != examples.cache_files and other["input_ids"] != examples["input_ids"]

    # The model's loss is the cross-entropy over response tokens only, padding included in the batch.
    batch = collate(list(examples), pad_token_id=tokenizer.pad_token_id)
    assert "attention_mask" in batch  # rows of different lengths were padded
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for i, (row, example) in enumerate(zip(data, examples)):
        n_prompt = 1 + len(tokenizer(TEMPLATE.format(**row).rstrip(), add_special_tokens=False)["input_ids"])
        for t in range(n_prompt, len(example["input_ids"])):  # token t is predicted at position t - 1
            terms.append(-torch.log_softmax(logits[i, t - 1], -1)[example["input_ids"][t]])
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    # Cut to max_length: responses are truncated, and a prompt that leaves no room for a response drops its row.
    long_row = {**rows(1)[0], "code": "A00 with a much longer code than the others"}
    long_prompt = Dataset.from_list([long_row, *rows(6)[1:]])
    full = instruction_examples(long_prompt, tokenizer, prompt_template=TEMPLATE, response_column="title",
                                max_length=64)
    n_prompts = [labels.index(next(t for t in labels if t != IGNORE_INDEX)) for labels in full["labels"]]
    max_length = min(n_prompts) + 2
    short = instruction_examples(long_prompt, tokenizer, prompt_template=TEMPLATE, response_column="title",
                                 max_length=max_length)
    kept = [example for example, n in zip(full, n_prompts) if n < max_length]
    assert 0 < len(kept) < len(full)  # the long prompt's row is gone
    assert short["input_ids"] == [example["input_ids"][:max_length] for example in kept]
    assert short["labels"] == [example["labels"][:max_length] for example in kept]


def test_instruction_examples_from_the_chat_template_train_only_the_assistant_turn(base_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = Dataset.from_list(rows(4))
    examples = instruction_examples(data, tokenizer, prompt_template=None, response_column="title", max_length=64)
    for row, example in zip(data, examples):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == row["title"] + tokenizer.eos_token
        first = labels.index(trained[0])
        assert labels[first:] == ids[first:]  # the reply is the end of the example, all of it trained
        prompt = tokenizer.decode(ids[:first])
        assert prompt.endswith("<|assistant|>\n") and row["text"] in prompt

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        instruction_examples(data, tokenizer, prompt_template=None, response_column="title", max_length=64)
    with pytest.raises(ValueError, match=r"fields \['chapter'\]"):
        instruction_examples(data, tokenizer, prompt_template="{chapter}:", response_column="title", max_length=64)


def test_instruction_stage_with_dora_and_checkpointing_trains_and_logs_validation_loss(tmp_path, base_dir,
                                                                                       data_file) -> None:
    recipe = make_recipe(tmp_path, base_dir, data_file, task="instruction", prompt_template=TEMPLATE,
                         label_column="title", lora={"use_dora": True},
                         train={"max_steps": 2, "gradient_checkpointing": True})
    accelerator, result = finetune(recipe)
    out = recipe.output_dir / "finetune" / "adapter"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 14 and all(adapter[k].abs().sum() > 0 for k in lora_b)  # gradients reach every adapter
    assert any("lora_magnitude_vector" in k for k in adapter)  # DoRA's magnitudes are saved too
    assert set(result.final_eval) >= {"eval_loss", "eval_perplexity"} and result.final_eval["eval_tokens"] > 0
    assert_base_untouched(accelerator.unwrap_model(result.model), base_dir)


# ---------------------------------------------------------------------------------------------- classification
def test_classification_trains_and_saves_the_head(tmp_path, base_dir, data_file) -> None:
    recipe = make_recipe(tmp_path, base_dir, data_file, task="classification", label_column="chapter_id", merge=True,
                         train={"gradient_checkpointing": True})  # reaches the model through the loss wrapper
    accelerator, result = finetune(recipe)
    out = recipe.output_dir / "finetune"
    peft_model = accelerator.unwrap_model(result.model).model
    assert_base_untouched(peft_model, base_dir)

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    head = [k for k in adapter if k.endswith("score.weight")]
    assert head and adapter[head[0]].shape == (3, 32)  # num_labels read from the data: max label + 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    fresh_head = peft_model.base_model.model.score.original_module.weight
    assert not torch.equal(adapter[head[0]], fresh_head.detach())  # the head trained (the original is frozen)

    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = torch.tensor([tokenizer("A07 acute fever")["input_ids"]])
    expected = logits_of(peft_model, ids)
    reloaded = PeftModel.from_pretrained(load_base(base_dir, "classification", 3, tokenizer), out / "adapter")
    torch.testing.assert_close(logits_of(reloaded, ids), expected, rtol=0, atol=0)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.num_labels == 3 and merged.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)


def classification_run(tmp_path: Path, base_dir: Path, data_file: Path, batch: int, window: int = 1):
    return make_recipe(tmp_path / f"batch{batch}x{window}", base_dir, data_file, task="classification",
                       label_column="chapter_id",
                       train={"batch_size": batch, "gradient_accumulation_steps": window, "max_steps": 3})


def logged_losses_and_adapter(recipe) -> tuple[list[float], dict[str, torch.Tensor]]:
    out = recipe.output_dir / "finetune"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in logged if "loss" in r], load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_run(run, reference) -> None:
    (losses, weights), (expected_losses, expected_weights) = run, reference
    assert len(expected_losses) == 3 and losses == pytest.approx(expected_losses, rel=1e-5)
    assert weights.keys() == expected_weights.keys()
    for key, value in expected_weights.items():
        # atol 1e-5: Adam turns float noise in a near-zero gradient into ~1e-6 on its element (seen: 1.8e-6 in one
        # of 3,000); ranks weighted wrongly change the logged losses above and the weights far beyond that.
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_classification_loss_accumulates_like_a_full_batch(tmp_path, base_dir, data_file) -> None:
    """Heads return a per-micro-batch mean; the stage rescales it so 2 accumulated micro-batches of 2 train exactly
    like one batch of 4 (a mean per micro-batch would double the loss and the gradient)."""
    runs = []
    for batch, window in ((4, 1), (2, 2)):
        recipe = classification_run(tmp_path, base_dir, data_file, batch, window)
        finetune(recipe)
        runs.append(logged_losses_and_adapter(recipe))
    assert_same_run(runs[1], runs[0])


@pytest.mark.slow  # two fresh interpreters under accelerate launch
def test_two_cpu_ranks_fine_tune_like_one_process_with_the_same_global_batch(tmp_path, base_dir, data_file) -> None:
    single = classification_run(tmp_path, base_dir, data_file, batch=4)
    finetune(single)
    ranks = classification_run(tmp_path / "ranks", base_dir, data_file, batch=2)
    dump_recipe(ranks, tmp_path / "ranks.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    launched = subprocess.run([*launcher, __file__, str(tmp_path / "ranks.yaml")], capture_output=True, text=True,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "processes: 2" in launched.stdout  # a real two-rank world (the script also insists on it)
    assert_same_run(logged_losses_and_adapter(ranks), logged_losses_and_adapter(single))


def test_classification_examples_keep_one_integer_label_per_text(base_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    data = Dataset.from_dict({"text": ["A00 cholera", "B01 acute fever of the lung"], "label": [1, 0]},
                             features=features)
    examples = classification_examples(data, tokenizer, label_column="label", max_length=4)
    assert examples["labels"] == [1, 0]
    assert examples["input_ids"][0] == tokenizer("A00 cholera")["input_ids"][:4]
    words = Dataset.from_dict({"text": ["x"], "label": ["flu"]})
    with pytest.raises(ValueError, match="integer class ids"):
        classification_examples(words, tokenizer, label_column="label", max_length=8)


if __name__ == "__main__":  # launched by accelerate on two CPU ranks: fine-tune the recipe file given
    import pipeline.models.quill  # noqa: F401  (registers Quill with the Auto classes)

    launched_recipe = load_recipe(sys.argv[1])
    accelerator = build_accelerator(launched_recipe.finetune.train, launched_recipe.output_dir / "finetune",
                                    expected_processes=2)
    finetune_stage.run(launched_recipe, accelerator)
