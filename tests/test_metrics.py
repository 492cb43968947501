"""Local evaluate metrics: hand-computed values, edge cases, and offline loading by path."""

import inspect
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import pytest

from pipeline.metrics import METRICS, load_metric


@pytest.fixture(scope="module")
def metrics() -> dict[str, evaluate.EvaluationModule]:
    return {name: load_metric(name) for name in METRICS}


def test_every_metric_loads_as_an_evaluate_metric_named_after_its_folder(metrics):
    assert METRICS == ("accuracy", "bits_per_byte", "exact_match", "f1", "perplexity", "rouge_l")
    for name, metric in metrics.items():
        assert isinstance(metric, evaluate.Metric)
        assert metric.name == name
        assert metric.description.strip()


def test_unknown_metric_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'") as error:
        load_metric("bleu")
    assert all(name in str(error.value) for name in METRICS)


def test_compute_options_given_to_load_metric_are_rejected_not_silently_ignored():
    # evaluate.load would pass `average` to the metric's __init__, which drops it.
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['average'\].*compute"):
        load_metric("f1", average="macro")


# --- accuracy -------------------------------------------------------------------------------------------


def test_accuracy_hand_computed(metrics):
    # Positions 0, 2 and 4 are right: 3 of 5.
    result = metrics["accuracy"].compute(predictions=[0, 1, 2, 2, 1], references=[0, 2, 2, 1, 1])
    assert result == {"accuracy": 3 / 5}


def test_accuracy_perfect_and_all_wrong(metrics):
    assert metrics["accuracy"].compute(predictions=[3, 1, 2], references=[3, 1, 2])["accuracy"] == 1.0
    assert metrics["accuracy"].compute(predictions=[1, 2, 3], references=[3, 1, 2])["accuracy"] == 0.0


def test_accuracy_streamed_batches_equal_one_call(metrics):
    accuracy = metrics["accuracy"]
    accuracy.add_batch(predictions=[0, 1], references=[0, 2])
    accuracy.add_batch(predictions=[2, 2, 1], references=[2, 1, 1])
    assert accuracy.compute() == {"accuracy": 3 / 5}


def test_empty_or_mismatched_inputs_raise(metrics):
    for name in ("accuracy", "f1", "exact_match", "rouge_l"):
        with pytest.raises(ValueError, match="at least one prediction"):
            metrics[name].compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        metrics["accuracy"].compute(predictions=[0, 1, 1], references=[0, 1])


# --- f1 -------------------------------------------------------------------------------------------------

# references  0 0 0 1 1 2
# predictions 0 0 1 1 2 2
#   class 0: TP 2, FP 0, FN 1 -> P 1,   R 2/3, F1 = 2*2/(2*2+0+1) = 4/5     support 3
#   class 1: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 = 2/(2+1+1)     = 1/2     support 2
#   class 2: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 = 2/(2+1+0)     = 2/3     support 1
THREE_CLASS = {"references": [0, 0, 0, 1, 1, 2], "predictions": [0, 0, 1, 1, 2, 2]}


def test_f1_macro_three_classes(metrics):
    result = metrics["f1"].compute(**THREE_CLASS, average="macro")
    assert result["f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)  # 59/90
    assert result["precision"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)  # 2/3
    assert result["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # 13/18


def test_f1_weighted_three_classes(metrics):
    result = metrics["f1"].compute(**THREE_CLASS, average="weighted")
    assert result["f1"] == pytest.approx((3 * 4 / 5 + 2 * 1 / 2 + 1 * 2 / 3) / 6)  # 61/90
    assert result["precision"] == pytest.approx((3 * 1 + 2 * 1 / 2 + 1 * 1 / 2) / 6)  # 3/4
    # Support-weighted recall is TP summed over classes / N: always the accuracy (4 of 6 right).
    assert result["recall"] == pytest.approx(4 / 6)


def test_f1_micro_equals_accuracy_for_single_label(metrics):
    # Pooled TP 4, FP 2, FN 2: P = R = F1 = 4/6, the accuracy.
    result = metrics["f1"].compute(**THREE_CLASS, average="micro")
    assert result == pytest.approx({"f1": 4 / 6, "precision": 4 / 6, "recall": 4 / 6})
    assert result["f1"] == pytest.approx(metrics["accuracy"].compute(**THREE_CLASS)["accuracy"])


def test_f1_binary_and_pos_label(metrics):
    references, predictions = [1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0]
    # Positive 1: TP 2 (positions 0, 3), FP 1 (position 1), FN 2 (positions 2, 5).
    result = metrics["f1"].compute(predictions=predictions, references=references)
    assert result == pytest.approx({"precision": 2 / 3, "recall": 2 / 4, "f1": 2 * 2 / (2 * 2 + 1 + 2)})
    # Harmonic mean of P and R: 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7.
    assert result["f1"] == pytest.approx(4 / 7)
    # Positive 0: TP 1 (position 4), FP 2 (positions 2, 5), FN 1 (position 1).
    result = metrics["f1"].compute(predictions=predictions, references=references, pos_label=0)
    assert result == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / (2 + 2 + 1)})


def test_f1_perfect_all_wrong_and_zero_division(metrics):
    f1 = metrics["f1"]
    for average in ("micro", "macro", "weighted"):
        perfect = f1.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 2], average=average)
        assert perfect == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
        wrong = f1.compute(predictions=[1, 2, 0], references=[0, 1, 2], average=average)
        assert wrong == {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    # Class 1 is never predicted: its precision 0/0 is defined as 0, not NaN.
    assert f1.compute(predictions=[0, 0], references=[1, 0]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_f1_rejects_bad_average(metrics):
    with pytest.raises(ValueError, match="at most two classes.*'macro'"):
        metrics["f1"].compute(**THREE_CLASS)  # average="binary" by default
    with pytest.raises(ValueError, match="average='samples' is not supported"):
        metrics["f1"].compute(**THREE_CLASS, average="samples")


# --- exact_match ----------------------------------------------------------------------------------------

ANSWERS = {"predictions": ["Paris", " paris ", "Rome!", "Berlin"], "references": ["Paris", "Paris", "rome", "Bonn"]}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, 1 / 4),  # only "Paris" == "Paris"
        ({"strip": True}, 1 / 4),  # "paris" still differs in case
        ({"strip": True, "ignore_case": True}, 2 / 4),  # + " paris "
        ({"ignore_punctuation": True}, 1 / 4),  # "Rome" != "rome"
        ({"strip": True, "ignore_case": True, "ignore_punctuation": True}, 3 / 4),  # + "Rome!"; Berlin never
    ],
)
def test_exact_match_normalisation_flags(metrics, flags, expected):
    assert metrics["exact_match"].compute(**ANSWERS, **flags) == {"exact_match": expected}


def test_exact_match_punctuation_is_unicode_and_removed_before_stripping(metrics):
    exact_match = metrics["exact_match"]
    result = exact_match.compute(predictions=["“Yes.”"], references=["Yes"], ignore_punctuation=True)
    assert result["exact_match"] == 1.0
    # "Paris ." -> "Paris " -> "Paris": stripping last removes the space the full stop left behind.
    result = exact_match.compute(predictions=["Paris ."], references=["Paris"], ignore_punctuation=True, strip=True)
    assert result["exact_match"] == 1.0


# --- rouge_l --------------------------------------------------------------------------------------------


def test_rouge_l_hand_computed(metrics):
    # Pair 1: "the cat sat on the mat" / "the cat is on the mat": LCS "the cat on the mat" = 5 of 6 and 6 tokens.
    #   P = 5/6, R = 5/6, F = 5/6.
    # Pair 2: "a b c d" / "b d": LCS "b d" = 2.  P = 2/4, R = 2/2, F = 2 * (1/2) * 1 / (1/2 + 1) = 2/3.
    result = metrics["rouge_l"].compute(
        predictions=["the cat sat on the mat", "a b c d"], references=["the cat is on the mat", "b d"]
    )
    assert result == pytest.approx(
        {"rouge_l": (5 / 6 + 2 / 3) / 2, "rouge_l_precision": (5 / 6 + 1 / 2) / 2, "rouge_l_recall": (5 / 6 + 1) / 2}
    )


def test_rouge_l_edges(metrics):
    rouge_l = metrics["rouge_l"]
    assert rouge_l.compute(predictions=["a  b\tc"], references=["a b c"])["rouge_l"] == 1.0  # any whitespace splits
    assert rouge_l.compute(predictions=["x y"], references=["a b c"])["rouge_l"] == 0.0
    assert rouge_l.compute(predictions=[""], references=["a b c"])["rouge_l"] == 0.0  # an empty side scores 0
    # A subsequence, not a substring; order counts: "c b a" shares only one token in order with "a b c".
    assert rouge_l.compute(predictions=["x a y b z c"], references=["a b c"])["rouge_l_recall"] == 1.0
    assert rouge_l.compute(predictions=["c b a"], references=["a b c"])["rouge_l"] == pytest.approx(1 / 3)


def _lcs_table(a: list[str], b: list[str]) -> int:
    """Textbook O(len(a) * len(b)) LCS table, the reference for the bit-parallel version."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_bit_parallel_lcs_equals_the_textbook_table(metrics):
    lcs_length = inspect.getmodule(type(metrics["rouge_l"])).lcs_length
    rng = random.Random(0)
    for _ in range(200):
        # Few distinct tokens so that matches repeat; lengths past 64 exercise multi-word integers.
        a = rng.choices("abcde", k=rng.randint(0, 90))
        b = rng.choices("abcde", k=rng.randint(0, 90))
        assert lcs_length(a, b) == _lcs_table(a, b)


# --- perplexity and bits per byte -----------------------------------------------------------------------


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(metrics):
    # Uniform over V = 50 tokens: every token costs ln 50 nats, whatever the sequence lengths.
    vocab_size, n_tokens = 50, [3, 7]
    nll_sum = [n * math.log(vocab_size) for n in n_tokens]
    result = metrics["perplexity"].compute(nll_sum=nll_sum, n_tokens=n_tokens)
    assert result == pytest.approx({"perplexity": vocab_size, "loss": math.log(vocab_size)})


def test_perplexity_pools_tokens_instead_of_averaging_sequences(metrics):
    # Σnll / Σtokens = (2 + 1) / (1 + 4) = 0.6; the mean of per-sequence losses would be (2 + 0.25) / 2.
    result = metrics["perplexity"].compute(nll_sum=[2.0, 1.0], n_tokens=[1, 4])
    assert result == pytest.approx({"perplexity": math.exp(0.6), "loss": 0.6})


def test_perplexity_keeps_float64(metrics):
    # datasets' numpy formatter would turn the column into float32 (ln 4 -> 1.38629436...49).
    assert metrics["perplexity"].compute(nll_sum=[math.log(4)], n_tokens=[1])["loss"] == math.log(4)


def test_perplexity_overflow_is_inf(metrics):
    assert metrics["perplexity"].compute(nll_sum=[1000.0], n_tokens=[1])["perplexity"] == math.inf


@pytest.mark.parametrize(
    ("nll_sum", "n_tokens", "message"),
    [
        ([], [], "at least one sequence"),
        ([-1.0], [2], "non-negative"),
        ([math.nan], [2], "finite"),
        ([1.0], [-2], "non-negative counts"),
        ([1.0, 2.0], [0, 3], "disagree"),
        ([0.0], [0], "sums to 0"),
    ],
)
def test_perplexity_rejects_impossible_inputs(metrics, nll_sum, n_tokens, message):
    with pytest.raises(ValueError, match=message):
        metrics["perplexity"].compute(nll_sum=nll_sum, n_tokens=n_tokens)


def test_bits_per_byte_hand_computed(metrics):
    bits_per_byte = metrics["bits_per_byte"]
    # Uniform over the 256 byte values costs ln 256 nats = 8 bits per byte.
    text = "hello world"  # 11 ASCII bytes
    assert bits_per_byte.compute(nll_sum=[len(text) * math.log(256)], n_bytes=[11]) == pytest.approx(
        {"bits_per_byte": 8.0}
    )
    # 3 + 5 = 8 bits over "héllo" (6 UTF-8 bytes: é is two) and 10 more bytes: 8 / 16 = 0.5.
    n_bytes = [len("héllo".encode("utf-8")), 10]
    assert n_bytes[0] == 6
    result = bits_per_byte.compute(nll_sum=[3 * math.log(2), 5 * math.log(2)], n_bytes=n_bytes)
    assert result == pytest.approx({"bits_per_byte": 0.5})
    with pytest.raises(ValueError, match="n_bytes` sums to 0"):
        bits_per_byte.compute(nll_sum=[0.0], n_bytes=[0])


def test_bits_per_byte_is_loss_times_tokens_per_byte_in_bits(metrics):
    nll_sum, n_tokens, n_bytes = [5.0, 2.5], [4, 2], [20, 9]
    loss = metrics["perplexity"].compute(nll_sum=nll_sum, n_tokens=n_tokens)["loss"]
    bpb = metrics["bits_per_byte"].compute(nll_sum=nll_sum, n_bytes=n_bytes)["bits_per_byte"]
    assert bpb == pytest.approx(loss * sum(n_tokens) / sum(n_bytes) / math.log(2))


@pytest.mark.parametrize(("nll_sum", "n_tokens", "n_bytes"),
                         [([3 * math.log(4), 0.7], [3, 2], [9, 4]), ([60.0], [1], [2]), ([708.9], [1], [3]),
                          ([709.0], [1], [1]), ([2000.0, 10.0], [2, 1], [5, 1])])
def test_the_pipelines_scorer_and_the_metric_modules_give_the_same_figures(metrics, nll_sum, n_tokens, n_bytes):
    """`pipeline.scoring` (the training loop's validation and the evaluation stage) pools the same sums the same way,
    overflow included: exp(loss) until it no longer fits a float, then inf (no cap at exp(50))."""
    from pipeline.scoring import Totals

    totals = Totals(nll=math.fsum(nll_sum), targets=sum(n_tokens), text_nll=math.fsum(nll_sum), bytes=sum(n_bytes))
    assert {"perplexity": totals.perplexity, "loss": totals.loss} == metrics["perplexity"].compute(
        nll_sum=nll_sum, n_tokens=n_tokens)
    assert totals.bits_per_byte == metrics["bits_per_byte"].compute(nll_sum=nll_sum, n_bytes=n_bytes)["bits_per_byte"]


def test_the_scorers_perplexity_overflows_to_inf_and_keeps_a_nan():
    from pipeline.scoring import Totals, perplexity

    assert perplexity(60.0) == math.exp(60.0) > math.exp(50.0)
    assert perplexity(709.0) == perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))  # diverged training shows as NaN, not as a number
    assert Totals().loss == 0.0 and Totals().perplexity == 1.0 and Totals().bits_per_byte is None  # nothing scored


# --- offline loading ------------------------------------------------------------------------------------

_LOAD_EVERY_METRIC = textwrap.dedent(
    """
    import inspect, json
    from pipeline.metrics import METRICS, load_metric

    loaded = {name: load_metric(name) for name in METRICS}
    print(json.dumps({
        "files": {name: inspect.getfile(type(metric)) for name, metric in loaded.items()},
        "accuracy": loaded["accuracy"].compute(predictions=[1, 0], references=[1, 1])["accuracy"],
    }))
    """
)


@pytest.mark.slow  # two fresh interpreters; `import evaluate` alone takes seconds (it imports transformers)
def test_metrics_load_offline_into_a_fresh_cache_from_two_processes_at_once(tmp_path):
    hf_home = tmp_path / "hf_home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    # Both start on an empty cache, so both race to copy the modules into it.
    processes = [
        subprocess.Popen([sys.executable, "-c", _LOAD_EVERY_METRIC], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["accuracy"] == 0.5
        assert sorted(report["files"]) == sorted(METRICS)
        for name, file in report["files"].items():
            # evaluate imports a copy made in $HF_HOME/modules, not the package file and not a Hub download.
            assert Path(file).is_relative_to(hf_home / "modules" / "evaluate_modules" / "metrics" / name)
            assert Path(file).name == f"{name}.py"
