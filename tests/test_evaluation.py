"""The evaluation stage: hand-checked language-model numbers (one definition with the training loop's validation,
`pipeline.scoring`), and the whole stage on a tiny finished run (base folder + a random LoRA adapter, so tuned
differs from base). Prompting and decoding: test_generation_prompts.py; the report's files: test_report.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import pipeline.models.quill  # noqa: F401  (registers Quill with the Auto classes)
from pipeline import evaluation
from pipeline.data import load_corpus, token_byte_lengths
from pipeline.loading import load_base
from pipeline.metrics import load_metric
from pipeline.models.quill import QuillForCausalLM
from pipeline.recipe import recipe_from_dict
from pipeline.scoring import TEXT, document_loader, language_model_metrics
from pipeline.training import seed_everything
from tiny import fitted_quill, make_rows, rows_quill, rows_tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    return rows_tokenizer()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [row["text"] for row in make_rows(12)]


@pytest.fixture(scope="module")
def trained(tokenizer, texts) -> QuillForCausalLM:
    return fitted_quill(tokenizer, texts)


# ------------------------------------------------------------------------------------------ language modelling


def hand_nll(model, tokenizer, text: str, block_size: int) -> tuple[float, int, float]:
    """Σ NLL and number of targets of one document (windows of block_size tokens, each target predicted once), and
    Σ NLL of the text's own targets: all but the closing EOS, which stands for no byte of the text."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    sequence = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    total, count, text_total = 0.0, 0, 0.0
    for start in range(0, len(sequence) - 1, block_size - 1):
        window = torch.tensor(sequence[start : start + block_size])
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0]
        nll = F.cross_entropy(logits[:-1].double(), window[1:], reduction="none")
        total += nll.sum().item()
        count += len(window) - 1
        text_total += sum(value for j, value in enumerate(nll.tolist()) if start + 1 + j <= len(ids))  # not the EOS
    return total, count, text_total


def test_language_model_metrics_equal_a_hand_computation(trained, tokenizer, texts) -> None:
    block_size = 16  # shorter than most documents: they are scored in several windows
    nll, count, text_nll = map(sum, zip(*(hand_nll(trained, tokenizer, t, block_size) for t in texts)))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    metrics = language_model_metrics(trained, tokenizer, texts, block_size=block_size, batch_size=3,
                                     accelerator=Accelerator(cpu=True))
    assert metrics["tokens"] == count == sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts)
    assert metrics["documents"] == len(texts) and metrics["bytes"] == n_bytes
    # Loss and perplexity are per target token, the closing EOS included (the model must learn to stop) ...
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # ... bits per byte is the text's tokens' NLL in bits over the text's bytes, without the EOS.
    assert metrics["bits_per_byte"] == pytest.approx(text_nll / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["bits_per_byte"] != pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-3)
    # The window size changes the context, not what is scored.
    wide = language_model_metrics(trained, tokenizer, texts, block_size=128, batch_size=4,
                                  accelerator=Accelerator(cpu=True), max_documents=5)
    assert wide["documents"] == 5 and wide["bytes"] == sum(len(texts[i * 12 // 5].encode()) for i in range(5))


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary(tokenizer, texts) -> None:
    model = rows_quill(tokenizer)
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: every logit is 0, every token has probability 1/V
    metrics = language_model_metrics(model, tokenizer, texts, block_size=32, batch_size=4,
                                     accelerator=Accelerator(cpu=True))
    vocab = len(tokenizer)
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-6)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    text_targets = metrics["tokens"] - len(texts)  # all but each document's closing EOS
    assert metrics["bits_per_byte"] == pytest.approx(text_targets * math.log2(vocab) / n_bytes, rel=1e-6)


def test_a_model_trained_on_the_texts_has_lower_perplexity_than_an_untrained_one(trained, tokenizer, texts) -> None:
    settings = dict(block_size=64, batch_size=4, accelerator=Accelerator(cpu=True))
    fitted = language_model_metrics(trained, tokenizer, texts, **settings)
    untrained = language_model_metrics(rows_quill(tokenizer), tokenizer, texts, **settings)
    assert fitted["perplexity"] < 0.5 * untrained["perplexity"]
    assert fitted["bits_per_byte"] < untrained["bits_per_byte"]


def test_the_training_loops_validation_scores_the_same_windows_identically(trained, tokenizer, texts) -> None:
    """One definition (`pipeline.scoring`): `evaluate_lm` on the stage's own windows, without their text column (so
    bits per byte counts the targets with token byte lengths > 0, over those bytes), gives the very same floats."""
    from pipeline.training import evaluate_lm

    metrics = language_model_metrics(trained, tokenizer, texts, block_size=16, batch_size=3,
                                      accelerator=Accelerator(cpu=True))
    windows = document_loader(tokenizer, texts, block_size=16, batch_size=3)
    blocks = [{name: value for name, value in batch.items() if name != TEXT} for batch in windows]
    validation = evaluate_lm(trained, blocks, Accelerator(cpu=True), token_byte_lengths(tokenizer))
    trained.eval()  # evaluate_lm hands the model back in training mode
    assert validation == {"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"],
                          "eval_tokens": metrics["tokens"], "eval_bits_per_byte": metrics["bits_per_byte"]}


# ------------------------------------------------------------------------------------------ the whole stage


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer) -> dict:
    """A tiny run as the earlier stages leave it: pretrain/ (model + tokenizer) and data files."""
    root = tmp_path_factory.mktemp("run")
    rows = make_rows()
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = rows_quill(tokenizer)
    base.save_pretrained(root / "out" / "pretrain")
    tokenizer.save_pretrained(root / "out" / "pretrain")
    return {"root": root, "data": data, "base": root / "out" / "pretrain"}


def tiny_recipe(run: dict, **evaluate) -> object:
    return recipe_from_dict({
        "output_dir": str(run["root"] / "out"),
        "seed": 3,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128},
        "data": {"sources": [{"name": str(run["data"])}], "validation_fraction": 0.15, "block_size": 64},
        "finetune": {"task": evaluate.pop("task", "instruction"), **evaluate.pop("finetune", {})},
        "evaluate": {"max_documents": 5, "batch_size": 4, **evaluate},
    })


def save_adapter(model, folder: Path, tokenizer, task_type: str) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type=task_type)
    get_peft_model(model, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_stage_writes_every_artefact_and_compares_base_with_tuned(finished_run, tokenizer) -> None:
    adapter = finished_run["root"] / "out" / "finetune" / "adapter"
    torch.manual_seed(1)
    save_adapter(load_base(finished_run["base"], "causal_lm", None, tokenizer), adapter, tokenizer, "CAUSAL_LM")
    recipe = tiny_recipe(finished_run, few_shot=2, generation={"prompts": ["A01 Acute", "Notes:"], "max_new_tokens": 6},
                         finetune={"prompt_template": "Code {code} means: ", "label_column": "title"})
    report = evaluation.run(recipe, Accelerator(cpu=True))

    folder = recipe.output_dir / "eval"
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(report))
    assert {p.name for p in folder.glob("*.png")} == {"perplexity.png", "bits_per_byte.png", "task_generation.png"}
    assert set(report) == {"general", "domain", "tasks", "samples", "settings"}
    assert report["tasks"].keys() == {"generation"}  # implied by finetune.task: instruction

    # The general set is the validation split pretraining held out; base numbers are the base model's on it.
    held_out = load_corpus([str(finished_run["data"])], seed=3, validation_fraction=0.15)[1]
    base = load_base(finished_run["base"], "causal_lm", None, tokenizer)
    expected = language_model_metrics(base, tokenizer, held_out, block_size=64, batch_size=4,
                                      accelerator=Accelerator(cpu=True), max_documents=5)
    assert report["general"]["base"] == pytest.approx(expected, rel=1e-6)
    tuned = PeftModel.from_pretrained(base, adapter)
    expected_tuned = language_model_metrics(tuned, tokenizer, held_out, block_size=64, batch_size=4,
                                            accelerator=Accelerator(cpu=True), max_documents=5)
    assert report["general"]["tuned"] == pytest.approx(expected_tuned, rel=1e-6)
    assert report["general"]["tuned"]["perplexity"] != pytest.approx(report["general"]["base"]["perplexity"], rel=1e-3)
    general = report["general"]
    assert general["change"]["perplexity"] == pytest.approx(
        general["tuned"]["perplexity"] / general["base"]["perplexity"] - 1)

    # Generation: 2-shot prompts, scores that follow from the predictions shown.
    generation = report["tasks"]["generation"]
    assert generation["rows"] == 5 and len(generation["preview"]) == 5
    for row in generation["preview"]:
        assert row["prompt"].count("\n\n") == 2 and row["prompt"].endswith(" means:")  # the space comes with the answer
    for model in ("base", "tuned"):
        predictions = [row[model] for row in generation["preview"]]
        references = [row["reference"] for row in generation["preview"]]
        exact = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
        assert generation[model]["exact_match"] == pytest.approx(exact)

    assert [s["prompt"] for s in report["samples"]] == ["A01 Acute", "Notes:"]
    assert all(len(s["base"]) == 1 and len(s["tuned"]) == 1 for s in report["samples"])
    # Beside the recipe's greedy decoding, one seeded sample of each model: what its distribution holds.
    assert all(s["decoding"] == "greedy" and s["sampled"]["decoding"] == "sampled, temperature 0.8, top-k 50"
               and len(s["sampled"]["base"]) == len(s["sampled"]["tuned"]) == 1 for s in report["samples"])
    markdown = (folder / "report.md").read_text()
    sample = report["samples"][0]
    assert f"**tuned** (sampled, temperature 0.8, top-k 50)\n\n```text\n{sample['prompt']}{sample['sampled']['tuned'][0]}" \
        in markdown and "**base** (greedy)" in markdown
    assert "change (relative)" in markdown and "General perplexity" in markdown
    assert report["settings"]["tuned_model"] == str(adapter)


def test_the_stage_of_a_classifier_compares_the_fresh_head_with_the_tuned_one(
    finished_run, tokenizer, tmp_path
) -> None:
    run = {**finished_run, "root": tmp_path}
    base_folder = tmp_path / "out" / "pretrain"
    rows_quill(tokenizer).save_pretrained(base_folder)
    tokenizer.save_pretrained(base_folder)
    adapter = tmp_path / "out" / "finetune" / "adapter"
    torch.manual_seed(5)
    classifier = load_base(base_folder, "classification", 3, tokenizer)
    save_adapter(classifier, adapter, tokenizer, "SEQ_CLS")
    general_file = tmp_path / "general.txt"  # a dedicated general set: all of it is used (up to max_documents)
    general_file.write_text("\n\n".join(" ".join(reversed(row["text"].split())) for row in make_rows(8)))
    # 'classification' is implied by the fine-tuning task; perplexity shows what the adapter did to the body.
    recipe = tiny_recipe(run, task="classification", tasks=["perplexity"], finetune={"label_column": "label"},
                         general=[{"name": str(general_file)}])
    report = evaluation.run(recipe, Accelerator(cpu=True))

    rows = load_corpus([str(run["data"])], seed=3, validation_fraction=0.15)[1]
    rows = rows.select([i * len(rows) // 5 for i in range(5)]) if len(rows) > 5 else rows

    def accuracy(model) -> float:
        encoded = tokenizer(list(rows["text"]), truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            predictions = model.eval()(**encoded).logits.argmax(-1)
        return (predictions == torch.tensor(list(rows["label"]))).double().mean().item()

    seed_everything(3)  # the recipe's seed: the base is the head fine-tuning started from
    fresh = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=3,
                                                               pad_token_id=tokenizer.pad_token_id)
    entry = report["tasks"]["classification"]
    assert entry["num_labels"] == 3 and entry["rows"] == len(rows)
    assert entry["base"]["accuracy"] == pytest.approx(accuracy(fresh))
    tuned = PeftModel.from_pretrained(load_base(base_folder, "classification", 3, tokenizer), adapter)
    assert entry["tuned"]["accuracy"] == pytest.approx(accuracy(tuned))
    assert set(entry["tuned"]) == {"accuracy", "f1"}
    general, domain = report["general"], report["domain"]
    assert general["base"]["documents"] == 5 and report["settings"]["general_set"].startswith("evaluate sources")
    assert general["tuned"]["perplexity"] != pytest.approx(general["base"]["perplexity"], rel=1e-3)
    causal_lm = PeftModel.from_pretrained(load_base(base_folder, "causal_lm", None, tokenizer), adapter)
    expected = language_model_metrics(causal_lm, tokenizer, rows, block_size=64, batch_size=4,
                                      accelerator=Accelerator(cpu=True))
    assert domain["tuned"] == pytest.approx(expected)
    paragraphs = general_file.read_text().split("\n\n")
    expected = language_model_metrics(causal_lm, tokenizer, [paragraphs[i * 8 // 5] for i in range(5)], block_size=64,
                                      batch_size=4, accelerator=Accelerator(cpu=True))
    assert general["tuned"] == pytest.approx(expected)
    assert (recipe.output_dir / "eval" / "task_classification.png").is_file()


def test_missing_or_mismatched_inputs_fail_before_any_compute(finished_run, tmp_path) -> None:
    run = {**finished_run, "root": tmp_path}
    (tmp_path / "out" / "pretrain").mkdir(parents=True)
    (tmp_path / "out" / "pretrain" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="run the finetune stage first"):
        evaluation.run(tiny_recipe(run, task="causal_lm"), Accelerator(cpu=True))
    with pytest.raises(ValueError, match="finetune.task: instruction"):
        evaluation.run(tiny_recipe(run, task="causal_lm", tasks=["perplexity", "generation"]), Accelerator(cpu=True))
    assert not (tmp_path / "out" / "eval").exists()
