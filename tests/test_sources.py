"""Sources: corpus registry and caps, local files, Hub routing, and the errors a user sees before any compute.

The corpus parsers themselves are tested in test_corpora.py."""

import dataclasses
import gzip
import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest

from pipeline.sources import CORPORA, SourceSpec, as_source_spec, evenly_spaced, load_source, validate_source


@pytest.fixture(scope="module")
def shakespeare() -> datasets.Dataset:
    return load_source("shakespeare")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ corpora: caps, registry


def test_max_documents_keeps_an_even_spread_of_a_corpus(shakespeare):
    subset = load_source({"name": "shakespeare", "max_documents": 10})
    assert len(subset) == 10
    assert len(set(subset["title"][:])) >= 8  # spread over the plays, not the first play's scenes
    assert set(subset["text"][:]) <= set(shakespeare["text"][:])


def test_evenly_spaced_picks_the_same_rows_from_datasets_and_lists():
    rows = [f"row {i}" for i in range(10)]
    assert evenly_spaced(rows, 4) == ["row 0", "row 2", "row 5", "row 7"]  # rows i * 10 // 4
    assert evenly_spaced(datasets.Dataset.from_dict({"text": rows}), 4)["text"][:] == evenly_spaced(rows, 4)
    for n in (None, 10, 11):
        assert evenly_spaced(rows, n) is rows  # nothing to drop: the rows themselves


def test_corpus_streaming_returns_an_iterable_dataset(monkeypatch):
    monkeypatch.setitem(CORPORA, "tiny", lambda: datasets.Dataset.from_dict({"text": list("abcdef")}))
    streamed = load_source(SourceSpec("tiny", streaming=True, max_documents=3))
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["text"] for row in streamed] == ["a", "c", "e"]  # evenly spaced, as in memory


def test_users_can_register_a_corpus(monkeypatch):
    monkeypatch.setitem(CORPORA, "tiny", lambda: datasets.Dataset.from_dict({"body": ["one", "two"]}))
    assert load_source({"name": "tiny", "text_column": "body"})["text"][:] == ["one", "two"]
    monkeypatch.setitem(CORPORA, "broken", lambda: ["not", "a", "dataset"])
    with pytest.raises(TypeError, match="must return a datasets.Dataset"):
        load_source("broken")
    monkeypatch.setitem(CORPORA, "hollow", lambda: datasets.Dataset.from_dict({"text": ["", " \n"]}))
    with pytest.raises(ValueError, match="'hollow' is empty"):
        load_source("hollow")


def test_recipe_sections_become_source_specs():
    @dataclasses.dataclass
    class DataclassSection:
        name: str
        max_documents: int | None = None

    class ModelSection:  # a pydantic model, duck-typed: sources.py does not import pydantic
        def model_dump(self) -> dict:
            return {"name": "icd10cm", "weight": 2.0}

    assert as_source_spec(DataclassSection("shakespeare", 5)) == SourceSpec("shakespeare", max_documents=5)
    assert as_source_spec(ModelSection()) == SourceSpec("icd10cm", weight=2.0)


def test_validate_builds_nothing(monkeypatch):
    def explode():
        raise AssertionError("validate_source must not build the corpus")

    monkeypatch.setitem(CORPORA, "shakespeare", explode)
    validate_source({"name": "shakespeare", "weight": 2.0})


# ----------------------------------------------------------------------------------- local files


def test_txt_files_split_into_paragraphs_or_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("whole of b", encoding="utf-8")
    (tmp_path / "README.md").write_text("# not data", encoding="utf-8")  # directories skip non-data files
    by_paragraph = load_source(str(tmp_path))
    paragraphs = sorted(text.strip() for text in by_paragraph["text"][:])
    assert paragraphs == ["first para\nstill first", "second para", "whole of b"]
    by_document = load_source({"name": str(tmp_path / "*.txt"), "sample_by": "document"})
    assert by_document["text"][:] == ["first para\nstill first\n\nsecond para\n", "whole of b"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz"])
def test_tabular_files_load_with_their_columns(tmp_path, suffix):
    frame = pd.DataFrame({"text": ["alpha beta", "gamma"], "label": [0, 1]})
    path = tmp_path / f"data{suffix}"
    if suffix in (".jsonl", ".json"):
        _write_jsonl(path, frame.to_dict("records"))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    ds = load_source(str(path))
    assert ds.to_dict() == {"text": ["alpha beta", "gamma"], "label": [0, 1]}


def test_text_column_is_renamed_and_replaces_text(tmp_path):
    rows = [{"body": "kept", "text": "old", "y": 1}, {"body": "too", "text": "x", "y": 2}]
    ds = load_source({"name": str(_write_jsonl(tmp_path / "d.jsonl", rows)), "text_column": "body"})
    assert ds.to_dict() == {"text": ["kept", "too"], "y": [1, 2]}


def test_glob_split_slice_and_streaming(tmp_path):
    for i in range(3):
        _write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": f"doc {i}.{j}"} for j in range(2)])
    pattern = str(tmp_path / "part-*.jsonl")
    full = load_source(pattern)["text"][:]
    assert full == [f"doc {i}.{j}" for i in range(3) for j in range(2)]
    assert load_source({"name": pattern, "split": "train[:2]"})["text"][:] == full[:2]
    streamed = load_source({"name": pattern, "streaming": True, "max_documents": 4})
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["text"] for row in streamed] == full[:4]


# ----------------------------------------------------------------------------------------- Hub


def test_hub_ids_are_passed_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({"text": ["title"], "content": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {"name": "owner/corpus", "subset": "en", "split": "validation", "text_column": "content"}
    assert load_source(spec).to_dict() == {"text": ["from the hub"]}
    load_source("hub:wikitext")
    load_source("mlfoundations/dclm-baseline-1.0")  # a version number is not a file extension
    load_source({"name": "owner/corpus", "revision": "0123abc"})  # a pinned commit reaches the Hub
    assert calls == [
        ("owner/corpus", {"name": "en", "split": "validation", "streaming": False}),
        ("wikitext", {"name": None, "split": "train", "streaming": False}),
        ("mlfoundations/dclm-baseline-1.0", {"name": None, "split": "train", "streaming": False}),
        ("owner/corpus", {"name": None, "split": "train", "streaming": False, "revision": "0123abc"}),
    ]


def test_paths_never_go_to_the_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"Hub called with {a}"))
    for path in ["data/train.jsonl", "./owner/name", "a/b/c", "~/nothing-here.txt", "notes.docx"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            validate_source(path)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("missing.jsonl", FileNotFoundError, "'missing.jsonl' does not exist"),
        ("shakspeare", ValueError, "did you mean 'shakespeare'"),
        ("ICD10CM", ValueError, "did you mean 'icd10cm'"),
        ("mydata", ValueError, "hub:mydata"),
        ({"name": "shakespeare", "weight": -1.0}, ValueError, "weight must be positive"),
        ({"name": "shakespeare", "weight": 0}, ValueError, "weight must be positive"),
        ({"name": "shakespeare", "weight": float("nan")}, ValueError, "weight must be positive"),
        ({"name": "shakespeare", "weight": "1e-4"}, ValueError, "weight must be a number"),
        ({"name": "shakespeare", "wieght": 2.0}, ValueError, "did you mean 'weight'"),
        ({"weight": 2.0}, ValueError, "no 'name'"),
        ({"name": "shakespeare", "max_documents": 0}, ValueError, "max_documents"),
        ({"name": "shakespeare", "split": "test"}, ValueError, "single split 'train'"),
        ({"name": "icd10cm", "subset": "en"}, ValueError, "Hub config"),
        ({"name": "shakespeare", "sample_by": "sentence"}, ValueError, "sample_by"),
    ],
)
def test_bad_specs_fail_before_any_compute(spec, error, message):
    with pytest.raises(error, match=re.escape(message)):
        validate_source(spec)


def test_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="matched no files"):
        validate_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "notes.docx").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"unsupported file type .*notes\.docx"):
        validate_source(str(tmp_path / "notes.docx"))
    (tmp_path / "a.csv").write_text("text\nx\n", encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    with pytest.raises(ValueError, match="mixes file formats"):
        validate_source(str(tmp_path))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        validate_source(str(tmp_path / "empty-dir"))
    with pytest.raises(ValueError, match="single split 'train'"):
        validate_source({"name": str(tmp_path / "a.csv"), "split": "test"})


def test_missing_or_non_text_column_names_the_columns(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "hello", "n": 1}])
    with pytest.raises(ValueError, match=re.escape("no column 'text'; its columns are ['body', 'n']")):
        load_source(str(path))
    with pytest.raises(ValueError, match="not strings"):
        load_source({"name": str(path), "text_column": "n"})


def test_empty_sources_are_rejected(tmp_path):
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  \n"}])
    with pytest.raises(ValueError, match="is empty"):
        load_source(str(blank))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        validate_source(str(tmp_path / "empty.txt"))  # caught before `datasets` sees the file
