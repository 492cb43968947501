"""transformers' own common model tests, run against Quill: our counterpart of transformers'
tests/models/llama/test_modeling_llama.py.

The mixins come from the sdist of the *installed* transformers version (fetched and cached by
tests/transformers_suite.py; nothing of transformers lives in this repository):

- `ModelTesterMixin` (test_modeling_common.py): save/load, weight init and tying, attention outputs, hidden
  states, resizing embeddings, eager vs sdpa equivalence, gradient checkpointing, torch.compile/export, ...
- `PipelineTesterMixin` (test_pipeline_mixin.py): needs transformers' tests/pipelines/ and tiny Hub checkpoints,
  neither of which the sdist ships: every pipeline test skips with transformers' reason (see the harness).
- `TrainingTesterMixin` (test_training_mixin.py): a tiny model must overfit a fixed batch.
- NOT `GenerationTesterMixin`: the sdist does not ship tests/generation/test_utils.py. No `generate()` test of
  transformers runs here; tests/test_model.py covers Quill's generation.

Classes: Quill in four variants (RoPE + multi-head attention, grouped-query attention, sinusoidal positions,
learned positions) and, as the control, Llama with the same tester shape. `test_quill_passes_every_test_llama_passes`
(last in this file) fails when a test passed for Llama but not for a Quill variant, unless that variant skips it
with a reason listed in its `not_supported`.

The three non-default Quill variants run a documented subset of the mixin (`VARIANT_TESTS`): the tests where the
positional encoding or the key/value head count changes the code path. Set ``PIPELINE_TRANSFORMERS_SUITE_FULL=1`` to
run every test for every variant.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import unittest
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import transformers_suite  # noqa: E402

try:
    transformers_suite.load()
except transformers_suite.SuiteUnavailable as error:
    if transformers_suite.required():
        raise RuntimeError(f"{transformers_suite.REQUIRE_ENV} is set but transformers' test suite is unavailable: {error}")
    pytest.skip(f"transformers {transformers_suite.VERSION}'s test suite could not be fetched ({error}); "
                f"set {transformers_suite.REQUIRE_ENV}=1 to make this an error", allow_module_level=True)

pytest.importorskip("parameterized", reason="transformers' test_modeling_common.py needs `parameterized` (test extra)")

_common = importlib.import_module("transformers_tests.test_modeling_common")
_configuration = importlib.import_module("transformers_tests.test_configuration_common")
_pipelines = importlib.import_module("transformers_tests.test_pipeline_mixin")
_training = importlib.import_module("transformers_tests.test_training_mixin")

ModelTesterMixin = _common.ModelTesterMixin
ids_tensor = _common.ids_tensor
ConfigTester = _configuration.ConfigTester
PipelineTesterMixin = _pipelines.PipelineTesterMixin
TrainingTesterMixin = _training.TrainingTesterMixin

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)

from pipeline.models.quill import (  # noqa: E402
    QuillConfig,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillForTokenClassification,
    QuillModel,
)

TORCH_DEVICE = "cpu"
FULL = os.environ.get("PIPELINE_TRANSFORMERS_SUITE_FULL", "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="module", autouse=True)
def _quill_in_name_tables():
    with transformers_suite.quill_in_name_tables():
        yield


# ---------------------------------------------------------------------------------------------------------------
# Outcome recording, for the Llama-vs-Quill comparison at the end of the file
# ---------------------------------------------------------------------------------------------------------------
OUTCOMES: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)  # class -> test -> (outcome, reason)


class _RecordingResult:
    """Forwards everything to pytest's unittest result object and notes each test's outcome on the way."""

    def __init__(self, result, record):
        self._result = result
        self._record = record

    def __getattr__(self, name):
        return getattr(self._result, name)

    def addSuccess(self, test):
        self._record("passed", "")
        return self._result.addSuccess(test)

    def addSkip(self, test, reason):
        self._record("skipped", reason)
        return self._result.addSkip(test, reason)

    def addExpectedFailure(self, test, err):
        self._record("xfailed", str(err[1]))
        return self._result.addExpectedFailure(test, err)

    def addUnexpectedSuccess(self, test):
        self._record("failed", "unexpected success")
        return self._result.addUnexpectedSuccess(test)

    def addFailure(self, test, err):
        self._record("failed", repr(err[1])[:300])
        return self._result.addFailure(test, err)

    def addError(self, test, err):
        if issubclass(err[0], (unittest.SkipTest, pytest.skip.Exception)):
            self._record("skipped", str(err[1]))
        elif issubclass(err[0], pytest.xfail.Exception):
            self._record("xfailed", str(err[1]))
        else:
            self._record("failed", repr(err[1])[:300])
        return self._result.addError(test, err)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._record("failed", f"subtest {subtest}: {err[1]!r}"[:300])
        return self._result.addSubTest(test, subtest, err)


_RANK = {"skipped": 1, "xfailed": 1, "passed": 2, "failed": 3}


class _RecordsOutcomes:
    def run(self, result=None):
        name = self._testMethodName
        outcomes = OUTCOMES[type(self).__name__]
        outcomes.pop(name, None)

        def record(outcome, reason):
            # A test is failed if any part failed, else passed if it ran to the end (some subtests may have skipped),
            # else skipped/xfailed. The first reason of the winning outcome is kept.
            if name not in outcomes or _RANK[outcome] > _RANK[outcomes[name][0]]:
                outcomes[name] = (outcome, reason)

        return super().run(_RecordingResult(result, record) if result is not None else result)


# ---------------------------------------------------------------------------------------------------------------
# Model tester: builds the tiny config and inputs the mixins ask for (as transformers' CausalLMModelTester does)
# ---------------------------------------------------------------------------------------------------------------
class DecoderModelTester:
    """Tiny decoder-only model: 2 layers, width 32, 4 heads, vocabulary 99, batch 13 of length 7 with a
    lower-triangular attention mask (row i has i+1 real tokens: every row ends in padding, right-padded)."""

    config_class = None
    base_model_class = None
    causal_lm_class = None
    sequence_classification_class = None
    token_classification_class = None
    question_answering_class = None
    config_overrides: dict = {}

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=37,
        hidden_act="silu",
        max_position_embeddings=512,
        type_sequence_label_size=2,
        initializer_range=0.02,
        num_labels=3,
        num_choices=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = self.config_overrides.get("num_key_value_heads", num_key_value_heads)
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.head_dim = hidden_size // num_attention_heads

    @property
    def all_model_classes(self):
        return tuple(
            cls
            for cls in (self.base_model_class, self.causal_lm_class, self.sequence_classification_class,
                        self.token_classification_class)
            if cls is not None
        )

    def get_config(self):
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            tie_word_embeddings=True,  # Quill's default; the Llama control is tied too, to keep the two equivalent
        )
        kwargs.update(self.config_overrides)
        return self.config_class(**kwargs)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        sequence_labels = token_labels = choice_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
            choice_labels = ids_tensor([self.batch_size], self.num_choices)
        return self.get_config(), input_ids, None, input_mask, sequence_labels, token_labels, choice_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, _, input_mask, *_ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, token_type_ids, input_mask, *labels):
        model = self.base_model_class(config).to(TORCH_DEVICE).eval()
        masked = model(input_ids, attention_mask=input_mask).last_hidden_state
        unmasked = model(input_ids).last_hidden_state
        expected = (self.batch_size, self.seq_length, self.hidden_size)
        self.parent.assertEqual(masked.shape, expected)
        self.parent.assertEqual(unmasked.shape, expected)
        # The last row has no padding: the mask changes nothing there, and everything in the padded first row.
        torch.testing.assert_close(masked[-1], unmasked[-1])
        self.parent.assertFalse(torch.allclose(masked[0, 1:], unmasked[0, 1:]))


class QuillModelTester(DecoderModelTester):
    config_class = QuillConfig
    base_model_class = QuillModel
    causal_lm_class = QuillForCausalLM
    sequence_classification_class = QuillForSequenceClassification
    token_classification_class = QuillForTokenClassification


class QuillGQAModelTester(QuillModelTester):
    config_overrides = {"num_key_value_heads": 2}


class QuillSinusoidalModelTester(QuillModelTester):
    config_overrides = {"position_embedding_type": "sinusoidal"}


class QuillLearnedModelTester(QuillModelTester):
    config_overrides = {"position_embedding_type": "learned"}


class LlamaModelTester(DecoderModelTester):
    config_class = LlamaConfig
    base_model_class = LlamaModel
    causal_lm_class = LlamaForCausalLM
    sequence_classification_class = LlamaForSequenceClassification
    token_classification_class = LlamaForTokenClassification


# ---------------------------------------------------------------------------------------------------------------
# Test classes
# ---------------------------------------------------------------------------------------------------------------
NO_GENERATION_MIXIN = ("transformers' sdist does not ship tests/generation/test_utils.py (GenerationTesterMixin); "
                       "this check would only confirm we inherit an empty stand-in")


class DecoderModelTest(_RecordsOutcomes, ModelTesterMixin, PipelineTesterMixin, TrainingTesterMixin):
    """Shared body of the Quill and Llama test classes (becomes a test class only with unittest.TestCase)."""

    model_tester_class = DecoderModelTester
    # TrainingTesterMixin's overfit test takes 300 Adam steps at lr 1e-3 on 2x64 tokens (~1-3 min per class on 2 busy
    # cores). A third of the steps at 3x the learning rate meets the same thresholds (loss and grad norm down by 90%,
    # greedy generation reproduces the training sequence) in a third of the time.
    training_overfit_steps = 100
    training_overfit_learning_rate = 3e-3
    # A test a variant skips although Llama passes it: name -> why (Quill does not support it). Checked at the end.
    not_supported: dict[str, str] = {}
    # A test expected to fail for a variant: name -> why. It still runs; a failed assertion is reported as xfail.
    expected_failures: dict[str, str] = {}

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, hidden_size=40,
                                          num_attention_heads=4)
        self.all_model_classes = self.model_tester.all_model_classes
        tester = self.model_tester
        self.pipeline_model_mapping = {
            "feature-extraction": tester.base_model_class,
            "text-classification": tester.sequence_classification_class,
            "text-generation": tester.causal_lm_class,
            "token-classification": tester.token_classification_class,
            "zero-shot": tester.sequence_classification_class,
        }
        reason = self.not_supported.get(self._testMethodName)
        if reason:
            self.skipTest(reason)

    def test_generation_tester_mixin_inheritance(self):
        self.skipTest(NO_GENERATION_MIXIN)

    # The test methods of transformers' CausalLMModelTest (tests/causal_lm_tester.py, not in the sdist).
    def test_config(self):
        try:
            self.config_tester.run_common_tests()
        except ValueError as error:
            if "test_config" in self.expected_failures and "must be positive" in str(error):
                pytest.xfail(f"{self.expected_failures['test_config']} [{error}]")
            raise

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def _sequence_classification(self, problem_type, labels):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.num_labels = 3
        config.problem_type = problem_type
        model = self.model_tester.sequence_classification_class(config).to(TORCH_DEVICE).eval()
        result = model(inputs["input_ids"], attention_mask=inputs["input_ids"].ne(1), labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, 3))
        self.assertTrue(torch.isfinite(result.loss))

    def test_sequence_classification_model(self):
        self._sequence_classification(None, ids_tensor([self.model_tester.batch_size], 2))

    def test_sequence_classification_model_for_single_label(self):
        self._sequence_classification("single_label_classification", ids_tensor([self.model_tester.batch_size], 2))

    def test_sequence_classification_model_for_multi_label(self):
        labels = ids_tensor([self.model_tester.batch_size, 3], 2).float()
        self._sequence_classification("multi_label_classification", labels)

    def test_token_classification_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.num_labels = 3
        model = self.model_tester.token_classification_class(config).to(TORCH_DEVICE).eval()
        labels = ids_tensor([self.model_tester.batch_size, self.model_tester.seq_length], 3)
        result = model(inputs["input_ids"], attention_mask=inputs["input_ids"].ne(1), labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, self.model_tester.seq_length, 3))
        self.assertTrue(torch.isfinite(result.loss))


# Features of Llama that Quill does not have; the tests of them are skipped for every Quill variant, with this reason.
QUILL_NOT_SUPPORTED = {
    **dict.fromkeys(
        ("test_model_rope_scaling_frequencies", "test_model_rope_scaling_from_config_0_linear",
         "test_model_rope_scaling_from_config_1_dynamic", "test_model_rope_scaling_from_config_2_yarn"),
        "Quill implements plain RoPE (`rope_theta`) only: no `rope_parameters`, hence no linear/dynamic/yarn scaling"),
    **dict.fromkeys(
        ("test_capture_outputs_decorator", "test_can_capture_specific_layers_hidden_states"),
        "Quill collects hidden states and attention maps in its own forward; transformers' `capture_outputs` "
        "machinery (transformers.utils.output_capturing) is internal API, which the exported modeling file must not use"),
    **dict.fromkeys(("test_tp_plan_matches_params", "test_tied_head_has_a_tp_plan_entry"),
                    "Quill defines no tensor-parallel plan (`base_model_tp_plan`)"),
}
# transformers 5.1's ConfigTester builds the config with each common size set to 0..3 (`hidden_size=0`, ...) and
# expects it to be accepted; QuillConfig rejects non-positive sizes with a ValueError on purpose. Later versions
# (5.23, 5.24) no longer do this, and test_config passes there.
_CONFIG_TESTER_BUILDS_ZERO_SIZES = "**{name: idx}" in inspect.getsource(ConfigTester.create_and_test_config_common_properties)
QUILL_EXPECTED_FAILURES = {
    "test_config": "QuillConfig rejects the zero sizes transformers 5.1's ConfigTester constructs (by design)",
} if _CONFIG_TESTER_BUILDS_ZERO_SIZES else {}


class QuillModelTest(DecoderModelTest, unittest.TestCase):
    model_tester_class = QuillModelTester
    not_supported = QUILL_NOT_SUPPORTED
    expected_failures = QUILL_EXPECTED_FAILURES


class LlamaModelTest(DecoderModelTest, unittest.TestCase):
    """The control: the same tester shape and the same mixins on transformers' Llama."""

    model_tester_class = LlamaModelTester


# The subset of the mixin the non-default Quill variants run (unless PIPELINE_TRANSFORMERS_SUITE_FULL=1): where
# positions or key/value heads change the code path: forward shapes and masks, attention outputs, caches across
# attention kernels, save/load and init, training and checkpointing.
VARIANT_TESTS = {
    "test_model",
    "test_config",
    "test_sequence_classification_model",
    "test_token_classification_model",
    "test_attention_outputs",
    "test_hidden_states_output",
    "test_batching_equivalence",
    "test_save_load",
    "test_can_init_all_missing_weights",
    "test_init_weights_can_init_buffers",
    "test_training",
    "test_training_gradient_checkpointing",
    "test_inputs_embeds",
    "test_inputs_embeds_matches_input_ids",
    "test_resize_tokens_embeddings",
    "test_model_is_small",
    "test_sdpa_can_dispatch_non_composite_models",
}
# Parameterized families (one test per dtype/padding case): their fp32 cases run too.
VARIANT_TEST_FAMILIES = ("test_eager_matches_sdpa_inference_", "test_eager_matches_batched_and_grouped_inference_")


def _in_variant_subset(name: str) -> bool:
    return name in VARIANT_TESTS or (name.startswith(VARIANT_TEST_FAMILIES) and "fp32" in name)


def _xfail_on_assertion(method, reason: str):
    """Run the test; an assertion failure becomes an xfail carrying `reason` (a pass stays a pass)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except AssertionError as error:
            pytest.xfail(f"{reason} [{str(error).splitlines()[0][:200]}]")

    return wrapper


def _variant(name: str, tester: type, doc: str, expected_failures: dict[str, str] | None = None) -> type:
    attributes = {"model_tester_class": tester, "__doc__": doc, "__module__": __name__, "__qualname__": name,
                  "expected_failures": {**QUILL_EXPECTED_FAILURES, **(expected_failures or {})},
                  "not_supported": QUILL_NOT_SUPPORTED}
    for attribute in dir(DecoderModelTest):
        if not attribute.startswith("test_") or not callable(getattr(DecoderModelTest, attribute)):
            continue  # flags such as `test_resize_embeddings` are settings, not tests
        if not FULL and not _in_variant_subset(attribute):
            attributes[attribute] = None  # not collected: see VARIANT_TESTS
        elif attribute in (expected_failures or {}):
            attributes[attribute] = _xfail_on_assertion(getattr(DecoderModelTest, attribute),
                                                        expected_failures[attribute])
    return type(name, (DecoderModelTest, unittest.TestCase), attributes)


QuillGQAModelTest = _variant("QuillGQAModelTest", QuillGQAModelTester, "Quill with 2 key/value heads for 4 query heads.")
QuillSinusoidalModelTest = _variant(
    "QuillSinusoidalModelTest", QuillSinusoidalModelTester,
    "Quill with fixed sinusoidal positions added to the embeddings.",
    expected_failures={
        # Runs only with PIPELINE_TRANSFORMERS_SUITE_FULL=1 (not in VARIANT_TESTS). Measured on transformers 5.24: the
        # loss falls by > 90% but the gradient norm by 81-88% (300 steps at 1e-3: 88%), short of the 90% threshold.
        # Likely cause: the fixed encoding has amplitude 1 while token embeddings start at std 0.02, and Quill
        # does not scale embeddings by sqrt(hidden_size) as "Attention Is All You Need" does. A modelling choice to
        # revisit, not a crash; the RoPE, GQA and learned-position variants and Llama pass.
        "test_training_overfit": "sinusoidal Quill overfits the fixed batch too slowly for the grad-norm threshold",
    },
)
QuillLearnedModelTest = _variant("QuillLearnedModelTest", QuillLearnedModelTester,
                                 "Quill with a learned position table (GPT-2 style).")

QUILL_CLASSES = (QuillModelTest, QuillGQAModelTest, QuillSinusoidalModelTest, QuillLearnedModelTest)
MIN_LLAMA_PASSED = 60  # the control must really have run: far more than this pass for Llama on every version


def test_quill_passes_every_test_llama_passes(request):
    """Every common test that passed for Llama passed for each Quill variant (those it ran), or that variant skips it
    with a documented reason in `not_supported`. Must run after the test classes above (it is last in the file)."""
    # Outcomes are recorded per process: under pytest-xdist this needs `--dist loadfile` (see README), and
    # the `missing` check below fails loudly if the Llama tests ran in another worker.
    collected = defaultdict(set)
    for item in request.session.items:
        if item.parent is not None and item.module is sys.modules[__name__] and item.cls is not None:
            collected[item.cls.__name__].add(item.name)
    if not collected["LlamaModelTest"]:
        pytest.skip("the Llama control was not selected in this run, so there is nothing to compare Quill against")

    llama = OUTCOMES["LlamaModelTest"]
    missing = collected["LlamaModelTest"] - set(llama)
    assert not missing, f"{len(missing)} selected Llama tests did not run before this check: {sorted(missing)[:10]}"
    llama_passed = {name for name, (outcome, _) in llama.items() if outcome == "passed"}
    assert len(llama_passed) >= MIN_LLAMA_PASSED or len(collected["LlamaModelTest"]) < MIN_LLAMA_PASSED, (
        f"only {len(llama_passed)} Llama tests passed: the harness is broken, the comparison would be vacuous")

    problems = []
    compared = 0
    for cls in QUILL_CLASSES:
        outcomes = OUTCOMES[cls.__name__]
        for name in sorted(llama_passed & collected[cls.__name__]):
            compared += 1
            outcome, reason = outcomes.get(name, ("not run", ""))
            if outcome == "passed":
                continue
            documented = cls.not_supported.get(name) or cls.expected_failures.get(name)
            if outcome in ("skipped", "xfailed") and documented and reason.startswith(documented):
                continue
            problems.append(f"{cls.__name__}::{name}: {outcome} {reason}".strip())
    assert compared > 0, "no Quill test was selected alongside the Llama control"
    assert not problems, "passed for Llama but not for Quill:\n" + "\n".join(problems)
