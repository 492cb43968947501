"""Data stage: packing invariants, labels and positions, document hold-out, mixing, splits of a data section,
loaders, caching, bytes, errors."""

import contextlib
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset

from pipeline import data, sources
from pipeline.data import (
    IGNORE_INDEX,
    PREPROCESSING_VERSION,
    block_loaders,
    cached_map,
    collate,
    load_corpus,
    load_splits,
    token_byte_lengths,
    tokenize_and_pack,
    tokenizer_fingerprint,
)
from pipeline.tokenizer import train_tokenizer

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which but have".split()


def make_docs(n: int, seed: int = 0, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + f" #{i}." for i in range(n)]


DOCS = make_docs(60)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_docs(300, seed=1), vocab_size=300)


@pytest.fixture
def corpora(monkeypatch):
    """Register in-memory corpora under names, as `load_corpus` sources."""

    def register(name: str, texts: list[str], **columns) -> str:
        def build() -> Dataset:
            return Dataset.from_dict({"text": texts, **columns}).cast_column("text", datasets.Value("string"))

        monkeypatch.setitem(sources.CORPORA, name, build)
        return name

    return register


def stream_of(tok, texts: list[str]) -> list[int]:
    """The corpus as one token stream: [bos] + tokens + [eos] per document."""
    out: list[int] = []
    for text in texts:
        out += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return out


def pack(tok, texts, tmp_path, **kwargs):
    kwargs.setdefault("block_size", 16)
    return tokenize_and_pack(Dataset.from_dict({"text": texts}), tok, cache_dir=tmp_path / "cache", **kwargs)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("map_batch_size", [3, 1000])
def test_blocks_are_the_token_stream_cut_every_block_size(tok, tmp_path, monkeypatch, map_batch_size):
    monkeypatch.setattr(data, "_MAP_BATCH_SIZE", map_batch_size)  # remainders carried across map batches
    block_size = 16
    blocks = pack(tok, DOCS, tmp_path, block_size=block_size)["input_ids"]
    stream = stream_of(tok, DOCS)
    assert len(blocks) == len(stream) // block_size > 10
    assert all(len(block) == block_size for block in blocks)
    assert [t for block in blocks for t in block] == stream[: len(blocks) * block_size]  # each token once, in order


def test_each_worker_packs_its_contiguous_share(tok, tmp_path):
    documents = Dataset.from_dict({"text": DOCS})
    parallel = tokenize_and_pack(documents, tok, block_size=16, num_proc=2, cache_dir=tmp_path)
    shares = [documents.shard(2, i, contiguous=True)["text"] for i in range(2)]
    assert parallel["input_ids"] == [b for share in shares for b in pack(tok, share, tmp_path)["input_ids"]]


def test_documents_are_separated_by_eos(tok, tmp_path):
    flat = [t for block in pack(tok, DOCS, tmp_path)["input_ids"] for t in block]
    bos_positions = [i for i, t in enumerate(flat) if t == tok.bos_token_id]
    assert len(bos_positions) > 40
    assert all(flat[i - 1] == tok.eos_token_id for i in bos_positions[1:])
    assert flat.count(tok.eos_token_id) in (len(bos_positions), len(bos_positions) - 1)  # last doc may be cut


def test_labels_ignore_exactly_the_document_starts_that_follow_a_document(tok, tmp_path):
    packed = pack(tok, DOCS, tmp_path)
    n_ignored = 0
    for ids, labels in zip(packed["input_ids"], packed["labels"]):
        for j, (token, label) in enumerate(zip(ids, labels)):
            follows_document = token == tok.bos_token_id and j > 0  # BOS is only ever a document start
            assert label == (IGNORE_INDEX if follows_document else token)
            n_ignored += follows_document
    assert n_ignored > 20


def test_document_masking_position_ids_restart_at_each_document(tok, tmp_path):
    packed = pack(tok, DOCS, tmp_path, document_masking=True)
    continued = 0
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert positions[0] == 0
        continued += ids[0] != tok.bos_token_id  # a document cut at the block boundary: 0, and no -100
        assert labels[0] == ids[0]
        for j in range(1, len(ids)):
            assert positions[j] == (0 if ids[j] == tok.bos_token_id else positions[j - 1] + 1)
    assert continued > 5
    assert pack(tok, DOCS, tmp_path)["input_ids"] == packed["input_ids"]


def test_unpacked_examples_are_single_truncated_documents(tok, tmp_path):
    examples = pack(tok, DOCS + [""], tmp_path, block_size=12, packing=False)
    assert len(examples) == len(DOCS)  # the empty document is skipped
    lengths = Counter()
    for text, ids, labels in zip(DOCS, examples["input_ids"], examples["labels"]):
        full = stream_of(tok, [text])
        assert ids == labels == full[:12]
        lengths["truncated" if len(full) > 12 else "whole"] += 1
    assert lengths["truncated"] > 5 and lengths["whole"] > 5


def test_collate_pads_unpacked_examples_and_leaves_packed_blocks_unmasked():
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8], "labels": [IGNORE_INDEX]}], pad_token_id=2)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 2, 2]]))
    assert torch.equal(batch["labels"], torch.tensor([[5, 6, 7], [IGNORE_INDEX] * 3]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert all(t.dtype == torch.long for t in batch.values())

    blocks = [{"input_ids": [1, 2, 3], "labels": [1, -100, 3], "position_ids": [0, 0, 1]}] * 2
    packed = collate(blocks, pad_token_id=2)
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no attention_mask: fused causal kernel
    assert torch.equal(packed["labels"], torch.tensor([[1, -100, 3]] * 2))
    assert torch.equal(packed["position_ids"], torch.tensor([[0, 0, 1]] * 2))
    assert packed["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------------ corpus split


def test_validation_documents_never_appear_in_train(corpora, caplog):
    texts = make_docs(40) + make_docs(40)[:15] * 2  # 15 texts occur three times
    name = corpora("dupes", texts)
    splits = {}
    for seed in (0, 1, 2, 3):
        caplog.clear()
        train, validation = load_corpus([name], seed=seed, validation_fraction=0.25)
        train_texts, held_out = set(train["text"]), validation["text"]
        assert held_out and not train_texts & set(held_out)
        # membership is by document: exactly round(0.25 * 70) documents, a duplicate picked twice kept twice
        assert len(held_out) == 18
        assert train_texts | set(held_out) == set(texts)
        # the copies of held-out texts left out of training are counted, not dropped silently
        dropped = len(texts) - len(train) - len(held_out)
        assert dropped > 0
        assert f"'dupes': {dropped} training document(s) left out: {dropped} exact copies" in caplog.text
        splits[seed] = sorted(held_out)
    first_train = load_corpus([name], seed=0, validation_fraction=0.25)[0]["text"]
    again, validation = load_corpus([name], seed=0, validation_fraction=0.25)
    assert sorted(validation["text"]) == splits[0] and again["text"] == first_train  # same seed, same split
    assert len({tuple(v) for v in splits.values()}) > 1  # another seed, another split


def test_streamed_validation_is_the_first_documents_and_is_filtered_out_of_train(corpora):
    texts = make_docs(30)
    name = corpora("plain", texts + texts[:2])  # the first two texts repeat at the end
    train, validation = load_corpus([name], seed=0, validation_fraction=0.1, streaming=True, validation_documents=3)
    assert isinstance(train, datasets.IterableDataset) and isinstance(validation, Dataset)
    assert validation["text"] == texts[:3]
    assert [ex["text"] for ex in train] == texts[3:]


@pytest.mark.parametrize("streaming", [False, True])
def test_mixture_follows_the_weights(corpora, streaming):
    a = corpora("alpha", make_docs(300, seed=2, prefix="A "))
    b = corpora("beta", make_docs(300, seed=3, prefix="B "))
    train, _ = load_corpus(
        [{"name": a, "weight": 3.0}, {"name": b, "weight": 1.0}], seed=0, validation_fraction=0.05,
        streaming=streaming, validation_documents=10 if streaming else None,
    )
    texts = [ex["text"] for ex in train]
    counts = Counter(text[0] for text in texts)
    assert abs(counts["A"] / len(texts) - 0.75) < 0.04
    n_held_out = 10 if streaming else 15
    assert len({t for t in texts if t[0] == "B"}) == 300 - n_held_out  # all_exhausted: every B document is seen


def test_mixture_keeps_only_shared_columns(corpora):
    a = corpora("with_label", make_docs(20, seed=4), label=list(range(20)), extra=["x"] * 20)
    b = corpora("with_other", make_docs(20, seed=5), label=list(range(20)))
    train, validation = load_corpus([a, b], seed=0, validation_fraction=0.2)
    assert train.column_names == validation.column_names == ["text", "label"]
    alone, _ = load_corpus([a], seed=0, validation_fraction=0.2)
    assert alone.column_names == ["text", "label", "extra"]


# ------------------------------------------------------------------------------------- data sections


def section_of(sources, **fields):
    """A recipe data section's fields (duck-typed: the data stage reads them, it does not import the recipe)."""
    defaults = dict(validation_fraction=0.1, max_documents=None, streaming=False, validation_documents=None,
                    block_size=16, packing=True, document_masking=False, num_proc=1)
    return SimpleNamespace(sources=sources, **{**defaults, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        dict(validation_fraction=0.2),
        dict(validation_fraction=0.2, max_documents=25),
        dict(validation_documents=4),
        dict(streaming=True, validation_documents=3),
    ],
)
def test_load_splits_passes_the_section_whole(corpora, fields):
    name = corpora("sectioned", make_docs(40, seed=6))
    section = section_of([{"name": name}], **fields)
    train, validation = load_splits(section, seed=5)
    arguments = {key: getattr(section, key) for key in
                 ("validation_fraction", "max_documents", "streaming", "validation_documents")}
    expected_train, expected_validation = load_corpus(section.sources, seed=5, **arguments)
    assert validation["text"] == expected_validation["text"]
    assert [ex["text"] for ex in train] == [ex["text"] for ex in expected_train]
    assert isinstance(train, datasets.IterableDataset) == section.streaming
    if section.validation_documents is not None:
        assert len(validation) == section.validation_documents


def test_a_text_held_out_by_one_source_is_not_trained_from_another(corpora):
    shared = make_docs(20, seed=8)
    a = corpora("first", shared)
    b = corpora("second", make_docs(20, seed=9, prefix="B ") + shared)  # every text of `first` again
    train, validation = load_corpus([a, b], seed=0, validation_fraction=0.25)
    assert not set(train["text"]) & set(validation["text"])


def test_held_out_by_leaves_out_what_a_section_sharing_a_source_holds_out(corpora, monkeypatch):
    name = corpora("shared", make_docs(60, seed=10))
    other = corpora("unrelated", make_docs(60, seed=11, prefix="U "))
    mine = section_of([{"name": name}], validation_fraction=0.1)
    theirs = section_of([{"name": name}], validation_fraction=0.3)  # the same corpus, split differently
    alone_train, alone_validation = load_splits(mine, seed=0)
    train, validation = load_splits(mine, seed=0, held_out_by=[mine, theirs])
    their_validation = set(load_splits(theirs, seed=0)[1]["text"])
    assert validation["text"] == alone_validation["text"]  # the section's own held-out set does not move
    assert set(alone_train["text"]) & their_validation  # without it, training would read their held-out texts
    assert not set(train["text"]) & their_validation
    assert set(train["text"]) == set(alone_train["text"]) - their_validation
    # a section that shares no source is not even loaded
    loaded = []
    real = data.load_source
    monkeypatch.setattr(data, "load_source", lambda spec: loaded.append(spec.name) or real(spec))
    load_splits(mine, seed=0, held_out_by=[section_of([{"name": other}])])
    assert loaded == [name]


def test_block_loaders_batch_the_packed_blocks_of_each_split(corpora, tok):
    name = corpora("blocks", make_docs(200, seed=7))
    section = section_of([name], validation_fraction=0.2, document_masking=True)
    accelerator = SimpleNamespace(main_process_first=contextlib.nullcontext)  # one process
    train_loader, validation_loader = block_loaders(
        section, tok, batch_size=4, seed=0, accelerator=accelerator, eval_batch_size=3
    )
    train_docs, validation_docs = load_splits(section, seed=0)
    pack = dict(block_size=16, document_masking=True)
    assert train_loader.dataset["input_ids"] == tokenize_and_pack(train_docs, tok, **pack)["input_ids"]
    assert validation_loader.dataset["input_ids"] == tokenize_and_pack(validation_docs, tok, **pack)["input_ids"]
    assert (train_loader.batch_size, train_loader.drop_last, validation_loader.batch_size) == (4, True, 3)
    assert isinstance(train_loader.sampler, torch.utils.data.RandomSampler)
    batch = next(iter(train_loader))
    assert batch["input_ids"].shape == batch["position_ids"].shape == (4, 16) and "attention_mask" not in batch


# ------------------------------------------------------------------------------------------- cache


def test_block_cache_names_keep_their_fingerprint(tok, tmp_path):
    """Users' caches keep hitting: the packed blocks' fingerprint is this payload, whatever the code around it."""
    documents = Dataset.from_dict({"text": DOCS})
    payload = {"dataset": documents._fingerprint, "tokenizer": tokenizer_fingerprint(tok), "block_size": 16,
               "packing": True, "document_masking": False, "preprocessing_version": PREPROCESSING_VERSION}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    blocks = tokenize_and_pack(documents, tok, block_size=16, cache_dir=tmp_path)
    assert blocks._fingerprint == expected
    assert [file["filename"] for file in blocks.cache_files] == [str(tmp_path / f"tokenized-{expected}.arrow")]


def test_cached_map_reads_only_the_given_columns_and_hashes_the_settings(tok, tmp_path):
    rows = Dataset.from_dict({"text": ["a b", "c"], "label": [0, 1]})
    features = datasets.Features({"n": datasets.Value("int64")})
    calls = []

    def count_words(batch):
        calls.append(sorted(batch))
        return {"n": [len(text.split()) for text in batch["text"]]}

    def run(settings, kind="words"):
        return cached_map(rows, count_words, tokenizer=tok, settings=settings, features=features, kind=kind,
                          columns=["text"], cache_dir=tmp_path)

    first = run({"task": "words"})
    assert first["n"] == [2, 1] and first.column_names == ["n"] and calls == [["text"]]
    assert run({"task": "words"}).cache_files == first.cache_files and len(calls) == 1  # read back, not mapped
    assert run({"task": "words", "x": 1}).cache_files != first.cache_files and len(calls) == 2
    assert Path(first.cache_files[0]["filename"]).name.startswith("words-")
    with pytest.raises(ValueError, match="shadow"):
        run({"tokenizer": "mine"})


def test_second_run_does_no_tokenization_and_changes_write_new_data(tok, tmp_path, monkeypatch):
    calls = []
    original = type(tok).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)

    def run(texts=DOCS, tokenizer=tok, **kwargs):
        calls.clear()
        kwargs.setdefault("block_size", 16)
        out = tokenize_and_pack(Dataset.from_dict({"text": texts}), tokenizer, cache_dir=tmp_path, **kwargs)
        return out, len(calls)

    first, first_calls = run()
    assert first_calls > 0 and first.cache_files[0]["filename"].startswith(str(tmp_path))
    second, second_calls = run()  # a new Dataset object with the same rows, as in a second run
    assert second_calls == 0
    assert second.cache_files == first.cache_files and second["input_ids"] == first["input_ids"]

    other_tok = train_tokenizer(make_docs(300, seed=1), vocab_size=320)
    changes = {
        "block_size": dict(block_size=12),
        "tokenizer": dict(tokenizer=other_tok),
        "preprocessing_version": dict(preprocessing_version="test-2"),
        "document_masking": dict(document_masking=True),
        "data": dict(texts=DOCS[:-1] + ["changed"]),
    }
    files = {first.cache_files[0]["filename"]}
    for change, kwargs in changes.items():
        changed, n_calls = run(**kwargs)
        assert n_calls > 0, change
        files.add(changed.cache_files[0]["filename"])
    assert len(files) == 1 + len(changes)
    assert run(tokenizer=other_tok)[0]["input_ids"] != first["input_ids"]


def test_file_sources_are_cached_too(tok, tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    train, validation = load_corpus([{"name": str(path), "text_column": "body"}], seed=0, validation_fraction=0.1)
    assert len(validation) == 6 and len(train) == len(DOCS) - 6
    first = tokenize_and_pack(train, tok, block_size=16, cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(data._Packer, "encode", lambda self, texts: calls.append(1) or [])
    second = tokenize_and_pack(train, tok, block_size=16, cache_dir=tmp_path / "cache")
    assert not calls and second["input_ids"] == first["input_ids"]


# ------------------------------------------------------------------------------------------ streaming


def test_streaming_yields_the_same_blocks_as_map_style(tok, tmp_path):
    documents = Dataset.from_dict({"text": DOCS})
    mapped = tokenize_and_pack(documents, tok, block_size=16, document_masking=True, cache_dir=tmp_path)
    streamed = tokenize_and_pack(documents.to_iterable_dataset(), tok, block_size=16, document_masking=True)
    assert list(streamed) == list(mapped)
    assert list(streamed) == list(mapped)  # a second pass starts afresh (no carry from the first)


# ------------------------------------------------------------------------------------------- bytes


def test_token_byte_lengths_sum_to_the_utf8_length(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (len(tok),) and lengths.dtype == torch.long
    special_ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert lengths[special_ids].tolist() == [0, 0, 0, 0]
    texts = ["the cat.", "naïve café — 日本語 テキスト 👩‍👩‍👧 e\u0301\n\ttabs", "Ωmega ∑ x² ≠ y", " \x00\x7f\r\n"]
    for text in texts:
        ids = tok(text)["input_ids"]  # with BOS, which counts 0 bytes
        assert ids[0] == tok.bos_token_id
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ errors


def test_every_source_is_validated_before_any_is_loaded(corpora, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(data, "load_source", lambda spec: loaded.append(spec) or None)
    good = corpora("good", DOCS)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_corpus([good, str(tmp_path / "missing.jsonl")], seed=0, validation_fraction=0.1)
    with pytest.raises(ValueError, match="unknown source 'shakspeare'"):
        load_corpus([good, "shakspeare"], seed=0, validation_fraction=0.1)
    assert loaded == []


@pytest.mark.parametrize(
    "texts, streaming, match",
    [
        ([], False, "empty"),
        (["only one"], False, "1 non-empty document"),
        (["same", "same", "same"], False, "copies of the held-out"),
        (["", "", ""], True, "no non-empty document"),
        (["only one"], True, "all held out"),
    ],
)
def test_too_small_corpora_are_rejected(tmp_path, texts, streaming, match):
    path = tmp_path / "small.jsonl"  # a file: streamed, it is read lazily, so only the data stage can tell
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    n_held_out = 1 if streaming else None  # streamed files have no known size
    with pytest.raises(ValueError, match=match):
        load_corpus([str(path)], seed=0, validation_fraction=0.5, streaming=streaming, validation_documents=n_held_out)


def test_bad_arguments_are_rejected(corpora, tok, tmp_path):
    name = corpora("docs", DOCS)
    with pytest.raises(ValueError, match="no column 'body'"):
        load_corpus([{"name": name, "text_column": "body"}], seed=0, validation_fraction=0.1)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus([name], seed=0, validation_fraction=1.0)
    with pytest.raises(ValueError, match="validation_documents"):
        load_corpus([name], seed=0, validation_fraction=0.1, streaming=True)  # size unknown: say how many
    with pytest.raises(ValueError, match="block_size"):
        pack(tok, DOCS, tmp_path, block_size=1)
    with pytest.raises(ValueError, match="packing=True"):
        pack(tok, DOCS, tmp_path, packing=False, document_masking=True)


def test_a_corpus_shorter_than_one_block_names_its_token_count(tok, tmp_path):
    n_tokens = len(stream_of(tok, DOCS[:2]))
    with pytest.raises(ValueError, match=rf"has {n_tokens} tokens.*block_size=1000.*smaller block_size"):
        pack(tok, DOCS[:2], tmp_path, block_size=1000)
    with pytest.raises(ValueError, match=rf"has {n_tokens} tokens"):
        tokenize_and_pack(Dataset.from_dict({"text": DOCS[:2]}).to_iterable_dataset(), tok, block_size=1000)
    assert len(pack(tok, DOCS[:2], tmp_path, block_size=n_tokens)) == 1


def test_packed_blocks_collate_into_model_ready_tensors(tok, tmp_path):
    packed = pack(tok, DOCS, tmp_path, document_masking=True).with_format("numpy")
    batch = collate([packed[i] for i in range(4)], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (4, 16)
    assert "attention_mask" not in batch
    assert np.array_equal(batch["input_ids"].numpy(), np.stack(packed[:4]["input_ids"]))
