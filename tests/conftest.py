"""Test-wide settings: nothing may reach the Hub, and caches live in a temporary directory."""

import os
import tempfile

# Must be set before huggingface_hub / datasets / evaluate are imported anywhere.
_HOME = tempfile.mkdtemp(prefix="pipeline-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HOME  # never a developer's real cache: stale tokenized data must not pass a test
for _variable in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_EVALUATE_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_variable, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: two workers with two torch threads each would fight over the cores (tiny models
    # measured many times slower oversubscribed); one thread per worker keeps every core busy with one test.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory):
    """A tiny Quill trained on Shakespeare (see trained_lm.py). Tests must not modify `trained_lm.model`."""
    from trained_lm import build

    return build(tmp_path_factory.mktemp("trained-lm"))


@pytest.fixture(scope="session")
def tiny_quill():
    """Factory of the tests' tiny Quill: ``tiny_quill(tokenizer, **config_overrides)`` (see tiny.py)."""
    from tiny import tiny_quill

    return tiny_quill
