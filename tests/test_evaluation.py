"""The evaluation stage: hand-checked language-model numbers, generation and few-shot layout, the report, and the
whole stage on a tiny finished run (base folder + a random LoRA adapter, so tuned differs from base)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import pipeline  # noqa: F401  (registers Quill with the Auto classes)
from pipeline.data import collate, load_corpus
from pipeline.evaluation import (
    few_shot_prompt,
    generate_samples,
    generation_kwargs,
    language_model_metrics,
    run_evaluation,
    score_generations,
    write_report,
)
from pipeline.finetune import load_base
from pipeline.metrics import load_metric
from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.recipe import GenerationSection, recipe_from_dict
from pipeline.tokenizer import train_tokenizer
from pipeline.training import seed_everything

WORDS = ("acute chronic fever infection of the lung heart kidney bone with without mention due to other "
         "unspecified disease injury fracture left right upper lower limb").split()


def make_rows(n: int = 40) -> list[dict]:
    """ICD-like rows: a code, a title, a text that starts with both, and a class label."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))).capitalize()
        notes = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        rows.append({"code": f"A{i:02d}", "title": title, "text": f"A{i:02d} {title}\nNotes: {notes}", "label": i % 3})
    return rows


def tiny_quill(tokenizer, **overrides) -> QuillForCausalLM:
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return QuillForCausalLM(QuillConfig(**{**config, **overrides})).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([row["text"] for row in make_rows()], vocab_size=300)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [row["text"] for row in make_rows(12)]


@pytest.fixture(scope="module")
def trained(tokenizer, texts) -> QuillForCausalLM:
    """A Quill fitted for a few full-batch steps on `texts` (each document as [bos] + tokens + [eos])."""
    model = tiny_quill(tokenizer).train()
    documents = [{"input_ids": [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids,
                                tokenizer.eos_token_id][:96]} for t in texts]
    batch = collate(documents, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(15):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


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
    model = tiny_quill(tokenizer)
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
    untrained = language_model_metrics(tiny_quill(tokenizer), tokenizer, texts, **settings)
    assert fitted["perplexity"] < 0.5 * untrained["perplexity"]
    assert fitted["bits_per_byte"] < untrained["bits_per_byte"]


# ------------------------------------------------------------------------------------------ prompts and generation


def test_few_shot_prompt_puts_k_solved_examples_before_the_query() -> None:
    examples = [{"code": "A00", "title": "Cholera"}, {"code": "A01", "title": "Typhoid fever"},
                {"code": "A02", "title": "Other salmonella infections"}]
    query = {"code": "A03", "title": "Shigellosis"}
    template = "ICD-10-CM code {code} means: "
    prompt = few_shot_prompt(examples, query, template, 2, response_column="title")
    assert prompt == ("ICD-10-CM code A00 means: Cholera\n\nICD-10-CM code A01 means: Typhoid fever\n\n"
                      "ICD-10-CM code A03 means: ")
    assert few_shot_prompt(examples, query, template, 0, response_column="title") == "ICD-10-CM code A03 means: "
    with pytest.raises(ValueError, match="needs 4 solved examples"):
        few_shot_prompt(examples, query, template, 4, response_column="title")
    with pytest.raises(ValueError, match="'chapter'"):
        few_shot_prompt(examples, query, "{chapter}: ", 1, response_column="title")


def test_batched_greedy_generation_equals_generating_one_prompt_at_a_time(tokenizer) -> None:
    model = tiny_quill(tokenizer, initializer_range=0.3)  # large weights: context-dependent, tie-free argmaxes
    prompts = ["A01 Acute", "A17 Chronic fever of the", "Notes:", "A3"]  # different lengths: left padding
    gen = GenerationSection(max_new_tokens=8)
    samples = generate_samples(model, tokenizer, prompts, gen, batch_size=4)
    assert [s["prompt"] for s in samples] == prompts
    assert len({s["completions"][0] for s in samples}) == len(prompts)  # the prompts do steer the model
    for sample in samples:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(sample["prompt"], add_special_tokens=False).input_ids]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert sample["completions"] == [tokenizer.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)]


def test_a_prompt_longer_than_the_positions_keeps_its_end(tokenizer) -> None:
    model = tiny_quill(tokenizer, position_embedding_type="learned", max_position_embeddings=24, initializer_range=0.3)
    prompt = " ".join(WORDS)  # ~90 tokens: more than a learned table of 24 positions can embed
    [sample] = generate_samples(model, tokenizer, [prompt], GenerationSection(max_new_tokens=4))
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    kept = torch.tensor([[tokenizer.bos_token_id, *ids[-(24 - 4 - 1):]]])  # BOS + the last tokens, 20 in all
    alone = model.generate(input_ids=kept, attention_mask=torch.ones_like(kept), max_new_tokens=4, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert sample["completions"] == [tokenizer.decode(alone[0, kept.shape[1]:], skip_special_tokens=True)]


def test_prompts_get_exactly_one_bos_and_left_padding(tokenizer, monkeypatch) -> None:
    model = tiny_quill(tokenizer)
    seen = {}

    def capture(input_ids, attention_mask, **kwargs):
        seen.update(input_ids=input_ids, attention_mask=attention_mask)
        return input_ids

    monkeypatch.setattr(model, "generate", capture)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "A01"}], tokenize=False,
                                         add_generation_prompt=True)
    generate_samples(model, tokenizer, ["Notes: acute fever", chat], GenerationSection())
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    for ids, mask in zip(seen["input_ids"].tolist(), seen["attention_mask"].tolist()):
        real = [token for token, keep in zip(ids, mask) if keep]
        assert real[0] == bos and real.count(bos) == 1  # a rendered chat template already starts with BOS
        assert mask == sorted(mask) and all(token == pad for token, keep in zip(ids, mask) if not keep)  # left pads
    assert not bool(seen["attention_mask"].all())  # the prompts' lengths differ: one row is padded


def test_sampling_is_seeded_and_unset_top_k_means_no_top_k(trained, tokenizer) -> None:
    gen = GenerationSection(max_new_tokens=12, do_sample=True, temperature=1.5, num_return_sequences=3)
    first = generate_samples(trained, tokenizer, ["A01", "Notes: acute"], gen, seed=1)
    again = generate_samples(trained, tokenizer, ["A01", "Notes: acute"], gen, seed=1)
    other = generate_samples(trained, tokenizer, ["A01", "Notes: acute"], gen, seed=2)
    assert first == again and first != other
    assert all(len(s["completions"]) == 3 for s in first)
    # transformers fills a None top_k with 50: "unset" must reach generate as 0 (off) and top_p as 1.0.
    kwargs = generation_kwargs(gen, tokenizer)
    assert kwargs["top_k"] == 0 and kwargs["top_p"] == 1.0 and kwargs["temperature"] == 1.5
    assert "top_k" not in generation_kwargs(GenerationSection(), tokenizer)  # greedy: no sampling knobs


def test_generation_scores_come_from_the_completions(trained, tokenizer, monkeypatch) -> None:
    """A model whose completions we choose: generate_samples decodes only the new tokens, scoring cuts each at
    its first line break (a few-shot continuation) and compares it with the reference."""
    answers = {"A00 means: ": " Cholera", "A01 means: ": " Typhoid fever\n\nA02 means: Other",
               "A03 means: ": "Shig ellosis"}

    def fake_generate(input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            rows.append(torch.cat([ids, torch.tensor(tokenizer(answers[prompt], add_special_tokens=False).input_ids)]))
        width = max(len(row) for row in rows)
        return torch.stack([F.pad(row, (0, width - len(row)), value=tokenizer.pad_token_id) for row in rows])

    monkeypatch.setattr(trained, "generate", fake_generate)
    samples = generate_samples(trained, tokenizer, list(answers), GenerationSection(max_new_tokens=5))
    assert [s["completions"][0] for s in samples] == list(answers.values())
    references = ["Cholera", "Typhoid fever", "Shigellosis"]
    scores, predictions = score_generations([s["completions"][0] for s in samples], references)
    assert predictions == ["Cholera", "Typhoid fever", "Shig ellosis"]
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["rouge_l"] == pytest.approx((1 + 1 + 0) / 3)
    # A multi-line reference keeps lines: the cut moves to the first blank line.
    _, predictions = score_generations(["line one\nline two\n\nnext example"], ["line one\nline two"])
    assert predictions == ["line one\nline two"]


# ------------------------------------------------------------------------------------------ the report


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


# ------------------------------------------------------------------------------------------ the whole stage


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer) -> dict:
    """A tiny run as the earlier stages leave it: pretrain/ (model + tokenizer) and data files."""
    root = tmp_path_factory.mktemp("run")
    rows = make_rows()
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = tiny_quill(tokenizer)
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


def test_run_evaluation_writes_every_artefact_and_compares_base_with_tuned(finished_run, tokenizer) -> None:
    adapter = finished_run["root"] / "out" / "finetune" / "adapter"
    torch.manual_seed(1)
    save_adapter(load_base(finished_run["base"], "causal_lm", None, tokenizer), adapter, tokenizer, "CAUSAL_LM")
    recipe = tiny_recipe(finished_run, few_shot=2, generation={"prompts": ["A01 Acute", "Notes:"], "max_new_tokens": 6},
                         finetune={"prompt_template": "Code {code} means: ", "label_column": "title"})
    report = run_evaluation(recipe, Accelerator(cpu=True))

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
        assert row["prompt"].count("\n\n") == 2 and row["prompt"].endswith(" means: ")
    for model in ("base", "tuned"):
        predictions = [row[model] for row in generation["preview"]]
        references = [row["reference"] for row in generation["preview"]]
        exact = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
        assert generation[model]["exact_match"] == pytest.approx(exact)

    assert [s["prompt"] for s in report["samples"]] == ["A01 Acute", "Notes:"]
    assert all(len(s["base"]) == 1 and len(s["tuned"]) == 1 for s in report["samples"])
    markdown = (folder / "report.md").read_text()
    assert "change (relative)" in markdown and "General perplexity" in markdown
    assert report["settings"]["tuned_model"] == str(adapter)


def test_run_evaluation_of_a_classifier_compares_the_fresh_head_with_the_tuned_one(
    finished_run, tokenizer, tmp_path
) -> None:
    run = {**finished_run, "root": tmp_path}
    base_folder = tmp_path / "out" / "pretrain"
    tiny_quill(tokenizer).save_pretrained(base_folder)
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
    report = run_evaluation(recipe, Accelerator(cpu=True))

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
        run_evaluation(tiny_recipe(run, task="causal_lm"), Accelerator(cpu=True))
    with pytest.raises(ValueError, match="finetune.task: instruction"):
        run_evaluation(tiny_recipe(run, task="causal_lm", tasks=["perplexity", "generation"]), Accelerator(cpu=True))
    assert not (tmp_path / "out" / "eval").exists()
