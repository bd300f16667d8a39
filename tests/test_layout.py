"""The package's shape: one subpackage per stage of the data's journey, imports only downward.

Every import of the package's own modules (at module level, inside functions, under
TYPE_CHECKING) is read from the source with ``ast``; an import from a later stage into an earlier
one, or any cycle between modules, fails with the modules named.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "platform" / "allinone"

# Stages in the order of the data's journey: each may import only from itself and those before it.
STAGES = (
    "base",  # atomic writes, one-line errors
    "models",  # the networks: torch only
    "config",  # typed configs
    "data",  # images, sources, degradations, shards, stream
    "evaluate",  # metrics, tiling, test sets, suites, baselines
    "train",  # the stage job, engine, worker loop (validates with evaluate's scoring)
    "tracking",  # MLflow runs, registry, model resolution, report
    "cluster",  # Ray start/join, Ray Jobs
    "curriculum",  # plans, state, fitting and scoring stages, the whole run
    "tune",  # studies
    "cli",  # the command line
)
# The registries a config is validated against: the degradation ops a task's chain may name.
# They import nothing of ours above them, so no cycle can pass through this door.
ALLOWED_UPWARD = {("config", "allinone.data.degradations")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports, as dotted names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("allinone")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("allinone"):
                found |= {_as_module(f"{base}.{a.name}") or base for a in node.names}
    return found - {here}


def _as_module(dotted: str) -> str | None:
    """``dotted`` when it names a module or package of ours (``from x import module``)."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return dotted if path.with_suffix(".py").is_file() or path.is_dir() else None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_subpackage_is_a_stage() -> None:
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(STAGES), folders ^ set(STAGES)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    return [
        f"{module} imports {target}"
        for module, targets in edges.items()
        for target in sorted(targets)
        if stage_of(module)
        and stage_of(target)
        and rank[stage_of(target)] > rank[stage_of(module)]
        and (stage_of(module), target) not in ALLOWED_UPWARD
    ]


def cycles_in(edges: dict[str, set[str]]) -> list[str]:
    # A package's __init__ re-exporting its own modules is not a cycle through it.
    edges = {m: {t for t in ts if not m.startswith(f"{t}.")} for m, ts in edges.items()}
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_imports_only_run_downward() -> None:
    upward = upward_imports(graph())
    assert not upward, "imports from a later stage into an earlier one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    cycles = cycles_in(graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_what_they_forbid() -> None:
    assert "allinone.base.files" in imports_of(PACKAGE / "data" / "images.py")
    upward = {"allinone.data.images": {"allinone.curriculum.run", "allinone.base.files"}}
    assert upward_imports(upward) == ["allinone.data.images imports allinone.curriculum.run"]
    circle = {"allinone.data.a": {"allinone.data.b"}, "allinone.data.b": {"allinone.data.a"}}
    assert cycles_in(circle) == ["allinone.data.a -> allinone.data.b -> allinone.data.a"]
