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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

__all__ = ["RunArtifacts", "TunedModel", "base_model", "check_model_folder", "tuned_model"]


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
    local folder that is missing or holds no ``config.json`` raises `FileNotFoundError` naming the fix, so a stage
    fails before any compute."""
    if recipe.runs("finetune") and recipe.finetune.base is not None:
        location, key = recipe.finetune.base, "finetune.base"
    elif recipe.runs("pretrain"):
        location, key = str(RunArtifacts.of(recipe).pretrain), None
    elif recipe.model.path is not None:
        location, key = recipe.model.path, "model.path"
    else:
        raise ValueError("the recipe names no model: set model.path, enable pretrain, or set finetune.base")
    if check:
        check_model_folder(location, key)
    return location


def check_model_folder(location: str, key: str | None) -> None:
    """Raise `FileNotFoundError` when ``location`` is local but holds no model; a Hub id passes (it is not fetched).
    ``key`` names the recipe field that gave it; None means this run's pretrain output."""
    if not is_local(location):
        return
    path = Path(location).expanduser()
    if (path / "config.json").is_file():
        return
    if key is None:
        raise FileNotFoundError(
            f"the base model {path} does not exist (or holds no config.json): the pretrain stage has not run. Fix: run "
            "pretraining first (pretrain.enabled: true), or set finetune.base to a model folder or Hub id."
        )
    what = "holds no config.json" if path.is_dir() else "does not exist"
    raise FileNotFoundError(
        f"{key} {location!r} {what}. Fix: point it at a save_pretrained model folder or a Hub id 'owner/name'."
    )


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
