"""F1, precision and recall for binary and multi-class labels, with binary/micro/macro/weighted averaging."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall: F1 = 2 * P * R / (P + R) = 2 TP / (2 TP + FP + FN).
Per class c, TP counts predictions of c that are right, FP predictions of c that are wrong and FN references
of c that were predicted as something else. `average` decides how classes are combined:

- "binary": the scores of the positive class `pos_label` only (at most two classes may occur).
- "micro": TP, FP and FN summed over all classes first. With one label per example, micro P = R = F1 = accuracy.
- "macro": the unweighted mean of the per-class scores; every class counts the same however rare.
- "weighted": the per-class scores weighted by support (the class's count in `references`).

The classes are those that occur in `references` or `predictions`. A score whose denominator is zero (a class
never predicted has no precision) is defined as 0.0, as in scikit-learn's default. Precision, recall and F1
are each averaged separately, so a macro F1 is not the harmonic mean of macro precision and macro recall.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class labels.
    references (`list[int]`): true class labels, one per prediction.
    average (`str`, defaults to "binary"): one of "binary", "micro", "macro", "weighted".
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`; ignored otherwise.

Returns:
    f1, precision, recall (`float`): each in [0, 1].

Example:
    >>> f1 = pipeline.metrics.load_metric("f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666, 'precision': 0.5, 'recall': 1.0}
    >>> f1.compute(predictions=[0, 2, 1, 2], references=[0, 1, 1, 2], average="macro")["f1"]
    0.7777777777777777
"""

AVERAGES = ("binary", "micro", "macro", "weighted")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division that gives 0.0 where the denominator is 0 (an undefined score counts as 0)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


class F1(evaluate.Metric):
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

    def _compute(
        self, predictions: np.ndarray, references: np.ndarray, average: str = "binary", pos_label: int = 1
    ) -> dict[str, float]:
        if average not in AVERAGES:
            raise ValueError(f"average={average!r} is not supported; use one of {list(AVERAGES)}.")
        if len(predictions) == 0:
            raise ValueError("f1 needs at least one prediction; got empty `predictions` and `references`.")

        classes = np.union1d(predictions, references)
        if average == "binary" and len(classes) > 2:
            raise ValueError(
                f"average='binary' needs at most two classes, found {classes.tolist()}; "
                "for multi-class labels pass average='micro', 'macro' or 'weighted'."
            )
        # Per-class counts, shape (n_classes,): map labels to class indices, then count with bincount.
        predicted = np.searchsorted(classes, predictions)
        actual = np.searchsorted(classes, references)
        tp = np.bincount(predicted[predicted == actual], minlength=len(classes))
        fp = np.bincount(predicted, minlength=len(classes)) - tp
        fn = np.bincount(actual, minlength=len(classes)) - tp

        if average == "binary":
            keep = classes == pos_label  # all False when pos_label never occurs: every score is 0
            tp, fp, fn = tp[keep].sum(), fp[keep].sum(), fn[keep].sum()
        elif average == "micro":
            tp, fp, fn = tp.sum(), fp.sum(), fn.sum()

        precision = _safe_divide(tp, tp + fp)
        recall = _safe_divide(tp, tp + fn)
        f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)

        if average in ("macro", "weighted"):
            support = tp + fn
            weights = np.ones(len(classes)) if average == "macro" else support
            precision, recall, f1 = (np.average(score, weights=weights) for score in (precision, recall, f1))
        return {"f1": float(f1), "precision": float(precision), "recall": float(recall)}
