"""`pipeline data`: the preview shows exactly the blocks and examples the training stages build (the stage's own
loaders are the reference), marks exactly the labels the loss skips and the document boundaries the packer made,
counts what it shows, writes nothing into the run, and refuses what cannot be shown with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from transformers import AutoTokenizer

from pipeline import finetune as finetune_stage
from pipeline.cli import main
from pipeline.data import IGNORE_INDEX, block_loaders, held_out_sections, load_splits
from pipeline.preview import preview_stage, render
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe

WORDS = ["cholera", "typhoid", "fever", "acute", "chronic", "infection", "of", "the", "lung", "heart", "kidney",
         "with", "without", "complication", "unspecified", "disorder", "due", "to", "virus", "bacteria"]
TEMPLATE = "ICD-10-CM code {code} means: "
BLOCK = 32


def rows(n: int = 80) -> list[dict]:
    out = []
    for i in range(n):
        title = " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 2 + i % 5))
        code = f"{'ABC'[i % 3]}{i:02d}"
        out.append({"text": f"{code} {title}\nsee also {WORDS[i % len(WORDS)]}", "code": code, "title": title,
                    "chapter_id": i % 3})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny recipe file whose tokenizer stage has run (as `pipeline run R --stages tokenizer` leaves it)."""
    root = tmp_path_factory.mktemp("preview")
    data = root / "icd.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    recipe = {
        "output_dir": str(root / "run"),
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "max_position_embeddings": 64},
        "data": {"sources": [{"name": str(data)}], "block_size": BLOCK, "validation_fraction": 0.1,
                 "document_masking": True},
        # Another split of the same file: the pretraining split also leaves out fine-tuning's held-out rows.
        "finetune": {"task": "instruction", "prompt_template": TEMPLATE, "label_column": "title",
                     "data": {"sources": [{"name": str(data)}], "block_size": 2 * BLOCK, "validation_fraction": 0.2}},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_recipe(load_recipe(path), stages=["tokenizer"])
    return path


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def as_json(preview) -> dict:
    return json.loads(json.dumps(preview.to_dict()))  # what --json prints


def targets(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])


# ------------------------------------------------------------------------------------------ pretraining


def test_pretrain_blocks_are_the_stage_loaders_blocks_with_their_masks_and_boundaries(run) -> None:
    recipe = load_recipe(run)
    tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir / "tokenizer")  # what the pretrain stage loads
    loaders = block_loaders(recipe.data, tokenizer, batch_size=4, seed=recipe.seed, accelerator=Accelerator(cpu=True),
                            held_out_by=held_out_sections(recipe))
    documents = load_splits(recipe.data, recipe.seed, held_out_sections(recipe))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for split, loader, docs in zip(("train", "validation"), loaders, documents):
        shown = as_json(preview_stage(recipe, "pretrain", split=split, blocks=10_000))
        expected = loader.dataset
        blocks = shown["blocks"]
        assert len(blocks) == len(expected) > 3
        assert [b["input_ids"] for b in blocks] == expected["input_ids"]
        assert [b["labels"] for b in blocks] == expected["labels"]
        assert [b["position_ids"] for b in blocks] == expected["position_ids"]  # document_masking is on
        for block in blocks:
            ids, masked, document_ids = block["input_ids"], block["masked"], block["document_ids"]
            assert masked == [label == IGNORE_INDEX for label in block["labels"]]
            assert block["tokens"] == tokenizer.convert_ids_to_tokens(ids)
            boundaries = [t for t in range(1, len(ids)) if document_ids[t] != document_ids[t - 1]]
            assert document_ids[0] == 0 and all(document_ids[t] - document_ids[t - 1] in (0, 1) for t in boundaries)
            assert boundaries == [t for t in range(1, len(ids)) if ids[t] == bos]
            assert all(ids[t - 1] == eos for t in boundaries)  # a document ends with EOS, the next opens with BOS
            assert [t for t in range(1, len(ids)) if masked[t]] == boundaries  # the packer's masked BOS
            assert [t for t in range(1, len(ids)) if block["position_ids"][t] == 0] == boundaries
            assert block["documents"] == len(boundaries) + 1 and block["targets"] == targets(block["labels"])
        assert any(len(set(b["document_ids"])) > 2 for b in blocks)  # the checks above saw real boundaries

        counts = shown["splits"][split]
        texts = list(docs["text"])
        tokens = sum(len(ids) + 2 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        assert counts["documents"] == len(texts) and counts["characters"] == sum(map(len, texts))
        assert counts["tokens"] == tokens and counts["examples"] == len(expected)
        assert 0 <= tokens - len(expected) * BLOCK < BLOCK  # only the tail shorter than a block is dropped
        assert counts["targets"] == sum(targets(labels) for labels in expected["labels"])
    assert shown["settings"] == {"block_size": BLOCK, "streaming": False, "packing": True, "document_masking": True}
    assert shown["tokenizer"]["location"] == str(recipe.output_dir / "tokenizer") and not shown["notes"]


def test_the_rendering_marks_what_the_json_says(run) -> None:
    preview = preview_stage(load_recipe(run), "pretrain", blocks=3)
    text = render(preview)
    assert "\x1b[" not in text and "\x1b[" in render(preview, color=True)
    header, body = text.split("\nblock 0 ", 1)
    assert "legend" in header and "not a target (label -100)" in header
    assert body.count("\n  ├─␞─\n") == sum(block.documents - 1 for block in preview.blocks) > 0
    assert body.count("⟦<|bos|>⟧") == sum(block.masked.count(True) for block in preview.blocks)
    assert body.count("↵") == sum(block.text.count("\n") for block in preview.blocks)
    for block in preview.blocks:
        assert f"block {block.index} of {preview.splits['train'].examples} (train)" in text


# ------------------------------------------------------------------------------------------ fine-tuning


@pytest.mark.parametrize("split", ["train", "validation"])
def test_finetune_instruction_preview_masks_exactly_the_prompt(run, split) -> None:
    recipe = load_recipe(run)
    shown = as_json(preview_stage(recipe, "finetune", split=split, blocks=10_000))
    # The stage's own loaders on the same rows, with the tokenizer the stage would load (the base is this run's
    # pretrain/, not trained yet, so the run's tokenizer, which pretraining saves there).
    tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir / "tokenizer")
    documents = load_splits(recipe.finetune.data, recipe.seed, held_out_sections(recipe))
    loaders = finetune_stage._example_loaders(recipe, tokenizer, documents, Accelerator(cpu=True))
    expected = loaders[("train", "validation").index(split)].dataset
    rows_ = documents[("train", "validation").index(split)]
    blocks = shown["blocks"]
    assert [b["input_ids"] for b in blocks] == expected["input_ids"] and len(blocks) == len(rows_)
    for row, block in zip(rows_, blocks):
        prompt = TEMPLATE.format(**row).rstrip()  # its trailing space goes with the response
        n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert block["masked"] == [True] * n_prompt + [False] * (len(block["input_ids"]) - n_prompt)
        assert tokenizer.decode(block["input_ids"][:n_prompt]) == tokenizer.bos_token + prompt
        assert block["input_ids"][-1] == tokenizer.eos_token_id and block["documents"] == 1  # none cut short
    counts = shown["splits"][split]
    assert counts["examples"] == len(expected) and counts["documents"] == len(rows_)
    assert counts["tokens"] == sum(len(ids) for ids in expected["input_ids"])
    assert counts["targets"] == sum(targets(labels) for labels in expected["labels"])
    assert shown["task"] == "instruction" and shown["settings"]["prompt_template"] == TEMPLATE

    text = render(preview_stage(recipe, "finetune", split=split, blocks=2))
    for row in list(rows_)[:2]:
        assert f"⟦<|bos|>{TEMPLATE.format(**row).rstrip()}⟧ {row['title']}<|eos|>" in text


def test_finetune_classification_preview_shows_one_class_per_example(run) -> None:
    recipe = load_recipe(run, ["finetune.task=classification", "finetune.label_column=chapter_id",
                               "finetune.prompt_template=null"])
    shown = as_json(preview_stage(recipe, "finetune", blocks=10_000))
    tokenizer = AutoTokenizer.from_pretrained(recipe.output_dir / "tokenizer")
    documents = load_splits(recipe.finetune.data, recipe.seed, held_out_sections(recipe))
    expected = finetune_stage._example_loaders(recipe, tokenizer, documents, Accelerator(cpu=True))[0].dataset
    assert [b["input_ids"] for b in shown["blocks"]] == expected["input_ids"]
    assert [b["label"] for b in shown["blocks"]] == expected["labels"] == list(documents[0]["chapter_id"])
    assert shown["splits"]["train"]["targets"] == len(expected)


# ------------------------------------------------------------------------------------------ the command


def test_the_command_takes_overrides_prints_json_and_writes_nothing_into_the_run(run, capsys) -> None:
    before = snapshot(run.parent / "run")
    assert main(["data", str(run), "--stage", "pretrain", "--blocks", "2", "--json", "data.block_size=16"]) == 0
    shown = json.loads(capsys.readouterr().out)["stages"]
    assert [s["stage"] for s in shown] == ["pretrain"] and shown[0]["settings"]["block_size"] == 16
    assert [len(block["input_ids"]) for block in shown[0]["blocks"]] == [16, 16]
    assert main(["data", str(run), "--blocks", "1"]) == 0  # every training stage the recipe runs, rendered
    out = capsys.readouterr().out
    assert "━━ pretrain · data" in out and "━━ finetune · finetune.data · task instruction" in out
    assert snapshot(run.parent / "run") == before


def test_a_tokenizer_trained_for_other_settings_is_pointed_out(run, capsys) -> None:
    assert main(["data", str(run), "--stage", "pretrain", "--blocks", "0", "--json", "tokenizer.vocab_size=280"]) == 0
    (note,) = json.loads(capsys.readouterr().out)["stages"][0]["notes"]
    assert "different recipe" in note and f"pipeline run {run} --stages tokenizer" in note


def test_what_cannot_be_shown_is_refused_with_the_fix(run, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["data", str(run), "--stage", "evaluate"])
    assert exit_.value.code == 2 and "invalid choice: 'evaluate'" in capsys.readouterr().err

    assert main(["data", str(run), "--stage", "finetune", "finetune.enabled=false"]) == 2
    error = capsys.readouterr().err
    assert "does not fine-tune" in error and "finetune.enabled=true" in error and "--stage pretrain" in error

    fresh = tmp_path / "fresh"
    assert main(["data", str(run), f"output_dir={fresh}"]) == 2
    assert f"pipeline run {run} --stages tokenizer" in capsys.readouterr().err
    assert not fresh.exists()
