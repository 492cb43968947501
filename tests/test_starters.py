"""`pipeline recipes`: the shipped recipes are in the wheel and in an editable install, listed from their own headers,
shown as they are and copied without ever overwriting, and a copy is a recipe that loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe, yaml12
from pipeline.starters import (
    SCHEMA,
    UnknownStarter,
    copy_starter,
    find_starter,
    starters,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
LISTING = ("import json; from pipeline.starters import starters; import pipeline; "
           "print(json.dumps({'package': pipeline.__file__, 'files': {s.name: str(s.resource) for s in starters()}}))")


def shipped_names() -> list[str]:
    """What the recipes folder holds, read straight from the tree."""
    recipes = [path.stem for path in sorted(RECIPES.glob("*.yaml"))]
    launch = [f"accelerate/{path.stem}" for path in sorted((RECIPES / "accelerate").glob("*.yaml"))]
    return recipes + launch


def source_copy(tmp_path: Path) -> Path:
    """The project as pip sees it (no caches, no build folders), outside the checkout: building writes there."""
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("pipeline", "recipes"):
        shutil.copytree(ROOT / folder, project / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    return project


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def tree_files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


# ------------------------------------------------------------------------------------------ packaging


def test_the_wheel_ships_every_recipe_and_module_and_the_installed_listing_is_the_folder(tmp_path) -> None:
    project = source_copy(tmp_path)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(project)])
    (wheel,) = (tmp_path / "dist").glob("pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"pipeline/recipes/{name}" for name in tree_files(RECIPES)}
    modules = {f"pipeline/{name}" for name in tree_files(ROOT / "pipeline")}
    assert len(recipes) >= 8 and "pipeline/recipes/accelerate/fsdp.yaml" in recipes
    assert not recipes - names, f"left out of the wheel: {sorted(recipes - names)}"
    assert not modules - names, f"left out of the wheel (list the package in pyproject.toml): {sorted(modules - names)}"

    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    # From another folder, with the installed copy first on the path: the checkout is not read.
    listed = json.loads(run([sys.executable, "-c", LISTING], cwd=tmp_path,
                            env={"PYTHONPATH": str(site), "PATH": ""}).stdout)
    assert Path(listed["package"]).is_relative_to(site)
    assert list(listed["files"]) == shipped_names()
    assert all(Path(path).is_relative_to(site / "pipeline" / "recipes") for path in listed["files"].values())


def test_an_editable_install_reads_the_recipes_folder_itself(tmp_path) -> None:
    """`pip install -e .` (the README's install): setuptools' editable finder maps `pipeline.recipes` onto the
    top-level recipes/ folder, live: a recipe added after the install is listed."""
    project = source_copy(tmp_path)
    out = tmp_path / "editable"
    out.mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    wheel = out / run([sys.executable, "-c", build, str(out)], cwd=project).stdout.split()[-1]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (project / "recipes" / "mine.yaml").write_text("# yaml-language-server: $schema=recipe.schema.json\n"
                                                   "# Mine: added after the install.\noutput_dir: runs/mine\n")
    # -S: no site-packages, so only this install's .pth (and its finder) can provide `pipeline`.
    code = f"import site; site.addsitedir({str(site)!r}); " + LISTING
    listed = json.loads(run([sys.executable, "-S", "-c", code], cwd=tmp_path).stdout)
    assert Path(listed["package"]).is_relative_to(project / "pipeline")
    recipes = sorted([path.stem for path in RECIPES.glob("*.yaml")] + ["mine"])
    assert list(listed["files"]) == recipes + [name for name in shipped_names() if name.startswith("accelerate/")]
    assert Path(listed["files"]["mine"]) == project / "recipes" / "mine.yaml"


# ------------------------------------------------------------------------------------------ listing


def test_the_listing_is_the_folder_and_each_purpose_is_its_own_header() -> None:
    found = starters()
    assert [starter.name for starter in found] == shipped_names()
    for starter in found:
        path = RECIPES / starter.file
        assert starter.text() == path.read_text(encoding="utf-8")
        header = [line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#")]
        header = [line for line in header if line and "yaml-language-server" not in line]
        assert starter.purpose and header[0].startswith(starter.purpose), starter.name
        assert starter.kind == ("launch" if starter.name.startswith("accelerate/") else "recipe")
    quickstart = find_starter("quickstart")
    assert quickstart.purpose.startswith("Quickstart: the whole lifecycle")
    assert find_starter("recipes/quickstart.yaml") == quickstart  # the path as the README writes it


def test_an_unknown_name_says_which_it_meant_and_lists_them(capsys) -> None:
    with pytest.raises(UnknownStarter, match="did you mean 'quickstart'") as error:
        find_starter("quikstart")
    assert all(name in str(error.value) for name in shipped_names())
    assert main(["recipes", "show", "medical-lorax"]) == 2
    assert "did you mean 'medical-lora'" in capsys.readouterr().err


def test_the_commands_list_show_and_copy(tmp_path, capsys, monkeypatch) -> None:
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == shipped_names()
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {entry['name']}" in text and entry["purpose"] in text for entry in listed)
    assert main(["recipes", "show", "medical-lora"]) == 0
    assert capsys.readouterr().out == (RECIPES / "medical-lora.yaml").read_text(encoding="utf-8")

    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "quickstart", "mine/", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert written == ["mine/quickstart.yaml", f"mine/{SCHEMA}"]
    assert load_recipe("mine/quickstart.yaml").output_dir == tmp_path / "runs" / "quickstart"  # relative to the cwd
    assert main(["recipes", "copy", "quickstart", "mine/"]) == 2  # never over the first copy
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ copying


def test_a_copy_is_the_recipe_with_its_schema_and_loads(tmp_path, monkeypatch) -> None:
    written = copy_starter("quickstart", tmp_path / "mine")  # no suffix: a file, .yaml added
    copy, schema = tmp_path / "mine.yaml", tmp_path / SCHEMA
    assert written == [copy, schema]
    assert copy.read_text() == (RECIPES / "quickstart.yaml").read_text()
    assert schema.read_text() == (RECIPES / SCHEMA).read_text()
    # The editor line resolves beside the copy, and the copy satisfies that schema.
    jsonschema.Draft202012Validator(json.loads(schema.read_text())).validate(yaml12.load(copy.read_text()))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(copy)
    assert recipe.output_dir == tmp_path / "runs" / "quickstart"  # output_dir follows the working directory
    assert recipe.pretrain.max_steps == 1000


def test_a_copy_never_overwrites(tmp_path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / SCHEMA).write_text("{}")  # a schema already there is kept, not replaced
    assert copy_starter("medical-lora", folder) == [folder / "medical-lora.yaml"]
    assert (folder / SCHEMA).read_text() == "{}"
    (folder / "medical-lora.yaml").write_text("mine")
    with pytest.raises(FileExistsError, match="nothing was copied") as error:
        copy_starter("medical-lora", folder)
    assert "Fix:" in str(error.value)
    assert (folder / "medical-lora.yaml").read_text() == "mine"
    assert main(["recipes", "copy", "medical-lora", str(folder)]) == 2

    launch = copy_starter("accelerate/fsdp", tmp_path / "launch" / "fsdp.yaml")  # parents are created
    assert launch == [tmp_path / "launch" / "fsdp.yaml"]  # a launch config names no schema
    assert launch[0].read_text() == (RECIPES / "accelerate" / "fsdp.yaml").read_text()
