"""The map of a run's artefacts, and the one place that decides which model is the base and which the tuned one.

    output_dir/
      recipe.yaml                 the resolved recipe the run was started with
      tokenizer/                  tokenizer stage: a `save_pretrained` tokenizer (+ fertility.json)
      pretrain/                   pretrain stage: a `save_pretrained` model, metrics.jsonl, checkpoints/
      finetune/adapter/           finetune stage: the PEFT adapter (+ tokenizer)
      finetune/merged/            finetune stage with `finetune.merge`: the adapter merged into the base
      eval/                       evaluate stage: report.json, report.md, *.png
      hub/upload/                 hub stage: the folder pushed in one commit

Every stage, command and test finds a path here rather than joining strings, and asks `base_model` / `tuned_model`
which model is which, so the answer is the same everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

__all__ = ["MODEL_WEIGHTS", "TOKENIZER_FILES", "RunArtifacts", "TunedModel", "base_key", "base_model", "check_model_folder",
           "is_local", "model_folder_problem", "portable_location", "tokenizer_folder_problem", "tuned_model"]


@dataclass(frozen=True)
class RunArtifacts:
    """The folders and files of one run, rooted at ``recipe.output_dir``."""

    root: Path

    @classmethod
    def of(cls, recipe: Recipe) -> RunArtifacts:
        return cls(Path(recipe.output_dir))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def adapter(self) -> Path:
        return self.finetune / "adapter"

    @property
    def merged(self) -> Path:
        return self.finetune / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.eval / "report.json"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def upload(self) -> Path:
        return self.hub / "upload"

    def stage_folder(self, stage: str) -> Path:
        """The folder a stage owns (the runner keeps its `stage.json` marker there)."""
        folders = {"tokenizer": self.tokenizer, "pretrain": self.pretrain, "finetune": self.finetune,
                   "evaluate": self.eval, "hub": self.hub}
        if stage not in folders:
            raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(folders)}")
        return folders[stage]

    def loss_curves(self) -> list[Path]:
        """The training stages' loss plots that exist."""
        return [path for path in (self.pretrain / "loss_curve.png", self.finetune / "loss_curve.png") if path.is_file()]


def base_model(recipe: Recipe, *, check: bool = True) -> str:
    """The base: what fine-tuning starts from, what evaluation compares the tuned model with, what the hub pushes
    when nothing is merged.

    ``finetune.base`` when fine-tuning runs and names one (the loaded recipe fills it with ``model.path`` when
    pretraining is off), else this run's ``pretrain/`` when pretraining runs, else ``model.path``. With ``check``, a
    local folder that is missing or holds no model raises `FileNotFoundError` naming the fix, so a stage fails
    before any compute."""
    if recipe.runs("finetune") and recipe.finetune.base is not None:
        location, key = recipe.finetune.base, base_key(recipe)
    elif recipe.runs("pretrain"):
        location, key = str(RunArtifacts.of(recipe).pretrain), None
    elif recipe.model.path is not None:
        location, key = recipe.model.path, "model.path"
    else:
        raise ValueError("the recipe names no model: set model.path, enable pretrain, or set finetune.base")
    if check:
        check_model_folder(location, key)
    return location


def base_key(recipe: Recipe) -> str:
    """The recipe field the user wrote the fine-tuning base in: ``model.path`` when ``finetune.base`` was filled
    from it (pretraining off), else ``finetune.base``."""
    return "model.path" if recipe.finetune.base == recipe.model.path else "finetune.base"


MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""The weight files `from_pretrained` looks for in a model folder (transformers' SAFE_WEIGHTS_NAME and siblings)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""Either one makes a folder a tokenizer `AutoTokenizer.from_pretrained` loads."""


def check_model_folder(location: str, key: str | None) -> None:
    """Raise `FileNotFoundError` when ``location`` is local but holds no model; a Hub id passes (it is not fetched).
    ``key`` names the recipe field that gave it; None means this run's pretrain output."""
    problem = model_folder_problem(location)
    if problem is None:
        return
    if key is None:
        raise FileNotFoundError(
            f"the base model {Path(location).expanduser()} does not exist (or holds no config.json): the pretrain stage "
            "has not run. Fix: run pretraining first (pretrain.enabled: true), or set finetune.base to a model folder "
            "or Hub id."
        )
    raise FileNotFoundError(f"{key} {problem}")


def model_folder_problem(location: str, *, weights: bool = False) -> str | None:
    """What is wrong with ``location`` as a model (its recipe key goes in front), or None: a local folder with a
    config.json (and, with ``weights``, a weight file), or a Hub id (not fetched)."""
    if not is_local(location):
        return None
    path = Path(location).expanduser()
    fix = "Fix: point it at a save_pretrained model folder or a Hub id 'owner/name'."
    if not path.is_dir():
        return f"{location!r} does not exist. {fix}"
    if not (path / "config.json").is_file():
        return f"{location!r} holds no config.json. {fix}"
    if weights and not any((path / name).is_file() for name in MODEL_WEIGHTS):
        return f"{location!r} holds a config.json but no weights ({', '.join(MODEL_WEIGHTS[::2])}). {fix}"
    return None


def tokenizer_folder_problem(location: str) -> str | None:
    """What is wrong with ``location`` as a tokenizer, or None: a local folder with a tokenizer file, or a Hub id."""
    if not is_local(location):
        return None
    path = Path(location).expanduser()
    fix = "Fix: point it at a folder written by tokenizer.save_pretrained (or a model folder that holds one), or a Hub id."
    if not path.is_dir():
        return f"{location!r} does not exist. {fix}"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"{location!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}). {fix}"
    return None


def is_local(location: str) -> bool:
    """A local path (it exists, starts like one, or is no valid Hub id) rather than a Hub id such as 'owner/name'."""
    if Path(location).expanduser().exists() or location.startswith((".", "/", "~")):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(location)
    except HFValidationError:
        return True
    return False


def portable_location(location: str | Path, start: str | Path | None = None) -> str:
    """How a saved file names another model: a Hub id as it is; a local path relative to ``start`` (default: the
    working directory), POSIX-style, like the relative paths a recipe is written with. An absolute path would break
    on any other machine and tell the readers of a card where the author keeps their files."""
    location = str(location)
    if not is_local(location):
        return location
    relative = os.path.relpath(os.path.abspath(os.path.expanduser(location)), os.path.abspath(start or os.curdir))
    return Path(relative).as_posix()


@dataclass(frozen=True)
class TunedModel:
    """What the finetune stage left: its adapter folder, its merged folder (each None when absent) and its task."""

    adapter: Path | None
    merged: Path | None
    classifier: bool

    @property
    def causal_lm(self) -> Path | None:
        """The tuned model as a causal LM. A merged classifier has no usable LM head, so language modelling of a
        classifier goes through its adapter on the causal LM (what the tuning did to the body)."""
        return self.adapter if self.classifier else (self.merged or self.adapter)

    @property
    def head(self) -> Path | None:
        """The tuned classifier (merged folder or adapter); None for a causal LM."""
        return (self.merged or self.adapter) if self.classifier else None


def tuned_model(recipe: Recipe) -> TunedModel | None:
    """The tuned model of this run; None when fine-tuning is off. Raises `FileNotFoundError` when fine-tuning is on
    but has left neither an adapter nor a merged model."""
    if not recipe.runs("finetune"):
        return None
    run = RunArtifacts.of(recipe)
    adapter = run.adapter if (run.adapter / "adapter_config.json").is_file() else None
    merged = run.merged if (run.merged / "config.json").is_file() else None
    if adapter is None and merged is None:
        raise FileNotFoundError(
            f"no fine-tuned model in {run.finetune}: expected adapter/ (adapter_config.json) or merged/ (config.json). "
            "Fix: run the finetune stage first (pipeline run RECIPE --stages finetune), or set finetune.enabled: false "
            "to evaluate the base model alone."
        )
    return TunedModel(adapter, merged, classifier=recipe.finetune.task == "classification")
