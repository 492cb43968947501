"""Tokenizer stage: lossless round trips, special tokens, BOS handling, save/reload, padding, fertility."""

import random

import datasets
import pytest
from transformers import AutoTokenizer

from pipeline.data import tokenizer_fingerprint
from pipeline.tokenizer import DEFAULT_SPECIAL_TOKENS, fertility_report, train_tokenizer

VOCAB_SIZE = 600
MAX_LEN = 64
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more do can my what"
).split()


def make_corpus(n_lines: int = 300, seed: int = 0) -> list[str]:
    """A few KB of pure ASCII: every non-ASCII character in the tests below is unseen in training."""
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_lines))
    return [line + rng.choice(".,;!?") for line in lines]


CORPUS = make_corpus()
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the answer?"},
    {"role": "assistant", "content": "It is 42."},
]
ADVERSARIAL = {
    "empty": "",
    "spaces": "   leading, trailing   and  multiple   spaces   ",
    "emoji_zwj": "family 👩‍👩‍👧‍👦 flag 🏳️‍🌈 skin 👋🏽",
    "cjk": "日本語のテキスト，中文文本。한국어",
    "combining": "e\u0301 vs \u00e9, a\u0308\u0304, Z\u0335\u0321\u0322algo",
    "rtl": "مرحبا بالعالم \u202eשלום\u202c עולם",
    "control": "nul\x00tab\tcrlf\r\nbell\x07del\x7f",
    "newlines_only": "\n\n\r\n \n",
    "ascii_punct": "He said: 'it's (not) \"fine\" , ok ?' -- x",
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN)


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_round_trip_is_exact_for_unseen_unicode(tok, text):
    assert all(line.isascii() for line in CORPUS)  # so these characters were never seen in training
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    bare = tok(text, add_special_tokens=False)["input_ids"]
    assert bare == ids[1:]
    assert tok.decode(bare) == text
    assert tok.unk_token_id not in ids  # bytes, never <unk>
    assert max(ids, default=0) < len(tok)


def test_special_tokens_are_declared_distinct_and_atomic(tok):
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in DEFAULT_SPECIAL_TOKENS.items()}
    assert {name: getattr(tok, name) for name in DEFAULT_SPECIAL_TOKENS} == DEFAULT_SPECIAL_TOKENS
    assert ids == {name: getattr(tok, f"{name}_id") for name in DEFAULT_SPECIAL_TOKENS}
    assert len(set(ids.values())) == 4 and tok.pad_token_id != tok.eos_token_id
    assert set(tok.all_special_ids) == set(ids.values())
    # Each is one id when written in text, and skip_special_tokens removes it.
    assert tok("a<|eos|>b", add_special_tokens=False)["input_ids"][1:-1] == [tok.eos_token_id]
    assert tok.decode(tok("a<|eos|>b")["input_ids"], skip_special_tokens=True) == "ab"


def test_vocab_fits_a_model_sized_by_len_tokenizer(tok):
    backend = tok.backend_tokenizer
    assert len(tok) == backend.get_vocab_size(with_added_tokens=True) == tok.vocab_size <= VOCAB_SIZE
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))  # contiguous: no id >= len(tok)
    assert len(tok) > 256 + 4  # merges were learned on top of the bytes and special tokens


def test_smallest_vocab_is_bytes_plus_specials_and_still_lossless():
    small = train_tokenizer(CORPUS, vocab_size=256 + 4)
    assert len(small) == 260
    text = ADVERSARIAL["emoji_zwj"] + ADVERSARIAL["control"]
    assert small.decode(small(text, add_special_tokens=False)["input_ids"]) == text


def test_plain_encoding_adds_one_bos_no_eos_and_truncates_at_model_max_length(tok):
    ids = tok("the answer")["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert tok.model_max_length == MAX_LEN
    long_ids = tok(" ".join(CORPUS), truncation=True)["input_ids"]
    assert len(long_ids) == MAX_LEN and long_ids[0] == tok.bos_token_id


def test_chat_template_gives_exactly_one_bos_and_eos_per_turn(tok):
    ids = tok.apply_chat_template(MESSAGES, return_dict=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == len(MESSAGES) and ids[-1] == tok.eos_token_id
    # The documented text path: rendered text already holds the BOS, so no special tokens on encoding.
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids

    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and prompt.count("<|eos|>") == 2
    assert rendered.startswith(prompt)  # the prompt is a prefix of the full chat: train/generate agree


def test_assistant_mask_covers_exactly_the_reply_and_its_eos(tok):
    out = tok.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == MESSAGES[-1]["content"] + tok.eos_token


def test_save_and_autotokenizer_reload_is_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [*ADVERSARIAL.values(), *CORPUS[:5]]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.special_tokens_map == tok.special_tokens_map
    assert loaded.pad_token_id == tok.pad_token_id != loaded.eos_token_id
    assert loaded.chat_template == tok.chat_template
    chat = tok.apply_chat_template(MESSAGES, return_dict=False)
    assert loaded.apply_chat_template(MESSAGES, return_dict=False) == chat
    assert (len(loaded), loaded.model_max_length, loaded.padding_side) == (len(tok), MAX_LEN, "right")
    assert loaded.decode(loaded(ADVERSARIAL["spaces"])["input_ids"], skip_special_tokens=True) == ADVERSARIAL["spaces"]
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_padding_right_by_default_left_on_request(tok):
    texts = ["the", "the answer is that it was"]
    n_short = len(tok(texts[0])["input_ids"])
    right = tok(texts, padding=True)
    width = len(right["input_ids"][1])
    assert right["input_ids"][0] == tok(texts[0])["input_ids"] + [tok.pad_token_id] * (width - n_short)
    assert right["attention_mask"][0] == [1] * n_short + [0] * (width - n_short)
    left = tok(texts, padding=True, padding_side="left")  # what batched generation uses
    assert left["input_ids"][0] == [tok.pad_token_id] * (width - n_short) + tok(texts[0])["input_ids"]
    assert left["attention_mask"][0] == [0] * (width - n_short) + [1] * n_short
    assert tok.padding_side == "right"  # the per-call override does not stick


def test_fertility_matches_hand_counts(tok):
    texts = ["héllo world", "  a  b ", ""]  # 2 + 2 + 0 words; 12 + 7 bytes; 11 + 7 characters
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    report = fertility_report(tok, iter(texts))
    assert (report["n_words"], report["n_bytes"], report["n_chars"], report["n_tokens"]) == (4, 19, 18, n_tokens)
    assert report["tokens_per_word"] == pytest.approx(n_tokens / 4)
    assert report["bytes_per_token"] == pytest.approx(19 / n_tokens)
    assert report["chars_per_token"] == pytest.approx(18 / n_tokens)
    assert report["unk_rate"] == 0.0
    # Held-out text of the training distribution compresses: more than one byte per token.
    assert fertility_report(tok, make_corpus(50, seed=1))["bytes_per_token"] > 2.0


def test_training_is_deterministic_and_input_form_does_not_matter(tok):
    ds = datasets.Dataset.from_dict({"text": CORPUS})
    again = [
        train_tokenizer(iter(CORPUS), vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN),  # generator
        train_tokenizer(ds["text"], vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN),  # datasets column
        train_tokenizer(  # batch iterator
            (batch["text"] for batch in ds.iter(batch_size=64)), vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN
        ),
    ]
    for other in again:
        assert other.get_vocab() == tok.get_vocab()
        assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # merges in the same order
        assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)


def test_fingerprint_tracks_content_not_call_state(tok):
    before = tokenizer_fingerprint(tok)
    tok(["a", "the answer"], padding=True, truncation=True, max_length=3)  # leaves state on the backend
    assert tokenizer_fingerprint(tok) == before
    other_corpus = train_tokenizer(make_corpus(seed=2), vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN)
    other_template = train_tokenizer(CORPUS, vocab_size=VOCAB_SIZE, model_max_length=MAX_LEN, chat_template=None)
    other_length = train_tokenizer(CORPUS, vocab_size=VOCAB_SIZE, model_max_length=2 * MAX_LEN)
    fingerprints = {before, *(tokenizer_fingerprint(t) for t in (other_corpus, other_template, other_length))}
    assert len(fingerprints) == 4


def test_custom_special_tokens_override_defaults():
    custom = train_tokenizer(CORPUS, vocab_size=VOCAB_SIZE, special_tokens={"eos_token": "</s>"})
    assert custom.eos_token == "</s>" and custom.bos_token == DEFAULT_SPECIAL_TOKENS["bos_token"]
    assert custom.apply_chat_template(MESSAGES, tokenize=False).count("</s>") == len(MESSAGES)


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "match"),
    [
        (CORPUS, {"vocab_size": 259}, ValueError, r"vocab_size >= 260"),
        ([], {}, ValueError, "no text"),
        (iter(["", ""]), {}, ValueError, "no text"),
        ("one long string", {}, TypeError, "not one string"),
        (["ok", 3], {}, TypeError, "got int"),
        (CORPUS, {"special_tokens": {"pad_token": "<|eos|>"}}, ValueError, "distinct"),
        (CORPUS, {"special_tokens": {"end_token": "<e>"}}, ValueError, "Unknown special token"),
        (CORPUS, {"min_frequency": 0}, ValueError, "min_frequency"),
    ],
    ids=["vocab_too_small", "empty", "only_empty", "bare_string", "non_str", "pad_eq_eos", "bad_key", "min_freq"],
)
def test_bad_input_raises_clear_error(texts, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_tokenizer(texts, **kwargs)
