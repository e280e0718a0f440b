"""The package's own imports: no circle anywhere in fkd/, and nothing imports a layer above its own.

Every import is read from the source (``ast``), function-level ones included, so a lazy import cannot
hide a circle. The layers, bottom up, are drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fkd"

#: Pure functions and the schema: they import nothing of fkd but each other.
GROUND = {"fkd.errors", "fkd.schema", "fkd.registry", "fkd.presets", "fkd.config_files", "fkd.pytree", "fkd.prng",
          "fkd.losses", "fkd.atomic"}
#: The run configuration: the ground floor only.
CONFIG = {"fkd.config"}
#: What reads a whole config and builds the run's pieces, and what calls it.
BUILD = {"fkd.build"}
COMMANDS = {"fkd.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fkd_imports(path: Path, modules: set[str]) -> set[str]:
    """The fkd modules ``path`` imports anywhere in its body (``from fkd.data import stl10`` imports the
    module ``fkd.data.stl10``; ``from fkd.config import Config`` the module ``fkd.config``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fkd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "fkd":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """``{module: the fkd modules it imports}`` over every module of the package."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: fkd_imports(path, set(files)) - {name} for name, path in files.items()}


def ground_or_below(name: str) -> bool:
    return any(name == g or name.startswith(g + ".") for g in GROUND)


def test_no_import_circle_in_fkd():
    graph = import_graph()
    # a package imports its own modules from __init__; that is not a circle unless they import it back
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_ground_floor_imports_only_the_ground_floor():
    graph = import_graph()
    for name, imported in graph.items():
        if ground_or_below(name):
            above = sorted(m for m in imported if not ground_or_below(m))
            assert not above, f"{name} (ground floor) imports {', '.join(above)}"


def test_config_imports_only_the_ground_floor():
    graph = import_graph()
    for name in CONFIG:
        above = sorted(m for m in graph[name] if not ground_or_below(m))
        assert not above, f"{name} imports {', '.join(above)}; it may import only {', '.join(sorted(GROUND))}"


def test_nothing_below_the_build_layer_imports_it_or_a_command():
    graph = import_graph()
    top = BUILD | COMMANDS
    users = {name: sorted(m for m in imported if m in top) for name, imported in graph.items()}
    allowed = top | {n for n in graph if n.startswith(("fkd.sweep.", "fkd.export."))} | {"fkd.distill", "fkd.teacher", "fkd.stages"}
    wrong = {name: got for name, got in users.items() if got and name not in allowed}
    assert not wrong, f"modules below the build layer import it: {wrong}"
    assert "fkd.build" not in {m for n in BUILD for m in graph[n]}


#: Every module's layer, bottom up (docs/architecture.md draws them); a module is named by its own path
#: or by the nearest package listed. An import may go to the module's own layer or below, never above.
LAYERS = {
    0: ("fkd", "fkd.errors", "fkd.schema", "fkd.registry", "fkd.presets", "fkd.config_files", "fkd.pytree",
        "fkd.prng", "fkd.losses", "fkd.atomic", "fkd.user_imports"),
    1: ("fkd.config", "fkd.stage_config"),
    2: ("fkd.terms", "fkd.models", "fkd.optim", "fkd.schedules", "fkd.objective", "fkd.data_parallel",
        "fkd.data.datasets", "fkd.data.views", "fkd.data.stl10"),
    3: ("fkd.step", "fkd.population", "fkd.loop", "fkd.fit", "fkd.data", "fkd.mixup", "fkd.cache", "fkd.checkpoint",
        "fkd.run_setup", "fkd.run_start", "fkd.rundir", "fkd.runlock", "fkd.progress", "fkd.distributed",
        "fkd.evaluate", "fkd.device", "fkd.runtime", "fkd.clone_files", "fkd.announce", "fkd.titles", "fkd.latency",
        "fkd.pretrain", "fkd.data.strong", "fkd.log_sinks"),
    4: ("fkd.build",),
    5: ("fkd.cli", "fkd.distill", "fkd.distill_setup", "fkd.teacher", "fkd.sweep", "fkd.export",
        "fkd.stages"),
}
LAYER_NAMES = {0: "ground", 1: "config", 2: "units", 3: "step, loop, data", 4: "build", 5: "commands"}


def layer_of(name: str) -> int:
    """The layer of the longest listed prefix of ``name``."""
    best = max(((len(p), layer) for layer, prefixes in LAYERS.items() for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} has no layer: add it to LAYERS and to docs/architecture.md"
    return best[1]


def test_every_module_imports_only_its_own_layer_or_below():
    graph = import_graph()
    upward = [f"{name} ({LAYER_NAMES[layer_of(name)]}) imports {m} ({LAYER_NAMES[layer_of(m)]})"
              for name, imported in sorted(graph.items()) for m in sorted(imported) if layer_of(m) > layer_of(name)]
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)
