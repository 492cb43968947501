"""`pipeline.inference` and `pipeline generate`: loading any causal LM (a Quill folder, a Llama saved by
transformers, base + adapter), sampling settings, and completions that equal `model.generate` with the same
settings, streamed or batched, cut at stop strings."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch
from tiny import rows_quill, rows_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.cli import build_parser, main
from pipeline.inference import (
    Sampling,
    check_prompt_length,
    complete,
    completions,
    encode_prompt,
    load_for_inference,
    read_prompts,
    stream,
)

PROMPTS = ["A01 Acute fever", "Notes: left", "the lung heart kidney bone with"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A02 Chronic"}]
SAMPLED = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.02,
           "repetition_penalty": 1.3, "seed": 7}
# The same settings, spelled as `model.generate` takes them: the reference never goes through Sampling.
SAMPLED_GENERATE = {"max_new_tokens": 24, "do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.9,
                    "min_p": 0.02, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def tokenizer():
    return rows_tokenizer()


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    """A tiny Quill and a tiny Llama (saved by transformers), each in a folder with the tokenizer."""
    root = tmp_path_factory.mktemp("inference-models")
    quill = rows_quill(tokenizer)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1,
    ))
    for name, model in (("quill", quill), ("llama", llama)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module", params=["quill", "llama"])
def loaded(request, folders):
    model, tokenizer = load_for_inference(folders / request.param)
    return request.param, model, tokenizer


def reference(model, tokenizer, prompt, seed=None, **generate):
    """`model.generate` on the prompt as the tokenizer encodes it (a conversation: its chat template); new tokens."""
    if isinstance(prompt, str):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **generate)
    return output[0, inputs["input_ids"].shape[1]:]


def text_of(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ loading


def test_loading_gives_the_class_of_the_folder_in_eval_mode_and_float32(loaded):
    name, model, tokenizer = loaded
    assert type(model).__name__ == {"quill": "QuillForCausalLM", "llama": "LlamaForCausalLM"}[name]
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.chat_template


def test_loading_refuses_what_is_not_a_model_with_the_fix(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="no model folder at .*typo"):
        load_for_inference(tmp_path / "typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder .no config.json"):
        load_for_inference(tmp_path / "empty")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "runs/x/pretrain"}))
    with pytest.raises(ValueError, match="is a PEFT adapter.*--adapter.*runs/x/pretrain"):
        load_for_inference(adapter)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_for_inference(folders / "quill", adapter=tmp_path / "empty")


def _lora(base, folder, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(folder)
    return tuned


def test_an_adapter_is_attached_to_its_base_and_a_misfit_is_refused(folders, tokenizer, tmp_path):
    base, _ = load_for_inference(folders / "quill")
    tuned = _lora(base, tmp_path / "adapter", tokenizer)
    model, _ = load_for_inference(folders / "quill", adapter=tmp_path / "adapter")
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        expected, got = tuned(**prompt).logits, model(**prompt).logits
        plain = load_for_inference(folders / "quill")[0](**prompt).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain)  # the adapter does change the model

    wider = rows_quill(tokenizer, hidden_size=48)
    _lora(wider, tmp_path / "wide-adapter", tokenizer)
    with pytest.raises(ValueError, match="does not fit the base .*trained on"):
        load_for_inference(folders / "quill", adapter=tmp_path / "wide-adapter")


# ------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", float("nan"), "temperature must be >= 0"),
    ("top_k", -1, "top_k must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", 1.0, r"min_p must be in \[0, 1\)"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("stop", ("",), "stop strings must be non-empty"),
    ("seed", -1, "seed must be >= 0"),
    ("num_samples", 0, "num_samples must be >= 1"),
])
def test_sampling_refuses_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**{field: value})


def test_several_greedy_samples_are_refused_as_identical():
    with pytest.raises(ValueError, match="identical completions: set temperature > 0"):
        Sampling(temperature=0, num_samples=2)


def test_settings_typed_as_text_are_converted_and_checked():
    sampling = Sampling().with_settings({"temperature": "0", "top_k": "7", "stop": "\\n,###", "seed": "3"})
    assert (sampling.temperature, sampling.top_k, sampling.stop, sampling.seed) == (0.0, 7, ("\n", "###"), 3)
    assert sampling.with_settings({"seed": "none"}).seed is None
    with pytest.raises(ValueError, match="unknown setting 'temp'; the settings are max_new_tokens, temperature"):
        sampling.with_settings({"temp": "1"})
    with pytest.raises(ValueError, match="top_k='many': expected a int"):
        sampling.with_settings({"top_k": "many"})
    with pytest.raises(ValueError, match="top_p must be in"):
        sampling.with_settings({"top_p": "2"})


def test_the_cli_defaults_are_samplings_own():
    args = build_parser().parse_args(["generate", "model", "prompt"])
    cli = {field.name: getattr(args, field.name) for field in dataclasses.fields(Sampling)}
    cli["stop"] = tuple(cli["stop"])
    assert cli == dataclasses.asdict(Sampling()) | {"stop": ()}


# ------------------------------------------------------------------------------------------ prompts


def test_a_conversation_is_the_chat_template_with_one_bos(tokenizer):
    ids = encode_prompt(tokenizer, CHAT)
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert encode_prompt(tokenizer, "fever") == tokenizer("fever")["input_ids"]  # [bos] + tokens
    assert encode_prompt(tokenizer, "<|bos|>fever") == tokenizer("fever")["input_ids"]  # no second BOS


def test_a_conversation_without_a_chat_template_is_refused(tokenizer):
    bare = rows_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*give plain text"):
        encode_prompt(bare, CHAT)


def test_a_prompt_longer_than_the_context_is_refused_with_the_lengths_and_the_fix(loaded):
    _, model, tokenizer = loaded
    long = " ".join(["fever"] * 120)
    n = len(tokenizer(long)["input_ids"])
    with pytest.raises(ValueError, match=rf"prompt is {n} tokens and max_new_tokens is 16, but the model has 128 "
                                         rf"positions .*shorten the prompt to at most 112 tokens"):
        complete(model, tokenizer, long, Sampling(max_new_tokens=16, temperature=0))
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 28"):
        check_prompt_length(100, 40, 128)
    check_prompt_length(100, 28, 128)  # exactly full is fine
    check_prompt_length(10**6, 10, None)  # no known context: no limit


# ------------------------------------------------------------------------------------------ completions


@pytest.mark.parametrize("prompt", [PROMPTS[0], CHAT], ids=["text", "chat"])
def test_greedy_equals_model_generate(loaded, prompt):
    _, model, tokenizer = loaded
    sampling = Sampling(max_new_tokens=20, temperature=0, repetition_penalty=1.2)
    expected = reference(model, tokenizer, prompt, max_new_tokens=20, do_sample=False, repetition_penalty=1.2)
    [result] = completions(model, tokenizer, [prompt], sampling)[0]
    assert result.text == text_of(tokenizer, expected)
    assert result.completion_tokens == len(expected)
    assert result.prompt_tokens == len(encode_prompt(tokenizer, prompt))
    tokens = stream(model, tokenizer, prompt, sampling)
    assert "".join(tokens) == result.text
    assert (tokens.completion_tokens, tokens.finish_reason) == (result.completion_tokens, result.finish_reason)


def test_seeded_sampling_with_every_knob_equals_model_generate(loaded):
    _, model, tokenizer = loaded
    expected = reference(model, tokenizer, PROMPTS[1], seed=7, **SAMPLED_GENERATE)
    sampling = Sampling(**SAMPLED)
    assert complete(model, tokenizer, PROMPTS[1], sampling) == [text_of(tokenizer, expected)]
    assert "".join(stream(model, tokenizer, PROMPTS[1], sampling)) == text_of(tokenizer, expected)
    other = complete(model, tokenizer, PROMPTS[1], dataclasses.replace(sampling, seed=8))
    assert other != [text_of(tokenizer, expected)]  # the seed is what made them equal


def test_several_samples_equal_num_return_sequences(loaded):
    _, model, tokenizer = loaded
    inputs = tokenizer(PROMPTS[2], return_tensors="pt")
    torch.manual_seed(5)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                            num_return_sequences=3)[:, inputs["input_ids"].shape[1]:]
    expected = tokenizer.batch_decode(output, skip_special_tokens=True)
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_k=0, seed=5, num_samples=3)
    assert complete(model, tokenizer, PROMPTS[2], sampling) == expected
    assert len(set(expected)) == 3


def test_batched_prompts_are_left_padded_so_each_gets_its_own_greedy_answer(loaded):
    _, model, tokenizer = loaded
    sampling = Sampling(max_new_tokens=12, temperature=0)
    prompts = [*PROMPTS, CHAT]
    batched = completions(model, tokenizer, prompts, sampling, batch_size=3)  # a batch of 3, then 1
    alone = [text_of(tokenizer, reference(model, tokenizer, p, max_new_tokens=12, do_sample=False)) for p in prompts]
    assert [c[0].text for c in batched] == alone
    assert len({len(encode_prompt(tokenizer, p)) for p in PROMPTS}) == 3  # the padding was needed


def test_stop_strings_cut_the_text_before_them(loaded):
    _, model, tokenizer = loaded
    full = complete(model, tokenizer, PROMPTS[1], Sampling(**SAMPLED))[0]
    # A string the completion contains, of whole characters a token can spell (not a "\ufffd" of broken bytes).
    stop = next(full[i : i + 2] for i in range(4, len(full)) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    cut = full[: full.find(stop)]
    sampling = Sampling(**{**SAMPLED, "stop": ("never in it", stop)})
    [result] = completions(model, tokenizer, [PROMPTS[1]], sampling)[0]
    assert result.text == cut
    assert result.finish_reason == "stop"
    assert result.completion_tokens < SAMPLED["max_new_tokens"]  # generation stopped there too
    pieces = list(stream(model, tokenizer, PROMPTS[1], sampling))
    assert "".join(pieces) == cut
    assert not any(stop in piece for piece in pieces)


def test_token_counts_and_finish_reasons_of_padded_rows(tokenizer):
    from pipeline.inference import _completion

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, b = tokenizer("fever lung", add_special_tokens=False)["input_ids"][:2]
    sampling = Sampling(max_new_tokens=4, stop=("ver",))  # "fe" + "ver": the stop string ends at b
    # Ended by EOS, then padded to the batch's width: the EOS counts, the padding does not.
    ended = _completion(tokenizer, [a, eos, pad, pad], 3, sampling)
    assert (ended.completion_tokens, ended.finish_reason) == (2, "stop")
    # Ended by a stop string (no EOS), then padded.
    stopped = _completion(tokenizer, [a, b, pad, pad], 3, sampling)
    assert (stopped.text, stopped.completion_tokens, stopped.finish_reason) == (tokenizer.decode([a]), 2, "stop")
    full = _completion(tokenizer, [a, a, a, a], 3, sampling)
    assert (full.completion_tokens, full.finish_reason) == (4, "length")


def test_a_stream_stops_when_cancelled_or_closed(loaded):
    _, model, tokenizer = loaded
    sampling = Sampling(max_new_tokens=60, temperature=0, repetition_penalty=1.3)
    cancel = threading.Event()
    cancel.set()  # before the first token: setting it mid-stream races a tiny model that finishes in milliseconds
    tokens = stream(model, tokenizer, PROMPTS[0], sampling, cancel)
    rest = list(tokens)
    assert tokens.finish_reason == "cancelled"
    assert tokens.completion_tokens == 1, rest  # generate checks its stopping criteria after each token
    uncancelled = stream(model, tokenizer, PROMPTS[0], sampling)
    list(uncancelled)
    assert uncancelled.completion_tokens > 1 and uncancelled.finish_reason != "cancelled"  # it would have gone on
    closed = stream(model, tokenizer, PROMPTS[0], sampling)
    next(closed)
    closed.close()
    assert not closed._thread.is_alive()


# ------------------------------------------------------------------------------------------ the command


def test_generate_streams_the_greedy_completion(folders, loaded, capsys):
    name, model, tokenizer = loaded
    expected = text_of(tokenizer, reference(model, tokenizer, PROMPTS[0], max_new_tokens=16, do_sample=False))
    assert main(["generate", str(folders / name), PROMPTS[0], "--temperature", "0", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_a_prompt_file_as_json(folders, loaded, tmp_path, capsys):
    name, model, tokenizer = loaded
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    arguments = ["--seed", "7", "--num-samples", "2", "--max-new-tokens", "10", "--stop", "\\n"]
    assert main(["generate", str(folders / name), "--file", str(file), "--json", *arguments]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sampling = Sampling(max_new_tokens=10, seed=7, num_samples=2, stop=("\n",))
    expected = completions(model, tokenizer, [PROMPTS[1], CHAT], sampling)
    assert [row["prompt"] for row in rows] == [PROMPTS[1], CHAT]
    assert [row["completions"] for row in rows] == [[c.text for c in e] for e in expected]
    assert [row["completion_tokens"] for row in rows] == [[c.completion_tokens for c in e] for e in expected]
    assert rows[0]["prompt_tokens"] == len(tokenizer(PROMPTS[1])["input_ids"])
    assert rows[0]["settings"] == dataclasses.asdict(sampling) | {"stop": ["\n"]}


def test_prompt_files_and_their_errors(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\ntwo\n")
    assert read_prompts(text) == ["one", "two"]
    assert read_prompts(text, chat=True, system="S")[1] == [{"role": "system", "content": "S"},
                                                            {"role": "user", "content": "two"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2 has neither "prompt" nor "messages"'):
        read_prompts(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not JSON"):
        read_prompts(bad)


def test_generate_reports_bad_input_before_loading_anything(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["generate", missing, "hi", "--top-p", "0"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err  # the settings are checked first
    assert main(["generate", missing, "hi"]) == 1
    assert f"no model folder at {missing}" in capsys.readouterr().err
    assert main(["generate", missing]) == 1
    assert "give a PROMPT or --file PROMPTS" in capsys.readouterr().err
