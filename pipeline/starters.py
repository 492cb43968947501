"""`pipeline recipes`: the recipes and launch configs that ship with the package, listed, shown and copied.

They are the files of the repository's ``recipes/`` folder, installed as the `pipeline.recipes` package (see
pyproject.toml), and read here with `importlib.resources`, so a ``pip install`` user has them as a clone does. A
file's one-line purpose is its first header comment (after the editor's ``yaml-language-server`` line): the
recipes describe themselves, and no table here can drift from them.

    starters()               every shipped file: recipes (``quickstart``) then launch configs (``accelerate/fsdp``)
    find_starter(name)       one of them by name; an unknown name raises `UnknownStarter` with "did you mean"
    copy_starter(name, dest) a copy at ``dest`` (a file or a folder), never over an existing file; a recipe's
                             JSON Schema goes beside it when absent, so the editor line of its header still resolves
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; at run time any Traversable does
    from importlib.resources.abc import Traversable

__all__ = ["SCHEMA", "Starter", "UnknownStarter", "copy_note", "copy_starter", "find_starter", "listing", "purpose",
           "starters"]

PACKAGE = "pipeline.recipes"
SCHEMA = "recipe.schema.json"
"""The JSON Schema every recipe names in its first line (``# yaml-language-server: $schema=recipe.schema.json``)."""
_LAUNCH_FOLDER = "accelerate"
_MODELINE = "yaml-language-server:"


@dataclass(frozen=True)
class Starter:
    """One shipped file: a recipe (``pipeline run FILE``) or a launch config (``accelerate launch --config_file``)."""

    name: str  # "quickstart", "accelerate/fsdp": what `pipeline recipes show/copy` take
    kind: str  # "recipe" or "launch"
    purpose: str  # the first header comment line
    resource: Traversable

    @property
    def file(self) -> str:
        """The file's path inside the recipes folder, e.g. ``quickstart.yaml``, ``accelerate/fsdp.yaml``."""
        return f"{self.name}.yaml"

    def text(self) -> str:
        return self.resource.read_text(encoding="utf-8")


class UnknownStarter(LookupError):
    """A name that is no shipped recipe or launch config; the message lists them."""


def starters() -> list[Starter]:
    """Every shipped recipe (sorted by name), then every launch config."""
    root = _root()
    found = [_starter(entry, entry.name, "recipe") for entry in _yaml_files(root)]
    launch = _yaml_files(root / _LAUNCH_FOLDER)
    found += [_starter(entry, f"{_LAUNCH_FOLDER}/{entry.name}", "launch") for entry in launch]
    return found


def find_starter(name: str) -> Starter:
    """The shipped file called ``name`` (``quickstart``, ``quickstart.yaml``, ``accelerate/fsdp``)."""
    wanted = name.strip().removeprefix("recipes/").removesuffix(".yaml").removesuffix(".yml")
    available = starters()
    for starter in available:
        if starter.name == wanted:
            return starter
    names = [starter.name for starter in available]
    close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownStarter(f"no shipped recipe or launch config is called {name!r}: {hint}choose from {', '.join(names)} "
                         "(`pipeline recipes` lists them with their purpose)")


def copy_starter(name: str, dest: str | Path) -> list[Path]:
    """Copy the shipped file ``name`` to ``dest`` and return the files written (the copy first).

    ``dest`` is a file, or a folder when it is an existing folder or ends with a path separator (created if need
    be; the file keeps its own name there); a file name without a suffix gets ``.yaml``. An existing file is never
    overwritten: `FileExistsError` names it and nothing is written. A recipe whose header names the JSON Schema
    gets ``recipe.schema.json`` beside it unless one is already there (then that one is kept)."""
    starter = find_starter(name)
    target = _target(starter, Path(dest).expanduser(), str(dest).endswith(("/", "\\")))
    if target.exists():
        raise FileExistsError(f"{target} already exists: nothing was copied (a copy never overwrites). Fix: name "
                              "another file or folder, or remove that one first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("x", encoding="utf-8") as out:  # "x": refuse even if the file appeared since the check
        out.write(starter.text())
    written = [target]
    schema = target.parent / SCHEMA
    if starter.kind == "recipe" and f"$schema={SCHEMA}" in starter.text() and not schema.exists():
        schema.write_text(_root().joinpath(SCHEMA).read_text(encoding="utf-8"), encoding="utf-8")
        written.append(schema)
    return written


def _root() -> Traversable:
    try:
        return resources.files(PACKAGE)
    except ModuleNotFoundError:  # an editable install made before the recipes shipped maps no `pipeline.recipes`
        raise FileNotFoundError("the shipped recipes are not installed with this copy of pipeline. Fix: reinstall it "
                                "(`pip install -e .` in a clone, or `pip install --upgrade pipeline`)") from None


def _yaml_files(folder: Traversable) -> list[Traversable]:
    return sorted((entry for entry in folder.iterdir() if entry.is_file() and entry.name.endswith(".yaml")),
                  key=lambda entry: entry.name)


def _starter(entry: Traversable, file: str, kind: str) -> Starter:
    return Starter(name=file.removesuffix(".yaml"), kind=kind, purpose=purpose(entry.read_text(encoding="utf-8")),
                   resource=entry)


def purpose(text: str) -> str:
    """The first sentence of a YAML file's header comment, the editor's schema line left out ("" without one): up
    to the first full stop, or to a colon that introduces a command (``One GPU, bf16 autocast: `accelerate ...```)."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment = line.lstrip("#").strip()
        if comment and not comment.startswith(_MODELINE):
            return _SENTENCE_END.split(comment, maxsplit=1)[0]
    return ""


_SENTENCE_END = re.compile(r"(?<=\.)\s|:\s+`")


def _target(starter: Starter, dest: Path, as_folder: bool) -> Path:
    if as_folder or dest.is_dir():
        return dest / Path(starter.file).name
    return dest if dest.suffix else dest.with_suffix(".yaml")


def listing(found: list[Starter]) -> str:
    """The terminal listing: recipes, then launch configs, each name with its purpose."""
    width = max((len(starter.name) for starter in found), default=0) + 2
    groups = {"recipe": "recipes (pipeline run FILE; get one with: pipeline recipes copy NAME DEST)",
              "launch": "launch configs (accelerate launch --config_file FILE -m pipeline run RECIPE)"}
    lines = []
    for kind, title in groups.items():
        members = [starter for starter in found if starter.kind == kind]
        if members:
            lines += [title, *(f"  {starter.name:<{width}}{starter.purpose}" for starter in members)]
    return "\n".join(lines)


def copy_note(starter: Starter, copy: Path) -> str:
    """What to do with a fresh copy, and the one thing about it that surprises: where its output goes."""
    if starter.kind == "launch":
        return f"launch with: accelerate launch --config_file {copy} -m pipeline run RECIPE"
    import yaml  # PyYAML: the header's output_dir is a plain string whichever YAML rules apply

    output_dir = (yaml.safe_load(starter.text()) or {}).get("output_dir")
    return (f"check it with: pipeline run {copy} --dry-run\n"
            f"its output_dir ({output_dir}) is relative to the folder you run it from, not to the file")
