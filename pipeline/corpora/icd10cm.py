"""The ``icd10cm`` corpus: the ICD-10-CM classification from `simple_icd_10_cm`, one document per code.

One document per category and subcategory (7th-character extensions such as ``S72.001A`` are left out: they only
append "initial encounter" and the like to their parent's title): the code and its title, then its notes as the
tabular list prints them. Columns ``text, code, title, chapter, chapter_id`` (a `ClassLabel`), ``category``
(3-character code, to hold out whole categories) and ``billable``.
"""

from __future__ import annotations

from typing import Any

import datasets

from pipeline.corpora import in_memory

__all__ = ["PACKAGE", "icd10cm"]

PACKAGE = "simple_icd_10_cm"
"""The distribution that ships the data: its version stands for the corpus's content in stage markers
(`pipeline.sources.fingerprint`)."""


# Note fields of a code, in the order the tabular list prints them.
_ICD_NOTES = (
    ("Inclusion terms", "get_inclusion_term"),
    ("Includes", "get_includes"),
    ("Excludes1", "get_excludes1"),
    ("Excludes2", "get_excludes2"),
    ("Code first", "get_code_first"),
    ("Use additional code", "get_use_additional_code"),
    ("Code also", "get_code_also"),
    ("Notes", "get_notes"),
    ("7th character note", "get_seven_chr_note"),
)


def icd10cm() -> datasets.Dataset:
    """ICD-10-CM categories and subcategories (no 7th-character extensions), one row per code."""
    import simple_icd_10_cm as cm  # parses its 10 MB XML on import (~2-3 s): only when asked for

    everything = cm.get_all_codes(with_dots=True)  # chapters, blocks, categories, subcategories
    chapters = [c for c in everything if cm.is_chapter(c)]
    chapter_names = [cm.get_description(c) for c in chapters]
    chapter_ids = {c: i for i, c in enumerate(chapters)}
    # A few codes are both a block and a category (e.g. B99) and so are listed twice.
    codes = sorted(
        {
            c
            for c in everything
            if cm.is_category(c) or cm.is_subcategory(c, include_extended_subcategories=False)
        }
    )
    rows = []
    for code in codes:
        chapter_id = chapter_ids[cm.get_ancestors(code)[-1]]
        rows.append(
            {
                "text": _render_icd_code(cm, code),
                "code": code,
                "title": cm.get_description(code),
                "chapter": chapter_names[chapter_id],
                "chapter_id": chapter_id,
                "category": code[:3],
                "billable": cm.is_leaf(code),  # codes with 7th-character extensions are not billable
            }
        )
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "code": datasets.Value("string"),
            "title": datasets.Value("string"),
            "chapter": datasets.Value("string"),
            "chapter_id": datasets.ClassLabel(names=chapter_names),  # chapter number - 1
            "category": datasets.Value("string"),
            "billable": datasets.Value("bool"),
        }
    )
    return in_memory(rows, features, "icd10cm", package=PACKAGE)


def _render_icd_code(cm: Any, code: str) -> str:
    """'E11 Type 2 diabetes mellitus', then each note under its label, one '- item' per line."""
    lines = [f"{code} {cm.get_description(code)}"]
    for label, getter in _ICD_NOTES:
        value = getattr(cm, getter)(code)  # a list of strings, or one multi-line string
        items = [" ".join(item.split()) for item in (value.splitlines() if isinstance(value, str) else value)]
        if any(items):
            lines.append(f"{label}:")
            # "code to identify:" introduces the items after it, so it gets no bullet of its own
            lines += [item if item.endswith(":") else f"- {item}" for item in items if item]
    if extensions := cm.get_seven_chr_def(code):
        lines.append("7th characters:")
        lines += [f"- {char} {' '.join(meaning.split())}" for char, meaning in extensions.items()]
    return "\n".join(lines)
