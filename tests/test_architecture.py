"""The import graph of the library runs one way, floor by floor (``pe_triage.LAYERS``, described in the
package docstring). Read from the source with ``ast``, nothing imported, so a lazy import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

from pe_triage import LAYERS

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "pe_triage"
FLOOR = {name: floor for floor, names in enumerate(LAYERS) for name in names}
#: the only code that may import mlflow (the package itself and this module)
MLFLOW_HOMES = ("pe_triage.registry", "pe_triage.tracking")


def modules(src: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package under ``src``."""
    found = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _known(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per module: the package modules it imports, and the top-level names of everything else it imports."""
    known = modules(src)
    internal: dict[str, set[str]] = {m: set() for m in known}
    external: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from x import y``: y is a submodule or a name defined in x
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for name in names:
                target = _known(name, known) if name.split(".")[0] == ROOT else None
                if target is None:
                    external[module].add(name.split(".")[0])
                elif target != module:
                    internal[module].add(target)
    return internal, external


def _unit(module: str) -> str:
    """The top-level module or package of the library a module belongs to (what ``LAYERS`` names)."""
    return module.split(".")[1] if module != ROOT else ROOT


def _floor(module: str) -> int:
    return -1 if module == ROOT else FLOOR[_unit(module)]


def upward_imports(internal: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (floor {_floor(m)}) -> {t} (floor {_floor(t)})"
                  for m, targets in internal.items() for t in targets if _floor(t) > _floor(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def unit_graph(internal: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the top-level modules and packages (what a package loop is made of)."""
    units: dict[str, set[str]] = {}
    for m, targets in internal.items():
        units.setdefault(_unit(m), set()).update(_unit(t) for t in targets if _unit(t) != _unit(m))
    return units


def importers_of(external: dict[str, set[str]], name: str) -> set[str]:
    return {m for m, names in external.items() if name in names}


def _is_mlflow_home(module: str) -> bool:
    return any(module == home or module.startswith(home + ".") for home in MLFLOW_HOMES)


INTERNAL, EXTERNAL = import_graph(SRC)


def test_the_graph_builder_finds_known_edges() -> None:
    assert "pe_triage.dataset" in INTERNAL["pe_triage.training.train"]  # from x import y, y a name
    assert "pe_triage.schema" in INTERNAL["pe_triage.training.train"]  # from pe_triage import schema as S
    assert "pe_triage.synth.anatomy" in INTERNAL["pe_triage.synth.cohort"]  # a relative import
    assert "pe_triage.registry.pyfunc" in INTERNAL["pe_triage.registry.registry"]  # inside a function
    assert "pe_triage" in INTERNAL["pe_triage.ingest.site"]  # from pe_triage import __version__
    assert "mlflow" in EXTERNAL["pe_triage.registry.pyfunc"]
    assert "torch" in EXTERNAL["pe_triage.evaluation.gradcam"]
    assert len(INTERNAL) > 50 and sum(map(len, INTERNAL.values())) > 100


def test_the_checks_catch_a_planted_violation(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "schema.py": "from pe_triage.cli import main\n",  # floor 0 -> 6
        "cli.py": "def main(): pass\n",
        "stats.py": "def f():\n    import mlflow.pyfunc\n    import kfp.dsl\n",
        "training/__init__.py": "",
        "training/a.py": "from . import b\n",
        "training/b.py": "from pe_triage.training import a\n",
        "evaluation/__init__.py": "from pe_triage.predict import x\n",
        "predict.py": "from pe_triage.evaluation import y\n",
    }
    for name, text in files.items():
        (tmp_path / ROOT / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ROOT / name).write_text(text)
    internal, external = import_graph(tmp_path)
    assert upward_imports(internal) == ["pe_triage.schema (floor 0) -> pe_triage.cli (floor 6)"]
    assert sorted(cycles(internal)) == [["pe_triage.evaluation", "pe_triage.predict"],
                                        ["pe_triage.training.a", "pe_triage.training.b"]]
    assert cycles(unit_graph(internal)) == [["evaluation", "predict"]]
    assert importers_of(external, "kfp") == importers_of(external, "mlflow") == {"pe_triage.stats"}


def test_every_module_stands_on_a_floor() -> None:
    units = {_unit(m) for m in INTERNAL} - {ROOT}
    assert units - set(FLOOR) == set(), "add the new module to pe_triage.LAYERS"
    assert set(FLOOR) - units == set(), "LAYERS names a module that no longer exists"
    assert len(FLOOR) == sum(map(len, LAYERS)), "a module is named on two floors"


def test_no_module_imports_from_a_higher_floor() -> None:
    assert upward_imports(INTERNAL) == []


def test_no_import_cycles_between_modules_or_packages() -> None:
    assert cycles(INTERNAL) == []
    assert cycles(unit_graph(INTERNAL)) == []


def test_the_library_never_imports_kfp() -> None:
    assert importers_of(EXTERNAL, "kfp") == set()


def test_mlflow_is_imported_only_by_tracking_and_the_registry() -> None:
    assert importers_of(EXTERNAL, "mlflow")  # the check can see it
    assert {m for m in importers_of(EXTERNAL, "mlflow") if not _is_mlflow_home(m)} == set()
