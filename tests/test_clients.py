"""Quill against real clients, offline: transformers' text-generation pipeline, TRL's SFTTrainer with a PEFT LoRA,
and lm-evaluation-harness (`--model hf`) on a local task.

TRL and lm-eval come from the optional extra ``clients`` (``pip install -e ".[test,clients]"``). Without them these
tests skip, unless ``PIPELINE_REQUIRE_CLIENTS=1`` is set (CI), where a missing client fails the test.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline.models.quill  # noqa: F401  (registers Quill with the Auto classes and PEFT)
from pipeline.evaluation import measure_pair
from pipeline.loading import load_base, lora_config, merge_adapter
from pipeline.recipe import LoraSection
from pipeline.scoring import language_model_metrics
from pipeline.training import save_trained

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}  # what PeftModel.from_pretrained reads


def client(name: str) -> ModuleType:
    """Import a client of the ``clients`` extra, or skip (fail under PIPELINE_REQUIRE_CLIENTS=1) without it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{name} is not installed ({error}); install the extra: pip install -e '.[test,clients]'"
        if os.environ.get("PIPELINE_REQUIRE_CLIENTS") == "1":
            pytest.fail(f"PIPELINE_REQUIRE_CLIENTS=1 but {message}")
        pytest.skip(message)


def fresh_copy(trained_lm) -> torch.nn.Module:
    """The fixture model reloaded from its folder: adapters and trainers must never touch `trained_lm.model`."""
    return AutoModelForCausalLM.from_pretrained(trained_lm.folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ transformers.pipeline

# Two prompts with the same last token ("\n") and different contexts: a model (or a cache) that looks only at the
# last token continues both alike.
PROMPTS = ("ROMEO:\nBut soft, what light through yonder window breaks?\n",
           "KING RICHARD III:\nNow is the winter of our discontent\n")
NEW_TOKENS = 24


def _generate(model, tokenizer, prompt: str, seed: int, **settings) -> list[int]:
    """`model.generate` on the prompt as the pipeline encodes it (the tokenizer's defaults: [bos] + tokens)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **settings)[0].tolist()


def test_text_generation_pipeline_equals_generate(trained_lm) -> None:
    from transformers import pipeline as hf_pipeline

    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    greedy = {"do_sample": False}
    sampled = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}
    # The fixture's continuation depends on its prompt, not just on the prompt's last token, so a cache that is
    # dropped between steps (generating from the last token alone) would show below.
    last_tokens = {tokenizer(p, add_special_tokens=False).input_ids[-1] for p in PROMPTS}
    assert len(last_tokens) == 1
    expected = {("greedy", p): _generate(model, tokenizer, p, 0, **greedy) for p in PROMPTS}
    continuations = [expected["greedy", p][-NEW_TOKENS:] for p in PROMPTS]
    assert continuations[0] != continuations[1]
    assert _generate(model, tokenizer, "\n", 0, **greedy)[-NEW_TOKENS:] not in continuations
    # Without the KV cache every step recomputes the whole prefix: the same greedy tokens.
    for prompt in PROMPTS:
        assert _generate(model, tokenizer, prompt, 0, use_cache=False, **greedy) == expected["greedy", prompt]
    expected.update({("sampled", p): _generate(model, tokenizer, p, 1234, **sampled) for p in PROMPTS})
    # Seeded sampling is not greedy decoding in disguise, and the seed matters.
    assert expected["sampled", PROMPTS[0]] != expected["greedy", PROMPTS[0]]
    assert _generate(model, tokenizer, PROMPTS[0], 1, **sampled) != expected["sampled", PROMPTS[0]]

    # A real client: the pipeline loads the saved folder (weights, tokenizer and exported code) by itself.
    generator = hf_pipeline("text-generation", model=str(trained_lm.folder), tokenizer=str(trained_lm.folder),
                            trust_remote_code=True, device="cpu", dtype=torch.float32)
    for (name, prompt), tokens in expected.items():
        setting = greedy if name == "greedy" else sampled
        torch.manual_seed(1234)
        (out,) = generator(prompt, max_new_tokens=NEW_TOKENS, return_tensors=True, **setting)
        assert out["generated_token_ids"] == tokens, (name, prompt)
        torch.manual_seed(1234)
        (text,) = generator(prompt, max_new_tokens=NEW_TOKENS, **setting)
        new_text = tokenizer.decode(tokens[len(tokenizer(prompt).input_ids) :], skip_special_tokens=True)
        assert text["generated_text"] == prompt + new_text, (name, prompt)


# ------------------------------------------------------------------------------------------ TRL SFTTrainer + LoRA

LORA = LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}


def test_trl_sft_trainer_lora_adapter_has_our_format_and_loads_in_the_evaluate_stage(trained_lm, tmp_path) -> None:
    trl = client("trl")
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(trained_lm.folder)
    # One batch of held-out text, seen at every step: the loss must fall.
    texts = [trained_lm.held_out[i : i + 160] for i in range(0, 4 * 160, 160)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=4, per_device_train_batch_size=len(texts), learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, max_length=64, seed=0, dataloader_num_workers=0,
    )  # TRL's default gradient checkpointing stays on: LoRA + checkpointing must train
    trainer = trl.SFTTrainer(model=fresh_copy(trained_lm), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, peft_config=lora_config(LORA, "causal_lm"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
    trl_dir = tmp_path / "trl-adapter"
    trainer.save_model(str(trl_dir))

    # Our finetune stage's adapter for the same recipe section: its own config, PEFT wrapping and writer.
    ours_dir = tmp_path / "ours-adapter"
    base = load_base(trained_lm.folder, "causal_lm", None, tokenizer)
    save_trained(Accelerator(cpu=True), get_peft_model(base, lora_config(LORA, "causal_lm")), tokenizer, ours_dir)

    assert ADAPTER_FILES <= {p.name for p in trl_dir.iterdir()}
    assert ADAPTER_FILES <= {p.name for p in ours_dir.iterdir()}
    trl_config, our_config = (json.loads((d / "adapter_config.json").read_text()) for d in (trl_dir, ours_dir))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "modules_to_save",
                "base_model_name_or_path"):
        assert trl_config[key] == our_config[key], key
    assert set(trl_config["target_modules"]) == set(our_config["target_modules"]) == set(LORA.target_modules)
    trl_tensors, our_tensors = _adapter_tensors(trl_dir), _adapter_tensors(ours_dir)
    assert set(trl_tensors) == set(our_tensors)  # same base-model-relative names, e.g. ...q_proj.lora_A.weight
    assert len(trl_tensors) == 2 * len(LORA.target_modules) * trained_lm.model.config.num_hidden_layers
    assert all(trl_tensors[key].shape == our_tensors[key].shape for key in trl_tensors)
    # lora_B starts at zero: a non-zero one is the training, saved.
    assert all(trl_tensors[key].abs().max() > 0 for key in trl_tensors if ".lora_B." in key)

    # The evaluate stage's loading of base + adapter (`measure_pair`), measured on one held-out window.
    ids = torch.tensor([tokenizer(trained_lm.held_out[:400]).input_ids[:64]])

    def logits(model, label):
        with torch.no_grad():
            return {"logits": model(input_ids=ids).logits}

    base_logits, tuned = measure_pair(str(trained_lm.folder), trl_dir, "causal_lm", logits, tokenizer,
                                      Accelerator(cpu=True), seed=0)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(fresh_copy(trained_lm), str(trl_dir)).eval()(input_ids=ids).logits
    torch.testing.assert_close(tuned["logits"], reference, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(base_logits["logits"], trained_lm.model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert (tuned["logits"] - base_logits["logits"]).abs().max() > 1e-3  # the adapter does something
    # The shared merge (`loading.merge_adapter`, the finetune stage's) of the TRL adapter gives the same model.
    merged_dir = merge_adapter(trl_dir, trained_lm.folder, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ lm-evaluation-harness

# Windows. lm-eval's `loglikelihood_rolling` (max_length L) predicts the first L tokens of a document from its
# prefix token (BOS here), then each next L tokens from the single token before them; only a last, partial window
# gets more context (up to L tokens, overlapping the previous window). Our `language_model_metrics` (block_size B)
# scores [bos] + tokens + [eos] in windows of B tokens overlapping by one: each window predicts B - 1 targets, the
# first from one token of context, and so does the last one. With B = L + 1 the full windows are identical. A
# document of exactly k * L tokens has no partial lm-eval window; ours has the same k full windows and then one
# of two tokens, [last text token, eos], whose only target is the EOS, which bits per byte leaves out: both score
# the same text tokens from the same contexts. L = 127 (passed as max_length; lm-eval would take 128 from the
# config) keeps our windows within the model's 128 positions.
MAX_LENGTH = 127
BLOCK_SIZE = MAX_LENGTH + 1
WINDOWS_PER_DOCUMENT = (1, 2, 3)

# Targets. Bits per byte, ours and lm-eval's stock loglikelihood_rolling metric (wikitext's, with lm-eval's own
# process_results): the NLL of the text's tokens over the text's UTF-8 bytes. Our loss and perplexity also score
# each document's closing EOS; bits per byte does not, since the EOS stands for no byte of the text.
TASK = "quill_docs"


def _documents(tokenizer, text: str) -> list[str]:
    """Pieces of ``text`` of exactly k * MAX_LENGTH tokens that re-encode to the same tokens, k in
    WINDOWS_PER_DOCUMENT; each starts at a line start."""
    documents, start = [], 0
    for windows in WINDOWS_PER_DOCUMENT:
        length = windows * MAX_LENGTH
        while True:
            start = text.index("\n", start) + 1
            ids = tokenizer(text[start : start + 8 * length], add_special_tokens=False).input_ids[:length]
            piece = tokenizer.decode(ids)
            if len(ids) == length and tokenizer(piece, add_special_tokens=False).input_ids == ids:
                documents.append(piece)
                start += len(piece)
                break
    return documents


def _task_folder(folder: Path, documents: list[str]) -> Path:
    """A stock rolling-loglikelihood task (like lm-eval's wikitext) on ``documents``, with its default metric."""
    folder.mkdir()
    (folder / "documents.jsonl").write_text("".join(json.dumps({"page": document}) + "\n" for document in documents))
    lines = [f"task: {TASK}", "dataset_path: json",
             f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'documents.jsonl'))}",
             "test_split: test", "output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{page}}"',
             "metric_list:", "  - metric: bits_per_byte"]
    (folder / f"{TASK}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def test_lm_eval_bits_per_byte_equals_our_evaluate_stage(trained_lm, tmp_path) -> None:
    lm_eval = client("lm_eval")
    from lm_eval.tasks import TaskManager

    tokenizer = trained_lm.tokenizer
    documents = _documents(tokenizer, trained_lm.held_out)
    tasks = _task_folder(tmp_path / "tasks", documents)
    assert all(len(tokenizer(d, add_special_tokens=False).input_ids) % MAX_LENGTH == 0 for d in documents)

    # add_bos_token=False: our tokenizer adds BOS on plain encoding (its post-processor), and lm-eval 0.4.13's
    # `tok_encode` lets it (add_special_tokens is left to the tokenizer unless add_bos_token is set) and then puts
    # its own prefix token, BOS, in front of the rolling windows: it would score a second BOS, predicted from the
    # first, as a text token. With add_bos_token=False it encodes with add_special_tokens=False, so the prefix BOS
    # is context only and the targets are the text's tokens, as in `language_model_metrics`.
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={trained_lm.folder},trust_remote_code=True,dtype=float32,max_length={MAX_LENGTH},"
                   "add_bos_token=False",
        tasks=[TASK], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4, device="cpu", bootstrap_iters=0, log_samples=False,
    )["results"]
    theirs = results[TASK]["bits_per_byte,none"]

    ours = language_model_metrics(fresh_copy(trained_lm), tokenizer, documents, block_size=BLOCK_SIZE, batch_size=4,
                                  accelerator=Accelerator(cpu=True))
    assert ours["bytes"] == sum(len(d.encode("utf-8")) for d in documents)
    assert ours["tokens"] == sum(WINDOWS_PER_DOCUMENT) * MAX_LENGTH + len(documents)  # the text tokens and the EOSes
    # The same targets, windows and bytes: the same figure (float32 logits, so not to the last digit).
    assert ours["bits_per_byte"] == pytest.approx(theirs, abs=1e-3)
    assert ours["bits_per_byte"] == pytest.approx(theirs, rel=1e-5)
    # The comparison can fail: counting the EOSes' NLL too (our loss covers them) moves the figure by far more than
    # 1e-3 (this fixture never saw an EOS in training, so each costs it many nats).
    with_eos = ours["loss"] * ours["tokens"] / (math.log(2) * ours["bytes"])
    assert with_eos > theirs + 1e-3, (with_eos, theirs)
