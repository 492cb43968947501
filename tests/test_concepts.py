"""`pipeline inspect`: each view of a concept equals its definition on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from pipeline.concepts import (
    attention_maps,
    decode_side_by_side,
    embedding_similarity,
    next_token_distribution,
    parameter_counts,
    positional_encoding,
    similarity,
    tokenize_table,
)
from pipeline.tokenizer import train_tokenizer

TEXT = "the king and the queen ride to the castle; the knight and the squire follow the king. " * 30


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer([TEXT], vocab_size=300, min_frequency=1)


def test_token_table_gives_the_ids_and_pieces_that_rebuild_the_text(tokenizer) -> None:
    text = "the knight rides"
    rows = tokenize_table(tokenizer, text)
    assert [r["id"] for r in rows] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(r["token"] for r in rows) == text
    assert len(rows) < len(text)  # subwords, not characters


def test_parameter_counts_match_the_closed_form(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer)
    counts = parameter_counts(model)
    v, h, i, layers, kv = len(tokenizer), 32, 64, 2, 2 * 8
    assert counts["token embeddings"] == v * h  # lm_head is tied: counted once
    assert counts["attention"] == layers * (h * h + 2 * h * kv + h * h)  # q, k, v (grouped), o
    assert counts["feed-forward"] == layers * 3 * h * i  # gate, up, down
    assert counts["norms"] == (2 * layers + 1) * h
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    untied = parameter_counts(tiny_quill(tokenizer, tie_word_embeddings=False))
    assert untied["output head"] == v * h and untied["total"] == counts["total"] + v * h


def test_cosine_and_dot_product_similarity_differ_as_defined() -> None:
    table = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    query = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(similarity(query, table, "cosine"), torch.tensor([1.0, 1.0, 0.6, 0.0]))
    torch.testing.assert_close(similarity(query, table, "dot"), torch.tensor([1.0, 10.0, 0.6, 0.0]))
    with pytest.raises(ValueError, match="cosine"):
        similarity(query, table, "euclid")


def test_nearest_tokens_rank_by_cosine_and_exclude_the_token_itself(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer)
    table = model.get_input_embeddings().weight.detach()
    king = tokenizer(" king", add_special_tokens=False)["input_ids"]
    assert len(king) == 1
    table[king[0]] = table[5] * 3  # make token 5 point the same way as " king"
    neighbours = embedding_similarity(model, tokenizer, " king", top=3)
    assert neighbours[0][0] == tokenizer.decode([5]) and neighbours[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(neighbours, neighbours[1:]))
    with pytest.raises(ValueError, match="not one"):
        embedding_similarity(model, tokenizer, "the knight")


def test_positional_encodings_are_what_they_claim(tokenizer, tiny_quill) -> None:
    sinusoidal = positional_encoding(tiny_quill(tokenizer, position_embedding_type="sinusoidal"), 10)
    pos, i, d = 7, 3, 32
    assert sinusoidal[pos, i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)), rel=1e-5)
    assert sinusoidal[pos, d // 2 + i].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)), rel=1e-5)
    learned = tiny_quill(tokenizer, position_embedding_type="learned")
    torch.testing.assert_close(positional_encoding(learned, 10), learned.model.embed_positions.weight[:10])
    rope = positional_encoding(tiny_quill(tokenizer), 10)  # rotation angle per position and channel pair
    assert rope.shape == (10, 4) and rope[3, 0].item() == pytest.approx(3.0)
    assert rope[3, 1].item() == pytest.approx(3.0 / 10000 ** (2 / 8), rel=1e-5)


def test_attention_maps_are_causal_distributions(tokenizer, tiny_quill) -> None:
    maps, tokens = attention_maps(tiny_quill(tokenizer), tokenizer, "the king rides")
    assert maps.shape == (2, 4, len(tokens), len(tokens)) and tokens[0] == tokenizer.bos_token
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, len(tokens)))
    assert torch.all(maps.triu(diagonal=1) == 0)


def test_next_token_distribution_is_the_softmax_of_the_last_logits(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer)
    top = next_token_distribution(model, tokenizer, "the king", top=5, temperature=2.0)
    logits = model(**tokenizer("the king", return_tensors="pt")).logits[0, -1]
    expected = torch.softmax(logits / 2.0, -1).topk(5)
    assert [p for _, p in top] == pytest.approx(expected.values.tolist(), rel=1e-5)
    assert [t for t, _ in top] == [tokenizer.decode([i]) for i in expected.indices.tolist()]


def test_decoding_strategies(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer)
    prompt = "the king"
    outputs = decode_side_by_side(model, tokenizer, prompt, max_new_tokens=8, strategies={
        "greedy": dict(do_sample=False), "top-k=1": dict(do_sample=True, top_k=1), "top-p=1.0": dict(do_sample=True, top_p=1.0, top_k=0),
    })
    # greedy is argmax at every step; top-k with k=1 can only ever pick the argmax
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    prompt_length = ids.shape[1]
    for _ in range(8):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    greedy = tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    assert outputs["greedy"] == greedy == outputs["top-k=1"]
    again = decode_side_by_side(model, tokenizer, prompt, max_new_tokens=8, strategies={"top-p=1.0": dict(do_sample=True, top_p=1.0, top_k=0)})
    assert again["top-p=1.0"] == outputs["top-p=1.0"]  # seeded: sampling repeats


# ---------------------------------------------------------------------------------------------------- user mistakes
@pytest.fixture(scope="module")
def model_dir(tokenizer, tiny_quill, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect-model")
    tiny_quill(tokenizer, position_embedding_type="learned", max_position_embeddings=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_temperature_zero_is_greedy_all_mass_on_the_argmax(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer)
    top = next_token_distribution(model, tokenizer, "the king", top=3, temperature=0.0)
    argmax = model(**tokenizer("the king", return_tensors="pt")).logits[0, -1].argmax().item()
    assert top[0] == (tokenizer.decode([argmax]), 1.0) and [p for _, p in top[1:]] == [0.0, 0.0]


def test_a_prompt_longer_than_the_positions_is_refused_with_the_count(tokenizer, tiny_quill) -> None:
    model = tiny_quill(tokenizer, position_embedding_type="learned", max_position_embeddings=16)
    long = "the king and the queen ride to the castle " * 4
    with pytest.raises(ValueError, match=r"more than the model's 16 positions"):
        attention_maps(model, tokenizer, long)
    with pytest.raises(ValueError, match=r"\+ 30 new tokens, more than the model's 16 positions.*--max-new-tokens"):
        decode_side_by_side(model, tokenizer, "the king", max_new_tokens=30)
    rope = tiny_quill(tokenizer, max_position_embeddings=16)  # rotary positions would silently extrapolate
    with pytest.raises(ValueError, match="positions"):
        next_token_distribution(rope, tokenizer, long)


@pytest.mark.parametrize(("argv", "message"), [
    (["tokens", "{missing}", "the king"], "does not exist"),
    (["params", "{empty}"], "holds no config.json"),
    (["similar", "{model}", "the knight"], "not one"),
    (["similar", "{model}", " king", "--top", "100000"], "--top 100000 is outside 1.."),
    (["attention", "{model}", "the king", "--layer", "99"], "--layer 99: the model has layers 0..1"),
    (["positions", "{model}", "--length", "100"], "--length 100 is outside 1..32"),
    (["next", "{model}", "the king " * 20], "more than the model's 32 positions"),
])
def test_inspect_answers_a_user_mistake_with_a_message_not_a_traceback(argv, message, model_dir, tmp_path,
                                                                       capsys, monkeypatch) -> None:
    from pipeline.cli import main

    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "model": model_dir}
    assert main(["inspect", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "PIPELINE_DEBUG=1" in err


@pytest.mark.parametrize("argv", [["positions", "m", "--length", "-1"], ["decode", "m", "x", "--max-new-tokens", "0"],
                                  ["next", "m", "x", "--temperature", "-1"], ["next", "m", "x", "--top", "0"]])
def test_inspect_refuses_a_negative_or_zero_size_before_loading_anything(argv, capsys) -> None:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["inspect", *argv])
    assert exit_.value.code == 2 and "is not a" in capsys.readouterr().err


def test_pipeline_debug_keeps_the_traceback(tmp_path, monkeypatch) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(["inspect", "params", str(tmp_path / "missing")])
