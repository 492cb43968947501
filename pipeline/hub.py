"""Stage: publish. Write the model card, assemble a complete upload folder, push it to the Hub in one commit.

The folder is assembled and checked against what ``from_pretrained`` needs *before* any network call, and the
push is a single ``create_commit`` (atomic: the repo shows all of it or none of it). A push that fails for want of
a token, of a network or because the Hub errs raises :class:`HubPushError` and leaves the folder as it was, ready
for ``hf upload``.

Layout of the upload folder (= the repo)::

    README.md                          the model card
    config.json  generation_config.json  model.safetensors (or shards + index)
    configuration_*.py  modeling_*.py  remote code named by config.json's auto_map
    tokenizer.json  tokenizer_config.json ...
    adapter/                           a PEFT adapter, if any (``PeftModel.from_pretrained(..., subfolder="adapter")``)
    plots/                             PNGs the card links to
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import yaml
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
    is_offline_mode,
)
from huggingface_hub.errors import HfHubHTTPError

from pipeline.artifacts import RunArtifacts, base_model, is_local, portable_location
from pipeline.recipe import Recipe, recipe_to_dict

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["NAME", "HubTarget", "HubPushError", "write_model_card", "prepare_upload_folder", "push_to_hub", "run"]

NAME = "hub"


class HubTarget(Protocol):
    """Where and how to push: the recipe's ``hub:`` section (`pipeline.recipe.HubSection`) or any object with these
    attributes, so `push_to_hub` serves callers without a recipe too."""

    repo_id: str | None
    private: bool
    revision: str | None  # branch to push to, created from main if missing; None: main
    create_pr: bool  # open a pull request against `revision` (or main) instead of committing to it
    token: str | None  # None: the HF_TOKEN environment variable or the cached `hf auth login`
    commit_message: str


class HubPushError(RuntimeError):
    """A push that did not happen. The folder it was given is untouched and complete: the message says how to
    upload it by hand."""

    def __init__(self, folder: Path, cfg: HubTarget, reason: str):
        self.folder, self.repo_id = Path(folder), cfg.repo_id
        command = ["hf", "upload", cfg.repo_id or "<user>/<model>", str(self.folder), "."]
        if cfg.revision:
            command += ["--revision", cfg.revision]
        if cfg.create_pr:
            command.append("--create-pr")
        if cfg.private:
            command.append("--private")
        command += ["--commit-message", cfg.commit_message]
        super().__init__(
            f"Could not push to the Hub repo {cfg.repo_id}: {reason}\n"
            f"Nothing was lost: the folder {self.folder} is complete and unchanged. Once this is fixed, upload it "
            f"by hand with\n    {shlex.join(command)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------

# Recipe keys whose values must never reach a public README.
_SECRET_KEYS = {"token", "hf_token", "access_token", "api_key", "password", "secret"}
_HF_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def write_model_card(
    folder: Path,
    *,
    repo_id: str | None,
    recipe: Mapping | None,
    metrics: Mapping[str, Mapping[str, float]] | None,
    plots: Sequence[str] = (),
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    license: str = "apache-2.0",
) -> Path:
    """Write ``folder/README.md``: Hub metadata (YAML) and a human-readable card.

    Args:
        folder: the upload folder; the card inspects it (``config.json``'s ``auto_map``, an ``adapter/``) to
            write loading instructions that work for what is there.
        repo_id: where the model will live, for the loading snippet. ``None`` writes a placeholder.
        recipe: the resolved recipe, shown as YAML; tokens and passwords in it are redacted.
        metrics: ``{model label: {metric: value}}``, e.g. ``{"base": {...}, "tuned": {...}}``, one table row per
            label. The **last** row describes the uploaded model: it becomes the ``model-index`` eval results.
        plots: PNG files (absolute, or relative to ``folder``); files outside ``folder`` are copied into
            ``folder/plots/``, and the card links them relatively so they render on the Hub.
        base_model: Hub id of the model this one was fine-tuned from (the model an adapter applies to).
        datasets: Hub ids of the training datasets; the last one is named as the evaluation dataset.
        tags: extra Hub tags.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write a model card: {folder} is not a directory")
    name = (repo_id or folder.name).split("/")[-1]
    links = list(dict.fromkeys(_place_plot(folder, plot) for plot in plots))
    has_adapter = (folder / "adapter").is_dir()

    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pipeline", "text-generation", *(["peft", "lora"] if has_adapter else []), *tags],
        datasets=list(datasets) or None,
        base_model=base_model,
        # ModelCardData refuses eval_results without a model_name.
        model_name=name,
        eval_results=_eval_results(metrics, dataset=datasets[-1] if datasets else "custom") or None,
    )
    sections = [
        f"# {name}",
        _summary(base_model, datasets),
        _how_to_load(folder, repo_id, base_model, has_adapter),
        _recipe_section(recipe),
        _metrics_section(metrics),
        _plots_section(links),
        _INTENDED_USE,
        _LIMITATIONS,
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"
    path = folder / "README.md"
    ModelCard(content).save(path)  # parsing first: a card the Hub cannot read fails here, not at upload time
    return path


def _place_plot(folder: Path, plot: str | Path) -> str:
    """Return the card's relative link to ``plot``, copying it into ``folder/plots/`` if it lives elsewhere."""
    source = Path(plot) if Path(plot).is_absolute() else folder / plot
    if not source.is_file():
        raise FileNotFoundError(f"plot {plot} does not exist (relative plot paths are taken from {folder})")
    if not source.resolve().is_relative_to(folder.resolve()):
        target = folder / "plots" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(source, target)
        source = target
    return source.resolve().relative_to(folder.resolve()).as_posix()


def _eval_results(metrics: Mapping[str, Mapping[str, float]] | None, dataset: str) -> list[EvalResult]:
    if not metrics:
        return []
    final = list(metrics.values())[-1]
    return [
        EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                   metric_name=metric, metric_value=float(value))
        for metric, value in final.items()
        if value is not None and math.isfinite(value)  # the Hub's metadata schema has no NaN
    ]


def _summary(base_model: str | None, datasets: Sequence[str]) -> str:
    text = "A small causal language model trained end to end from one YAML recipe with `pipeline`"
    if base_model:
        text += f", fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
    if datasets:
        text += " on " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets)
    return text + "."


def _how_to_load(folder: Path, repo_id: str | None, base_model: str | None, has_adapter: bool) -> str:
    repo = repo_id or "<user>/<model>"
    config = _read_json(folder / "config.json")
    # Built-in architectures need no remote code; ours (auto_map) does, and then the revision must be pinned.
    remote = ", trust_remote_code=True" if config is None or "auto_map" in config else ""
    code = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'repo = "{repo}"',
        'revision = "<commit sha>"  # pin a commit: the weights, and any code the repo runs, stay the ones you read',
        f"model = AutoModelForCausalLM.from_pretrained(repo{remote}, revision=revision)",
        f"tokenizer = AutoTokenizer.from_pretrained(repo{remote}, revision=revision)",
    ]
    if has_adapter:
        base = f'"{base_model}"{remote}' if base_model else f"repo{remote}, revision=revision"
        code += [
            "",
            "# Or the LoRA adapter in adapter/, on top of the model it was trained from:",
            "from peft import PeftModel",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({base})",
            'model = PeftModel.from_pretrained(base, repo, subfolder="adapter", revision=revision)',
        ]
    return "## How to load\n\n```python\n" + "\n".join(code) + "\n```"


def _recipe_section(recipe: Mapping | None) -> str:
    if not recipe:
        return ""
    text = yaml.safe_dump(_plain(recipe), sort_keys=False, allow_unicode=True).strip()
    return f"## Training recipe\n\nThe resolved recipe of the run that made this model:\n\n```yaml\n{text}\n```"


def _plain(value: Any) -> Any:
    """A recipe mapping (`recipe_to_dict`, which already drops ``hub.token``) -> YAML-safe builtins, paths and enums as
    text, with anything that looks like a secret redacted and absolute paths made relative (they would tell where the
    author keeps their files): the card may be given any mapping, and is public."""
    if isinstance(value, Mapping):
        return {
            str(k): "<redacted>" if str(k).lower() in _SECRET_KEYS and v is not None else _plain(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        return _HF_TOKEN_VALUE.sub("<redacted>", portable_location(value) if os.path.isabs(value) else value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _metrics_section(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    if not metrics:
        return ""
    names = list(dict.fromkeys(m for row in metrics.values() for m in row))  # first-seen order

    def cell(value: float | None) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(row.get(m)) for m in names) + " |" for label, row in metrics.items()]
    return "## Evaluation\n\n" + "\n".join(lines)


def _plots_section(links: Sequence[str]) -> str:
    if not links:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{Path(link).stem}]({quote(link)})" for link in links)


_INTENDED_USE = """## Intended use

A demonstration of a reproducible Hugging Face training pipeline (tokenizer, pretraining, LoRA fine-tuning,
evaluation, publication). Use it to learn, test and compare pipelines, not to answer questions."""

_LIMITATIONS = """## Limitations

- A tiny model trained on little, toy data: its text is often wrong, repetitive or meaningless.
- Not evaluated for safety, bias or factual accuracy.
- **Not for clinical use**: nothing it writes about medicine, diagnoses or codes may inform care."""


# ---------------------------------------------------------------------------------------------------------------
# Upload folder
# ---------------------------------------------------------------------------------------------------------------

# Artifact role -> where its files go in the repo. Model and tokenizer share the root, where from_pretrained looks.
_ROLES = {"": "", "model": "", "tokenizer": "", "adapter": "adapter", "plots": "plots"}

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


_NOT_UPLOADED = {"README.md", "stage.json"}  # an old card; the runner's bookkeeping


def prepare_upload_folder(artifacts: Mapping[str, Path], staging_dir: Path, **card_kwargs: Any) -> Path:
    """Assemble a complete, ready-to-upload folder in ``staging_dir`` and write its model card.

    Args:
        artifacts: role -> ``save_pretrained`` folder (or single file). Roles: ``"model"`` (or ``""``) and
            ``"tokenizer"`` go to the repo root, ``"adapter"`` to ``adapter/``, ``"plots"`` (a folder of PNGs or
            one PNG) to ``plots/``. The files directly inside each folder are copied; hidden files, subfolders
            and any old ``README.md`` are not.
        staging_dir: a new or empty directory; it becomes the repo.
        card_kwargs: :func:`write_model_card`'s keyword arguments (``repo_id``, ``recipe``, ``metrics`` ...).

    Raises:
        FileNotFoundError: an artifact does not exist, or the assembled folder lacks a file ``from_pretrained``
            needs (all such files are named).
        ValueError: an unknown role, or two artifacts holding the same file name with different contents.
    """
    if unknown := set(artifacts) - _ROLES.keys():
        raise ValueError(f"unknown artifact role(s) {sorted(unknown)}; use {sorted(r for r in _ROLES if r)}")
    staging_dir = Path(staging_dir)
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise FileExistsError(
            f"staging_dir {staging_dir} is not empty: pass a new directory, so that no stale file gets pushed"
        )
    staging_dir.mkdir(parents=True, exist_ok=True)

    placed: dict[Path, Path] = {}  # destination -> source, to catch two artifacts writing one file
    for role, source in artifacts.items():
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"artifact {role or 'model'!r}: {source} does not exist")
        for file in [source] if source.is_file() else sorted(source.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.name not in _NOT_UPLOADED:
                _place(file, staging_dir / _ROLES[role] / file.name, placed)

    _require_complete(staging_dir)
    plots = [p.relative_to(staging_dir).as_posix() for p in sorted((staging_dir / "plots").glob("*.png"))]
    card = {"repo_id": None, "recipe": None, "metrics": None, **card_kwargs}
    card["plots"] = [*plots, *card.get("plots", ())]
    write_model_card(staging_dir, **card)
    return staging_dir


def _place(source: Path, target: Path, placed: dict[Path, Path]) -> None:
    if target in placed:
        if filecmp.cmp(placed[target], source, shallow=False):
            return  # e.g. the tokenizer saved both next to the model and on its own: same file, keep one
        raise ValueError(f"{target.name} is in both {placed[target].parent} and {source.parent} with different "
                         "contents: pass only the folder whose copy is right")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)  # a copy, not a link: later writes to the run's folders cannot change the upload
    placed[target] = source


def _require_complete(folder: Path) -> None:
    if missing := _missing_files(folder):
        raise FileNotFoundError(
            f"{folder} cannot be loaded with from_pretrained; it lacks:\n  - " + "\n  - ".join(missing)
            + "\nPass the save_pretrained folders of the model and of the tokenizer as artifacts."
        )


def _missing_files(folder: Path) -> list[str]:
    """What ``from_pretrained`` (model, tokenizer, remote code, adapter) would fail to find in ``folder``."""
    missing = []
    config = _read_json(folder / "config.json")
    if config is None:
        missing.append("config.json (the model configuration)")
    if not any((folder / name).is_file() for name in _WEIGHTS):
        missing.append(f"the weights: one of {', '.join(_WEIGHTS)}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = _read_json(folder / index_name) or {}
        missing += [f"{shard} (listed in {index_name})" for shard in sorted(set(index.get("weight_map", {}).values()))
                    if not (folder / shard).is_file()]
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    if tokenizer_config is None:
        missing.append("tokenizer_config.json (the tokenizer)")
    if not any((folder / name).is_file() for name in _TOKENIZER_VOCAB):
        missing.append(f"the tokenizer vocabulary: one of {', '.join(_TOKENIZER_VOCAB)}")
    code_files = _remote_code_files(folder, config, tokenizer_config)
    missing += [f"{name} (remote code named by auto_map)" for name in code_files if not (folder / name).is_file()]
    if (folder / "adapter").is_dir():
        if not (folder / "adapter" / "adapter_config.json").is_file():
            missing.append("adapter/adapter_config.json")
        if not any((folder / "adapter" / name).is_file() for name in _ADAPTER_WEIGHTS):
            missing.append(f"the adapter weights: adapter/{_ADAPTER_WEIGHTS[0]}")
    return missing


def _remote_code_files(folder: Path, *configs: dict | None) -> list[str]:
    """The ``.py`` files that ``trust_remote_code`` loading imports: the modules named by ``auto_map`` (e.g.
    ``"modeling_quill.QuillForCausalLM"``) and, transitively, their ``from .x import`` neighbours."""
    modules: list[str] = []
    for config in configs:
        for ref in (config or {}).get("auto_map", {}).values():
            for name in ref if isinstance(ref, list) else [ref]:  # tokenizers map to [slow, fast]
                if name and "--" not in name:  # "other/repo--module.Class" lives in another repo
                    modules.append(name.rsplit(".", 1)[0])
    files: list[str] = []
    while modules:
        file = modules.pop().replace(".", "/") + ".py"
        if file in files:
            continue
        files.append(file)
        if (folder / file).is_file():
            modules += re.findall(r"^\s*from\s+\.(\w+)\s+import", (folder / file).read_text(), flags=re.M)
    return sorted(files)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------

# Transport failures (refused connection, DNS, timeout) are raised as the HTTP client's own errors (httpx in
# huggingface_hub 1.x, httpx2 in 2.x); HfHubHTTPError derives from that client's base error class.
_NETWORK_ERRORS = (OSError, HfHubHTTPError.__mro__[1])

# Weight files that, left over from an earlier push, would be loaded instead of the new ones (a stale
# model.safetensors wins over a new sharded index).
_WEIGHT_FILE = re.compile(
    r"(^|/)(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$"
)


def push_to_hub(folder: Path, cfg: HubTarget) -> CommitInfo:
    """Push ``folder`` (see :func:`prepare_upload_folder`) to ``cfg.repo_id`` as ONE commit.

    Creates the repo (``exist_ok``) and the ``cfg.revision`` branch if missing, then commits every file of the
    folder, deleting weight files of an earlier push that the folder no longer has, in a single atomic
    ``create_commit``. Returns the commit (a ``str``: its URL; ``.oid`` the commit sha, ``.pr_url`` the PR).

    Raises:
        ValueError / FileNotFoundError: no ``repo_id``, or the folder is incomplete (before any network call).
        HubPushError: no token, offline, unreachable Hub or a Hub error. The folder is left untouched.
    """
    folder = Path(folder)
    if not cfg.repo_id:
        raise ValueError("cannot push: hub.repo_id is not set (add `repo_id: <user>/<model-name>` to the recipe)")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push: {folder} is not a directory")
    _require_complete(folder)
    if is_offline_mode():
        raise HubPushError(folder, cfg, "HF_HUB_OFFLINE is set, so huggingface_hub makes no network call")
    token = cfg.token or get_token()
    if token is None:
        raise HubPushError(folder, cfg, "no Hugging Face token: set HF_TOKEN, run `hf auth login`, or set hub.token")

    api = HfApi(token=token)
    try:
        api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
        if cfg.revision and cfg.revision != "main":
            api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
        additions = [CommitOperationAdd(p.relative_to(folder).as_posix(), p) for p in _files(folder)]
        keep = {op.path_in_repo for op in additions}
        stale = [
            CommitOperationDelete(path)
            for path in api.list_repo_files(cfg.repo_id, revision=cfg.revision)
            if _WEIGHT_FILE.search(path) and path not in keep
        ]
        # One create_commit, not upload_folder: with hf_xet installed, upload_folder may split a folder over
        # several commits, and it refuses create_pr on a branch.
        return api.create_commit(
            cfg.repo_id,
            [*stale, *additions],
            commit_message=cfg.commit_message,
            revision=cfg.revision,
            create_pr=cfg.create_pr,
        )
    except _NETWORK_ERRORS as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise HubPushError(folder, cfg, f"{type(err).__name__}: {first_line}") from err


def _files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def run(recipe: Recipe, accelerator: Accelerator) -> CommitInfo | None:
    """The hub stage of a recipe: assemble `output_dir/hub/upload/` from the run's artefacts (the merged model if
    there is one, else the base, with the adapter under `adapter/`), write the card, push in one commit.
    Only the main process talks to the Hub."""
    if not accelerator.is_main_process:
        return None
    run_folders = RunArtifacts.of(recipe)
    shutil.rmtree(run_folders.upload, ignore_errors=True)  # rebuilt every time: nothing stale is pushed
    model, merged = _model_folder(recipe)
    artifacts: dict[str, Path] = {"model": model}
    if not (model / "tokenizer.json").is_file():  # stage folders carry the tokenizer they trained with
        artifacts["tokenizer"] = run_folders.tokenizer
    # The adapter is pushed only where its base can be had: the repo root itself (no merge), or the Hub. Next to a
    # merged model with a local base it would invite applying LoRA twice.
    base = base_model(recipe, check=False)
    hub_base = base if recipe.runs("finetune") and not is_local(base) else None
    if run_folders.adapter.is_dir() and recipe.runs("finetune") and (not merged or hub_base):
        artifacts["adapter"] = run_folders.adapter
    report = _read_json(run_folders.report) or {}
    plots = sorted(run_folders.eval.glob("*.png")) + run_folders.loss_curves()
    sources = [s.name for s in recipe.data.sources] + [s.name for s in recipe.finetune.data.sources]
    prepare_upload_folder(
        artifacts, run_folders.upload, repo_id=recipe.hub.repo_id, recipe=recipe_to_dict(recipe),
        metrics=card_metrics(report), plots=[str(p) for p in plots], base_model=hub_base if merged else None,
        datasets=[], tags=[name for name in dict.fromkeys(sources) if "/" not in name and "." not in name],
    )  # tags: corpus names, not paths or Hub ids
    if "adapter" in artifacts:  # it applies to the Hub base, or to the model at this repo's root
        _name_adapter_base(run_folders.upload / "adapter", hub_base or recipe.hub.repo_id)
    info = push_to_hub(run_folders.upload, recipe.hub)
    print(f"pushed {run_folders.upload} to {recipe.hub.repo_id}: {info} (pin revision={info.oid} for trust_remote_code loads)")
    return info


def _name_adapter_base(adapter: Path, base: str) -> None:
    """Point the uploaded copy of ``adapter_config.json`` at the base on the Hub, so that
    ``AutoPeftModelForCausalLM.from_pretrained(repo, subfolder="adapter")`` finds it (the run's copy keeps its path)."""
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_folder(recipe: Recipe) -> tuple[Path, bool]:
    """(the folder whose weights are pushed, whether it is the merged model)."""
    merged = RunArtifacts.of(recipe).merged
    if recipe.runs("finetune") and recipe.finetune.merge and merged.is_dir():
        return merged, True
    base = base_model(recipe, check=False)
    if not Path(base).is_dir():
        raise ValueError(
            f"the fine-tuned base {base} is not a local folder, so its weights cannot be uploaded with the adapter: "
            "set finetune.merge: true to push a merged model"
        )
    return Path(base), False


def card_metrics(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The evaluation report flattened to {"base": {"domain perplexity": ...}, "tuned": {...}} for the card."""
    rows: dict[str, dict[str, float]] = {}
    sections = [(name, report.get(name)) for name in ("general", "domain")]
    sections += [(task, entry) for task, entry in (report.get("tasks") or {}).items()]
    for label, entry in sections:
        for model in ("base", "tuned"):
            for metric, value in ((entry or {}).get(model) or {}).items():
                if isinstance(value, (int, float)) and metric not in ("tokens", "bytes", "documents"):
                    rows.setdefault(model, {})[f"{label} {metric}"] = float(value)
    return rows
