"""`pipeline inspect similarity / analogy / context`: vectors of texts and words, on the small trained Quill
(tests/trained_lm.py): a random model's states also drift with depth, so what is asserted here is what follows from
the definitions (padding masked, order ignored by a bag of words, causal attention) and what a trained model shows."""

from __future__ import annotations

import pytest
import torch

from pipeline.concepts import (
    analogy,
    bag_of_words_embeddings,
    embedding_similarity,
    layer_similarities,
    pairwise,
    sentence_embeddings,
    word_in_context,
)

TEXTS = ["ROMEO: O, she doth teach the torches", "the king", "Good night, good night! parting is such sweet sorrow"]


def states(model, tokenizer, text: str) -> torch.Tensor:
    """The last hidden state of one text on its own (no padding): (T, d), position 0 the BOS."""
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]


# ---------------------------------------------------------------------------------------------------- similarity
@pytest.mark.parametrize(("pooling", "pick"), [("mean", lambda s: s[1:].mean(0)), ("last", lambda s: s[-1]),
                                               ("first", lambda s: s[1])])
def test_pooled_batch_equals_each_text_alone_so_padding_is_masked(trained_lm, pooling, pick) -> None:
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert len(set(lengths)) == len(TEXTS)  # different lengths: the batch is padded
    batched = sentence_embeddings(model, tokenizer, TEXTS, pooling)
    alone = torch.stack([pick(states(model, tokenizer, t)) for t in TEXTS])  # the BOS (position 0) is not the text's
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    cosine = pairwise(batched)["cosine"]
    assert cosine.diagonal().tolist() == pytest.approx([1.0] * len(TEXTS), abs=1e-12)  # a text against itself
    assert (cosine - cosine.T).abs().max() < 1e-12 and cosine.fill_diagonal_(0).max() < 1


def test_bag_of_words_cannot_see_order_and_the_model_can(trained_lm) -> None:
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    texts = [" the king and the queen", " the queen and the king"]
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    assert a != b and sorted(a) == sorted(b)  # the same tokens in another order
    bags = bag_of_words_embeddings(model, tokenizer, texts)
    assert torch.equal(bags[0], bags[1])  # bit for bit: counts × table, the order never enters
    assert pairwise(bags)["cosine"][0, 1].item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(bags[0], model.get_input_embeddings().weight[a].sum(0), atol=1e-5, rtol=1e-5)
    contextual = pairwise(sentence_embeddings(model, tokenizer, texts))["cosine"][0, 1].item()
    assert contextual < 0.999


def test_first_token_pooling_in_a_causal_model_sees_only_the_first_token(trained_lm) -> None:
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    texts = [" the king rides", " the night is dark and full of terrors"]  # the same first token
    first = sentence_embeddings(model, tokenizer, texts, "first")
    torch.testing.assert_close(first[0], first[1], atol=1e-5, rtol=1e-5)  # nothing after it can reach it
    assert pairwise(sentence_embeddings(model, tokenizer, texts, "mean"))["cosine"][0, 1] < 0.99


def test_sentence_embeddings_refuse_an_unknown_pooling_and_an_empty_text(trained_lm) -> None:
    with pytest.raises(ValueError, match="pooling must be one of mean, last, first"):
        sentence_embeddings(trained_lm.model, trained_lm.tokenizer, TEXTS, "cls")
    with pytest.raises(ValueError, match=r"text 2 \(''\) has no tokens of its own"):
        sentence_embeddings(trained_lm.model, trained_lm.tokenizer, ["the king", ""])


# ---------------------------------------------------------------------------------------------------- analogy
def test_analogy_of_a_a_c_is_the_neighbourhood_of_c(trained_lm) -> None:
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    result = analogy(model, tokenizer, " the", " the", " man", top=8)  # B − A + C = C exactly
    similar = [pair for pair in embedding_similarity(model, tokenizer, " man", top=9) if pair[0] != " the"][:8]
    assert [t for t, _ in result] == [t for t, _ in similar]
    assert [s for _, s in result] == pytest.approx([s for _, s in similar], abs=1e-6)


def test_analogy_finds_the_token_at_b_minus_a_plus_c(tokenizer_300, tiny_quill) -> None:
    model = tiny_quill(tokenizer_300)
    table = model.get_input_embeddings().weight.detach()
    ids = {w: tokenizer_300(w, add_special_tokens=False)["input_ids"] for w in (" king", " queen", " old", " ride")}
    assert all(len(i) == 1 for i in ids.values())
    (king,), (queen,), (old,), (ride,) = ids.values()
    table[ride] = 2 * (table[queen] - table[king] + table[old])  # " ride" is where the arithmetic lands
    best = analogy(model, tokenizer_300, " king", " queen", " old", top=3)
    assert best[0][0] == " ride" and best[0][1] == pytest.approx(1.0, abs=1e-5)
    assert not {" king", " queen", " old"} & {t for t, _ in best}  # the inputs are left out


def test_analogy_names_every_word_that_is_not_one_token(trained_lm) -> None:
    tokenizer = trained_lm.tokenizer
    assert len(tokenizer("queen", add_special_tokens=False)["input_ids"]) > 1
    assert len(tokenizer("man", add_special_tokens=False)["input_ids"]) > 1
    assert len(tokenizer(" man", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError) as error:
        analogy(trained_lm.model, tokenizer, " the", "queen", "man")
    message = str(error.value)
    assert "'queen' is 3 tokens ['qu', 'e', 'en'], not one" in message
    assert "'man' is" in message and "pass ' man'" in message and "' the'" not in message


# ---------------------------------------------------------------------------------------------------- context
LEFT = ["the river flowed past the bank", "she paid the money into the bank", "I sat upon the green bank",
        "the thieves broke into the bank"]


def test_the_fixture_tells_left_contexts_apart_and_only_left_ones(trained_lm) -> None:
    """The control for the next test: a causal model's vector for a word depends only on what precedes it, and on
    this model it does depend on that."""
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    same_left = word_in_context(model, tokenizer, "bank", ["the bank of the river", "the bank was closed"])
    torch.testing.assert_close(same_left[0].vectors, same_left[1].vectors, atol=1e-5, rtol=1e-5)
    _, cosines = layer_similarities(word_in_context(model, tokenizer, "bank", LEFT))
    assert (cosines[-1] < 0.999).all()


def test_a_word_is_equal_at_layer_zero_and_drifts_apart_with_depth(trained_lm) -> None:
    model, tokenizer = trained_lm.model, trained_lm.tokenizer
    found = word_in_context(model, tokenizer, "bank", LEFT)
    assert all(f.pieces == [" b", "an", "k"] for f in found)  # the mean over the word's three tokens
    assert len(found[0].vectors) == model.config.num_hidden_layers + 1
    assert all(torch.equal(f.vectors[0], found[0].vectors[0]) for f in found)  # RoPE adds nothing at the input
    pairs, cosines = layer_similarities(found)
    assert len(pairs) == 6 and cosines[0].tolist() == pytest.approx([1.0] * 6, abs=1e-12)
    means = cosines.mean(1).tolist()
    assert all(a > b for a, b in zip(means, means[1:])), means  # less alike, on average, at every layer


def test_absolute_positions_make_layer_zero_differ_with_the_position(tokenizer_300, tiny_quill) -> None:
    model = tiny_quill(tokenizer_300, position_embedding_type="learned")
    at_2, at_2_again, at_3 = word_in_context(model, tokenizer_300, "king", ["the king rides", "the king sleeps",
                                                                            "the old king"])
    assert at_2.pieces == at_2_again.pieces == at_3.pieces == [" king"]
    assert torch.equal(at_2.vectors[0], at_2_again.vectors[0])
    assert not torch.allclose(at_2.vectors[0], at_3.vectors[0])  # the same token, another position added


def test_a_word_missing_from_a_sentence_is_named_before_any_forward_pass(trained_lm) -> None:
    with pytest.raises(ValueError, match=r"'bank' does not occur as a word in 'the banks of the river'"):
        word_in_context(None, trained_lm.tokenizer, "bank", ["money in the bank", "the banks of the river"])


@pytest.fixture(scope="module")
def tokenizer_300():
    from pipeline.tokenizer import train_tokenizer

    text = "the king and the queen ride to the castle; the knight and the squire follow the old king. " * 30
    return train_tokenizer([text], vocab_size=300, min_frequency=1)
