"""The import rules that keep the processes apart (docs/architecture.md, "Layout"):

- `shardline.coordinator` imports neither `shardline.worker` nor `shardline.kernels` (a
  coordinator host needs no Numba, no model weights);
- `shardline.worker` and `shardline.coordinator` meet only through the modules directly in
  `shardline/` (the typed messages, config, model-file metadata);
- `shardline.kernels` imports nothing else of ours;
- no import cycles between modules, counting imports inside functions too.

The imports are read from the source with `ast`, so a lazy import inside a function counts; an
import under `if TYPE_CHECKING:` (annotations only, never executed) does not.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shardline"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (an import of a package's own parent packages,
    which Python has already initialised, is not counted)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # drop `if TYPE_CHECKING:` blocks before walking
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and t not in ancestors}
    return graph


GRAPH = _import_graph()


def _imports_of(prefix: str) -> list[tuple[str, str]]:
    return [(m, t) for m, ts in GRAPH.items() if m == prefix or m.startswith(prefix + ".") for t in ts]


@pytest.mark.parametrize("package, forbidden", [
    ("shardline.coordinator", ("shardline.worker", "shardline.kernels")),
    ("shardline.worker", ("shardline.coordinator",)),
    ("shardline.kernels", ("shardline.coordinator", "shardline.worker", "shardline.model_file", "shardline.config")),
])
def test_layer_rules(package, forbidden):
    bad = [(m, t) for m, t in _imports_of(package) if t.startswith(forbidden)]
    assert not bad, f"{package} must not import {forbidden}: {bad}"


def test_the_shared_modules_compose_nothing_but_in_the_cli():
    """Modules directly in shardline/ are the contract between the processes; only the CLI
    starts a coordinator or a worker (and `local` runs the CLI)."""
    bad = [(m, t) for m, ts in GRAPH.items() if m.count(".") == 1 and m not in ("shardline.cli",)
           for t in ts if t.startswith(("shardline.coordinator", "shardline.worker", "shardline.kernels"))
           and not t.startswith(m + ".")]  # a subpackage's __init__ importing its own modules
    assert not bad, bad


def test_no_import_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        seen[m] = 1
        for t in sorted(GRAPH[m]):
            if seen.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in seen:
                visit(t, path + [t])
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_is_read():
    assert "shardline.coordinator.dispatcher" in GRAPH["shardline.coordinator.server"]
    assert "shardline.kernels.formats" in GRAPH["shardline.worker.loader"]
