"""Accuracy: the fraction of predicted labels that equal their reference label."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class labels.
    references (`list[int]`): true class labels, one per prediction.

Returns:
    accuracy (`float`): in [0, 1]; 1.0 means every prediction is correct.

Example:
    >>> accuracy = pipeline.metrics.load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction; got empty `predictions` and `references`.")
        return {"accuracy": float(np.mean(predictions == references))}
