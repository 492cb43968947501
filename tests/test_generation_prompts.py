"""Prompting and decoding (`pipeline.generation`): the few-shot layout, batched generation equal to one prompt at a
time, prompt encoding (one BOS, left padding, long prompts keep their end), seeded sampling, and the scores that
follow from the completions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.generation import few_shot_prompt, generate_samples, generation_kwargs, score_generations
from pipeline.recipe import GenerationSection
from tiny import WORDS, fitted_quill, make_rows, rows_quill, rows_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return rows_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer):
    return fitted_quill(tokenizer, [row["text"] for row in make_rows(12)])


def test_few_shot_prompt_puts_k_solved_examples_before_the_query() -> None:
    examples = [{"code": "A00", "title": "Cholera"}, {"code": "A01", "title": "Typhoid fever"},
                {"code": "A02", "title": "Other salmonella infections"}]
    query = {"code": "A03", "title": "Shigellosis"}
    template = "ICD-10-CM code {code} means: "
    prompt = few_shot_prompt(examples, query, template, 2, response_column="title")
    # The query ends without the template's trailing space: the model writes it with its answer (" Shigellosis").
    assert prompt == ("ICD-10-CM code A00 means: Cholera\n\nICD-10-CM code A01 means: Typhoid fever\n\n"
                      "ICD-10-CM code A03 means:")
    assert few_shot_prompt(examples, query, template, 0, response_column="title") == "ICD-10-CM code A03 means:"
    with pytest.raises(ValueError, match="needs 4 solved examples"):
        few_shot_prompt(examples, query, template, 4, response_column="title")
    with pytest.raises(ValueError, match="'chapter'"):
        few_shot_prompt(examples, query, "{chapter}: ", 1, response_column="title")


def test_batched_greedy_generation_equals_generating_one_prompt_at_a_time(tokenizer) -> None:
    model = rows_quill(tokenizer, initializer_range=0.3)  # large weights: context-dependent, tie-free argmaxes
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


def test_a_prompt_longer_than_the_positions_keeps_its_end_and_says_so(tokenizer, caplog) -> None:
    model = rows_quill(tokenizer, position_embedding_type="learned", max_position_embeddings=24, initializer_range=0.3)
    prompt = " ".join(WORDS)  # ~90 tokens: more than a learned table of 24 positions can embed
    with caplog.at_level("WARNING", logger="pipeline.generation"):
        [sample] = generate_samples(model, tokenizer, [prompt], GenerationSection(max_new_tokens=4))
    assert "1 prompt(s) of up to" in caplog.text and "exceed the 20" in caplog.text
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    kept = torch.tensor([[tokenizer.bos_token_id, *ids[-(24 - 4 - 1):]]])  # BOS + the last tokens, 20 in all
    alone = model.generate(input_ids=kept, attention_mask=torch.ones_like(kept), max_new_tokens=4, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert sample["completions"] == [tokenizer.decode(alone[0, kept.shape[1]:], skip_special_tokens=True)]


def test_prompts_get_exactly_one_bos_and_left_padding(tokenizer, monkeypatch) -> None:
    model = rows_quill(tokenizer)
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
