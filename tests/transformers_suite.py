"""Harness that runs transformers' own common model tests (``ModelTesterMixin`` & co.) against Quill.

Nothing of transformers is copied into this repository. At test time `load()`:

1. downloads the sdist of the *installed* transformers version from the package index with pip
   (``pip download transformers==X --no-binary :all: --no-deps``: PyPI, not the Hub, so ``HF_HUB_OFFLINE=1``
   from tests/conftest.py stays in force), and extracts its top-level ``tests/*.py`` into
   ``${PIPELINE_TEST_CACHE:-~/.cache/pipeline}/transformers-tests/<version>/tests/``. A second run finds the
   cache and costs nothing; another transformers version gets its own folder.
2. imports that folder as the package ``transformers_tests`` (our own ``tests/`` must not collide with it).
3. supplies, in memory, the modules those files import but the sdist does not ship (see `_SHIMS`), and writes
   the two data files they read by path (see `_write_data_shims`). Every shim says why it exists.

If the download fails, `load()` raises `SuiteUnavailable`; the test module turns that into a module-level skip,
or into a failure when ``PIPELINE_REQUIRE_TRANSFORMERS_SUITE=1`` (set in CI, where the suite must run).

`quill_in_name_tables()` puts Quill into the auto-class *name* tables the mixins consult (see there).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
REQUIRE_ENV = "PIPELINE_REQUIRE_TRANSFORMERS_SUITE"
VERSION = transformers.__version__
_COMPLETE = ".complete"  # written last: a folder without it is a half-finished extraction and is redone


class SuiteUnavailable(RuntimeError):
    """The sdist of the installed transformers could not be fetched (no network, no index, no pip)."""


def required() -> bool:
    """True when a missing suite must fail the run instead of skipping it (CI)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    base = os.environ.get("PIPELINE_TEST_CACHE") or os.path.join("~", ".cache", "pipeline")
    return Path(base).expanduser() / "transformers-tests"


def version_dir(version: str = VERSION) -> Path:
    return cache_root() / version


# ---------------------------------------------------------------------------------------------------------------
# 1. Fetch and extract
# ---------------------------------------------------------------------------------------------------------------
def _download_sdist(version: str, into: Path, timeout: float = 300) -> Path:
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
               "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SuiteUnavailable(f"`{' '.join(command)}` did not complete: {error}") from error
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if done.returncode != 0 or not archives:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SuiteUnavailable(f"could not download the transformers {version} sdist with pip (exit {done.returncode}): "
                               + " | ".join(tail))
    return archives[0]


def _extract_tests(archive: Path, version: str, into: Path) -> int:
    """Extract `transformers-<version>/tests/<name>.py` (top level only: that is all the sdist ships) into `into`."""
    prefix = f"transformers-{version}/tests/"
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(prefix) and name.endswith(".py")):
                continue
            relative = name[len(prefix):]
            if "/" in relative or relative.startswith("."):
                continue
            source = tar.extractfile(member)
            (into / relative).write_bytes(source.read())
            count += 1
    return count


def _write_data_shims(root: Path) -> None:
    """Files the sdist's tests read by path, relative to their own folder (a git checkout's layout):

    - ``tests/__init__.py``: empty. test_configuration_common.py calls ``direct_transformers_import(tests/)``,
      which executes that folder's ``__init__.py`` (empty in transformers' repository; not shipped in the sdist).
    - ``tests/utils/tiny_model_summary.json``: ``{}``. test_pipeline_mixin.py reads it at import to find the tiny
      Hub checkpoints of each architecture; it is not shipped, and Quill has none, so every pipeline test skips
      with transformers' own reason ("Could not find any model architecture in the tiny models JSON file").
    - ``src/transformers/__init__.py``: empty. test_pipeline_mixin.py calls
      ``direct_transformers_import(../src/transformers)``, which executes that file and then returns the
      *installed* ``sys.modules["transformers"]``; an empty file keeps the installed package untouched.
    """
    tests = root / "tests"
    (tests / "__init__.py").write_text("")
    (tests / "utils").mkdir(exist_ok=True)
    (tests / "utils" / "tiny_model_summary.json").write_text("{}\n")
    (root / "src" / "transformers").mkdir(parents=True, exist_ok=True)
    (root / "src" / "transformers" / "__init__.py").write_text("")


def ensure_tests(version: str = VERSION) -> Path:
    """The extracted ``tests/`` folder of transformers `version`, downloading it on the first call only."""
    final = version_dir(version)
    if (final / _COMPLETE).exists():
        return final / "tests"
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=final.parent) as scratch:
        scratch = Path(scratch)
        archive = _download_sdist(version, scratch / "download")
        staged = scratch / "staged"
        (staged / "tests").mkdir(parents=True)
        if _extract_tests(archive, version, staged / "tests") == 0 or not (staged / "tests" / "test_modeling_common.py").exists():
            raise SuiteUnavailable(f"{archive.name} has no tests/test_modeling_common.py")
        _write_data_shims(staged)
        (staged / _COMPLETE).write_text(f"transformers {version} sdist tests\n")
        if final.exists():  # a half-finished folder from an interrupted run
            shutil.rmtree(final, ignore_errors=True)
        try:
            staged.rename(final)  # atomic: concurrent runs either win or find the winner's complete folder
        except OSError:
            if not (final / _COMPLETE).exists():
                raise
    return final / "tests"


# ---------------------------------------------------------------------------------------------------------------
# 2./3. Import as `transformers_tests`, with shims for what the sdist does not ship
# ---------------------------------------------------------------------------------------------------------------
class ExportTesterMixin:
    """SHIM. The sdist does not ship tests/exporters/test_export.py; test_modeling_common.py (>= 5.2) imports
    `ExportTesterMixin` from it as the base class of `ModelTesterMixin`. Empty: its torch.export tests do not run."""


class GenerationTesterMixin:
    """SHIM. The sdist does not ship tests/generation/test_utils.py; test_modeling_common.py imports
    `GenerationTesterMixin` from it (only for an `issubclass` check). Empty, and our test classes do NOT inherit it:
    no `generate()` test of transformers runs here (tests/test_model.py covers generation)."""


# SHIM. The sdist does not ship tests/utils/test_configuration_utils.py, where transformers keeps
# `config_common_kwargs`: a non-default value for each common `PretrainedConfig` argument, which
# `ConfigTester.create_and_test_config_common_properties` passes to the config class and reads back.
# Ours lists the common arguments every supported 5.x version accepts, with non-default values.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label_a", 1: "label_b", 2: "label_c"},
    "label2id": {"label_a": 0, "label_b": 1, "label_c": 2},
    "problem_type": "multi_label_classification",
}


class _PipelineTestsStub:
    """SHIM. The sdist does not ship tests/pipelines/. transformers 5.1's test_pipeline_mixin.py imports one
    `*PipelineTests` class per task from there at module level (later versions import them lazily, by name). The
    mixin reads only `model_mapping` from them before it skips for want of a tiny Hub checkpoint."""

    model_mapping = None

    def __init__(self, *args, **kwargs):
        import unittest

        raise unittest.SkipTest("transformers' sdist does not ship tests/pipelines/ (the per-task pipeline tests)")


class _StubPipelinesFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `transformers_tests.pipelines.<anything>` with a module whose every attribute is a pipeline-tests stub."""

    prefix = f"{PACKAGE}.pipelines"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.prefix)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__doc__ = "SHIM: the sdist does not ship tests/pipelines/ (see transformers_suite._PipelineTestsStub)."

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (_PipelineTestsStub,), {})

        module.__getattr__ = __getattr__
        if spec.name == self.prefix:
            module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _shim_module(name: str, doc: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attrs)
    return module


def _install_shims() -> None:
    shims = {
        "exporters": _shim_module(f"{PACKAGE}.exporters", "SHIM: not shipped in the sdist."),
        "exporters.test_export": _shim_module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin.__doc__,
                                              ExportTesterMixin=ExportTesterMixin),
        "generation": _shim_module(f"{PACKAGE}.generation", "SHIM: not shipped in the sdist."),
        "generation.test_utils": _shim_module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin.__doc__,
                                              GenerationTesterMixin=GenerationTesterMixin),
        "utils.test_configuration_utils": _shim_module(
            f"{PACKAGE}.utils.test_configuration_utils", "SHIM: see transformers_suite.CONFIG_COMMON_KWARGS.",
            config_common_kwargs=CONFIG_COMMON_KWARGS),
    }
    for relative, module in shims.items():
        if relative in ("exporters", "generation"):
            module.__path__ = []  # a package, so that `.exporters.test_export` resolves
        sys.modules[f"{PACKAGE}.{relative}"] = module
    if not any(isinstance(finder, _StubPipelinesFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StubPipelinesFinder())


def load(version: str = VERSION) -> types.ModuleType:
    """Fetch (once) and import transformers' test package for `version`; returns the `transformers_tests` package.

    Raises `SuiteUnavailable` when it cannot be fetched. The package's own submodules are imported on demand:
    ``importlib.import_module("transformers_tests.test_modeling_common")``."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    tests_dir = ensure_tests(version)
    spec = importlib.util.spec_from_file_location(PACKAGE, tests_dir / "__init__.py",
                                                  submodule_search_locations=[str(tests_dir)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    # utils/ exists on disk (tiny_model_summary.json) without an __init__.py; the shim module below lives in memory.
    utils = _shim_module(f"{PACKAGE}.utils", "SHIM: not shipped in the sdist.")
    utils.__path__ = []
    sys.modules[f"{PACKAGE}.utils"] = utils
    _install_shims()
    package.TRANSFORMERS_VERSION = version
    package.SOURCE = tests_dir
    return package


# ---------------------------------------------------------------------------------------------------------------
# Registration in transformers' name tables
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quill_in_name_tables():
    """Put Quill's class names into the auto *name* tables the common tests consult, and take them out afterwards.

    `ModelTesterMixin` decides per class by name, e.g. ``model_class.__name__ in
    get_values(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)`` decides whether `_prepare_for_class(..., return_labels=True)`
    adds token labels, ``MODEL_MAPPING_NAMES`` marks base models (no loss in the training tests). ``pipeline``'s
    ``AutoModel*.register()`` calls only fill the lazy mappings' extra content, not these dicts, so an out-of-tree
    model is invisible there. We add ``"quill"`` to the four model-name dicts in memory (transformers' files are
    not touched). ``CONFIG_MAPPING_NAMES`` is deliberately left alone: the lazy auto mappings import
    ``transformers.models.<model_type>`` for every model type present in both, and there is no
    ``transformers.models.quill``. Scoped (a context manager, entered by a module fixture) because other code reads
    these dicts too, e.g. `Trainer` picks its label-smoothing shift from ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, and
    tests elsewhere in the session must see transformers as shipped."""
    from transformers.models.auto import modeling_auto

    entries = {
        "MODEL_MAPPING_NAMES": "QuillModel",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "QuillForCausalLM",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "QuillForSequenceClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "QuillForTokenClassification",
    }
    previous = {}
    for table, class_name in entries.items():
        names = getattr(modeling_auto, table)
        previous[table] = names.get("quill", _MISSING)
        names["quill"] = class_name
    try:
        yield
    finally:
        for table, value in previous.items():
            names = getattr(modeling_auto, table)
            if value is _MISSING:
                names.pop("quill", None)
            else:
                names["quill"] = value


_MISSING = object()
