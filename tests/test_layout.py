"""The house rules of the package, checked on its source: stages stand on the core and never on each other, the
imports between modules form no cycle, and the exported model files import nothing of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = {"pipeline.tokenizer", "pipeline.pretrain", "pipeline.finetune", "pipeline.evaluation", "pipeline.hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """The `pipeline.*` modules a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import hub`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pipeline"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in internal_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_fixture_sees_the_whole_package() -> None:
    edges = graph()
    assert STAGES <= set(edges) and {"pipeline.runner", "pipeline.artifacts", "pipeline.recipe"} <= set(edges)
    assert "pipeline.artifacts" in edges["pipeline.finetune"]  # the scan reads real imports


def test_no_stage_imports_another_stage() -> None:
    edges = graph()
    offending = {stage: sorted(edges[stage] & (STAGES - {stage})) for stage in STAGES}
    assert not any(offending.values()), offending
    # The core below the stages does not reach back up to them, nor to the runner.
    core = set(edges) - STAGES - {"pipeline.runner", "pipeline.plan", "pipeline.cli", "pipeline.__main__"}
    upward = {module: sorted(edges[module] & (STAGES | {"pipeline.runner"})) for module in core}
    assert not any(upward.values()), upward


def test_module_imports_form_no_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            # A package's __init__ re-exporting its submodules is not a cycle of jobs.
            if nxt.startswith(node + "."):
                continue
            assert state.get(nxt) != "open", " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_exported_model_files_import_nothing_of_the_package() -> None:
    for path in (PACKAGE / "models" / "quill").glob("*_quill.py"):
        assert not internal_imports(path), path.name
