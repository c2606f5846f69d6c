"""The entry points form no cycle: argv -> cli -> compose / launch -> train, one way; and the group packages' schema
modules stay free of torch, so the CLI answers (help, bad input) before torch loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """effitrain module -> the effitrain modules it imports anywhere in its body (lazy imports in functions too)."""
    modules = {_module_name(p): p for p in (SRC / "effitrain").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from effitrain.x import y` imports effitrain.x.y when that is a module, else effitrain.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    # the walk sees imports
    assert "effitrain.compose" in graph and "effitrain.engine.train" in graph["effitrain.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _loaded_after(statement: str) -> set[str]:
    probe = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())


def test_launch_does_not_import_the_cli():
    assert "effitrain.cli" not in _loaded_after("import effitrain.launcher.launch")


def test_composing_and_checking_need_no_torch():
    loaded = _loaded_after("import effitrain.cli, effitrain.compose, effitrain.checks")
    assert "torch" not in loaded and "transformers" not in loaded


VERBS = ("effitrain.cli", "effitrain.commands")
GROUPS = ("model", "data", "precision", "parallel", "compression", "optimizer", "schedule", "launcher", "logging",
          "checkpoint", "eval")


def test_the_engine_and_the_groups_import_no_verb():
    """Verbs sit on top: cli -> commands -> engine -> groups. An arrow from the engine or a group up to a verb would
    make the next verb's change reach into training."""
    below = [m for m in import_graph() if m.startswith("effitrain.engine")
             or m.split(".")[1:2] and m.split(".")[1] in GROUPS]
    graph = import_graph()
    up = {m: sorted(t for t in graph[m] if t.startswith(VERBS)) for m in below}
    assert not {m: t for m, t in up.items() if t}, up


def test_the_packages_stand_in_floors():
    """Between the top-level modules and packages (commands/, engine/, each group's package, base/...) the imports
    form no cycle either: each stands above what it imports, so a package is read and changed from the floor up."""
    graph = import_graph()

    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    assert find_cycle(rooms) is None, " -> ".join(find_cycle(rooms))
