"""Bits per byte: total negative log-likelihood in bits divided by the UTF-8 bytes of the text scored.

Perplexity depends on the tokenizer (a token of a 50k vocabulary carries more text than one of a 1k vocabulary);
bits per byte normalises by the text itself, so models with different tokenizers compare on equal terms.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Bits per byte (bpb) is the corpus negative log-likelihood converted from nats to bits and divided by the number
of UTF-8 bytes of the text that was scored: bpb = sum of nll_sum / (ln 2 * sum of n_bytes). Sums are pooled
over sequences. A model that spends log2(256) = 8 bits per byte does no better than uniform over byte values.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): per sequence, the summed negative log-likelihood, in nats, of the tokens that stand
        for its text (the standard definition: not of a closing EOS or other special token, which covers no byte).
    n_bytes (`list[int]`): per sequence, the UTF-8 length of the text those tokens cover,
        `len(text.encode("utf-8"))`.

Returns:
    bits_per_byte (`float`).

Example:
    >>> bits_per_byte = pipeline.metrics.load_metric("bits_per_byte")
    >>> bits_per_byte.compute(nll_sum=[2 * math.log(2)], n_bytes=[4])  # 2 bits over 4 bytes
    {'bits_per_byte': 0.5}
"""


def _check_inputs(nll_sum: np.ndarray, counts: np.ndarray, count_name: str) -> None:
    """Reject inputs that cannot come from a log-likelihood evaluation, before they turn into a silent NaN."""
    if len(nll_sum) == 0:
        raise ValueError(f"bits_per_byte needs at least one sequence; got empty `nll_sum` and `{count_name}`.")
    if not np.all(np.isfinite(nll_sum)) or np.any(nll_sum < 0):
        raise ValueError("`nll_sum` must hold finite, non-negative negative log-likelihoods (nats).")
    if np.any(counts < 0):
        raise ValueError(f"`{count_name}` must be non-negative counts.")
    if np.any((counts == 0) & (nll_sum > 0)):
        raise ValueError(f"a sequence with `{count_name}` == 0 has a positive `nll_sum`; the two lists disagree.")
    if counts.sum() == 0:
        raise ValueError(f"`{count_name}` sums to 0: there is nothing to score.")


class BitsPerByte(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # No format="numpy": datasets' numpy formatter would hand the float64 column over as float32.
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "n_bytes": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum: list[float], n_bytes: list[int]) -> dict[str, float]:
        nll_sum, n_bytes = np.asarray(nll_sum, dtype=np.float64), np.asarray(n_bytes, dtype=np.int64)
        _check_inputs(nll_sum, n_bytes, "n_bytes")
        return {"bits_per_byte": math.fsum(nll_sum) / (math.log(2) * int(n_bytes.sum()))}
