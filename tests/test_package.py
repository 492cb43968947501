"""The package's import contract: `import pipeline` and every `--help` stay light (no torch, no transformers), and
taking a Quill name from `pipeline` registers Quill with the Auto classes, as importing `pipeline.models.quill` does."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pipeline
from pipeline.cli import build_parser

HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets")


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def every_command(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Each command path of the CLI (`()`, `("run",)`, `("inspect", "tokens")`, ...), read from the parser itself."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += every_command(sub, (*prefix, name))
    return paths


def test_the_command_list_is_read_from_the_parser() -> None:
    commands = every_command(build_parser())
    assert {(), ("run",), ("schema",), ("inspect",), ("inspect", "tokens"), ("inspect", "decode")} <= set(commands)


def test_help_of_every_command_imports_neither_torch_nor_transformers() -> None:
    commands = [list(c) for c in every_command(build_parser())]
    loaded = json.loads(python(f"""
import contextlib, io, json, sys
from pipeline.cli import main
heavy = {{}}
for command in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*command, "--help"])
        except SystemExit:
            pass
    assert "usage: pipeline" in out.getvalue(), command
    heavy[" ".join(command)] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(heavy))
"""))
    assert len(loaded) == len(commands)
    assert not any(loaded.values()), loaded


def test_a_quill_name_registers_quill_with_the_auto_classes() -> None:
    out = python("""
import sys
import pipeline
assert "transformers" not in sys.modules  # the bare import registers nothing and loads nothing
from transformers import AutoConfig
try:
    AutoConfig.for_model("quill")
    print("known before")
except ValueError:
    print("unknown before")
config_class = pipeline.QuillConfig
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_config(AutoConfig.for_model("quill", vocab_size=64, hidden_size=16,
    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
print(type(AutoConfig.for_model("quill")) is config_class, type(model).__name__)
""")
    assert out.split() == ["unknown", "before", "True", "QuillForCausalLM"]


def test_the_package_exports_exactly_quills_names_and_the_version() -> None:
    from pipeline.models import quill

    assert pipeline.__all__ == [*quill.__all__, "__version__"]
    assert all(getattr(pipeline, name) is getattr(quill, name) for name in quill.__all__)
    assert set(pipeline.__all__) <= set(dir(pipeline))


def test_a_quill_saved_from_the_model_package_carries_its_code(tmp_path) -> None:
    """The registration is what makes `save_pretrained` copy configuration_quill.py and modeling_quill.py (remote code
    for users without this package), so it must come with the classes however they are imported."""
    from pipeline.models.quill.configuration_quill import QuillConfig
    from pipeline.models.quill.modeling_quill import QuillForCausalLM

    config = QuillConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    QuillForCausalLM(config).save_pretrained(tmp_path)
    assert {"configuration_quill.py", "modeling_quill.py"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_quill.QuillForCausalLM"
    )
