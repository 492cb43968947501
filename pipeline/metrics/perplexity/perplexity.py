"""Perplexity from summed token negative log-likelihoods: exp(total NLL / total tokens).

Unlike the Hub's `perplexity`, this metric runs no model: the evaluation loop already has each sequence's
summed loss, and pooling sums (not averaging per-sequence perplexities) weights every token equally.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Perplexity is the exponential of the mean per-token negative log-likelihood (NLL, natural log) over a corpus:
perplexity = exp(sum of nll_sum / sum of n_tokens). A model that is uniform over V tokens has perplexity V.
Sums are pooled over all sequences before dividing, so long sequences weigh in proportion to their tokens;
this is the corpus perplexity, not the mean of per-sequence perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): per sequence, the summed negative log-likelihood of its scored tokens, in nats
        (e.g. `F.cross_entropy(logits, labels, reduction="sum")`).
    n_tokens (`list[int]`): per sequence, the number of tokens that `nll_sum` covers (labels != -100).

Returns:
    perplexity (`float`): exp(loss).
    loss (`float`): mean NLL per token in nats, sum(nll_sum) / sum(n_tokens).

Example:
    >>> perplexity = pipeline.metrics.load_metric("perplexity")
    >>> perplexity.compute(nll_sum=[3 * math.log(4), math.log(4)], n_tokens=[3, 1])  # uniform over 4 tokens
    {'perplexity': 4.0, 'loss': 1.3862943611198906}
"""


def _check_inputs(nll_sum: np.ndarray, counts: np.ndarray, count_name: str) -> None:
    """Reject inputs that cannot come from a log-likelihood evaluation, before they turn into a silent NaN."""
    if len(nll_sum) == 0:
        raise ValueError(f"perplexity needs at least one sequence; got empty `nll_sum` and `{count_name}`.")
    if not np.all(np.isfinite(nll_sum)) or np.any(nll_sum < 0):
        raise ValueError("`nll_sum` must hold finite, non-negative negative log-likelihoods (nats).")
    if np.any(counts < 0):
        raise ValueError(f"`{count_name}` must be non-negative counts.")
    if np.any((counts == 0) & (nll_sum > 0)):
        raise ValueError(f"a sequence with `{count_name}` == 0 has a positive `nll_sum`; the two lists disagree.")
    if counts.sum() == 0:
        raise ValueError(f"`{count_name}` sums to 0: there is nothing to score.")


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # No format="numpy": datasets' numpy formatter would hand the float64 column over as float32.
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum: list[float], n_tokens: list[int]) -> dict[str, float]:
        nll_sum, n_tokens = np.asarray(nll_sum, dtype=np.float64), np.asarray(n_tokens, dtype=np.int64)
        _check_inputs(nll_sum, n_tokens, "n_tokens")
        loss = math.fsum(nll_sum) / int(n_tokens.sum())
        # exp overflows a float past loss ~709.8 nats/token; such a model's perplexity is reported as inf.
        perplexity = math.exp(loss) if loss < 709 else math.inf
        return {"perplexity": perplexity, "loss": loss}
