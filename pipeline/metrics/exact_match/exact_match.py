"""Exact match: the fraction of predicted strings identical to their reference, after optional normalisation."""

import unicodedata

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Exact match is the proportion of predictions that are character-for-character identical to their reference.
Optional normalisation is applied to both sides first, in this order: remove punctuation (every Unicode
character of category P*, e.g. . , ! ? " ' - and curly quotes), lowercase, strip surrounding whitespace.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): predicted texts.
    references (`list[str]`): reference texts, one per prediction.
    strip (`bool`, defaults to False): ignore leading and trailing whitespace.
    ignore_case (`bool`, defaults to False): compare lowercased texts.
    ignore_punctuation (`bool`, defaults to False): delete Unicode punctuation before comparing.

Returns:
    exact_match (`float`): in [0, 1]; the fraction of predictions that match.

Example:
    >>> exact_match = pipeline.metrics.load_metric("exact_match")
    >>> exact_match.compute(predictions=["Paris.", "rome"], references=["paris", "Rome"])
    {'exact_match': 0.0}
    >>> exact_match.compute(predictions=["Paris.", "rome"], references=["paris", "Rome"],
    ...                     ignore_case=True, ignore_punctuation=True)
    {'exact_match': 1.0}
"""


def normalize(text: str, strip: bool, ignore_case: bool, ignore_punctuation: bool) -> str:
    # Punctuation goes first so that "Paris ." strips down to "Paris" rather than keeping the inner space.
    if ignore_punctuation:
        text = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
    if ignore_case:
        text = text.lower()
    if strip:
        text = text.strip()
    return text


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        strip: bool = False,
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
    ) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("exact_match needs at least one prediction; got empty `predictions` and `references`.")
        flags = {"strip": strip, "ignore_case": ignore_case, "ignore_punctuation": ignore_punctuation}
        matches = [
            normalize(prediction, **flags) == normalize(reference, **flags)
            for prediction, reference in zip(predictions, references)
        ]
        return {"exact_match": float(np.mean(matches))}
