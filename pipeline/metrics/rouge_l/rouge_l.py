"""ROUGE-L: precision, recall and F-measure of the longest common subsequence of whitespace tokens."""

import datasets
import evaluate
import numpy as np

_CITATION = """
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_DESCRIPTION = """
ROUGE-L compares a prediction with its reference through their longest common subsequence (LCS): the longest
sequence of tokens that appears in both, in order but not necessarily contiguously. Texts are split on
whitespace (no lowercasing, stemming or punctuation handling). Per pair:
precision = LCS / len(prediction), recall = LCS / len(reference), F = 2 P R / (P + R)  (F-measure with beta=1).
A pair where either side has no tokens scores 0, as in Google's rouge-score package. Each score is averaged
over pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): predicted texts.
    references (`list[str]`): reference texts, one per prediction.

Returns:
    rouge_l (`float`): mean ROUGE-L F-measure, in [0, 1].
    rouge_l_precision (`float`): mean LCS precision.
    rouge_l_recall (`float`): mean LCS recall.

Example:
    >>> rouge_l = pipeline.metrics.load_metric("rouge_l")
    >>> rouge_l.compute(predictions=["the cat sat on the mat"], references=["the cat is on the mat"])
    {'rouge_l': 0.8333333333333334, 'rouge_l_precision': 0.8333333333333334, 'rouge_l_recall': 0.8333333333333334}
"""


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel dynamic programming (Allison & Dix 1986; Crochemore et al. 2001): bit i of `row` stands for
    reference position i and is 0 where the LCS table's row steps up. One pass over `a` with a few big-int
    operations per token replaces the O(len(a) * len(b)) Python loop of the textbook table.
    """
    all_ones = (1 << len(b)) - 1
    positions: dict[str, int] = {}  # token -> bitmask of the positions where it occurs in b
    for i, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << i)
    row = all_ones
    for token in a:
        matches = row & positions.get(token, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    return len(b) - row.bit_count()


def _rouge_l_pair(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, f-measure) of one pair."""
    prediction_tokens, reference_tokens = prediction.split(), reference.split()
    if not prediction_tokens or not reference_tokens:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(prediction_tokens, reference_tokens)
    precision, recall = lcs / len(prediction_tokens), lcs / len(reference_tokens)
    f_measure = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return precision, recall, f_measure


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("rouge_l needs at least one prediction; got empty `predictions` and `references`.")
        precision, recall, f_measure = np.mean([_rouge_l_pair(p, r) for p, r in zip(predictions, references)], axis=0)
        return {"rouge_l": float(f_measure), "rouge_l_precision": float(precision), "rouge_l_recall": float(recall)}
