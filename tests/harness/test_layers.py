"""The code reads in floors (docs/architecture.md): format -> backends (reference/, impl/) -> harness -> tools (the
command line, the benchmarks). Every import, at module level or inside a function, points down or sideways within a
package, and no modules import each other in a circle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from project_names import NAMES, NAMESPACE, module_of, part_of

ROOT = Path(__file__).resolve().parents[2]


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_of(path, root): path for folder in NAMES for path in (root / folder).rglob("*.py")}


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its code (relative imports resolved)."""
    graph = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base
                            for alias in node.names}
        graph[name] = {target for target in targets if target in found and target != name}
    return graph


def floor(module: str) -> int:
    """0 format, 1 backends, 2 harness, 3 tools."""
    part = part_of(module)
    if part == "format":
        return 0
    if part in ("reference", "impl"):
        return 1
    if part == "benchmarks" or module in (f"{NAMESPACE}.cli", f"{NAMESPACE}.__main__"):
        return 3
    return 2


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if floor(target) > floor(module))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_no_import_points_up_a_floor():
    assert upward(imports(modules())) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(imports(modules())) == []


def test_the_rules_can_fail(tmp_path):
    """A format module importing the harness, and two harness modules importing each other, are both reported."""
    (tmp_path / "conformance" / "format").mkdir(parents=True)
    for package in ("conformance", "conformance/format", "reference", "impl", "benchmarks"):
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "conformance" / "format" / "config.py").write_text("from dsv3_conformance.verdict import outcome\n")
    (tmp_path / "conformance" / "verdict.py").write_text("def outcome():\n    from dsv3_conformance import metrics\n")
    (tmp_path / "conformance" / "metrics.py").write_text("from dsv3_conformance.verdict import outcome\n")
    graph = imports(modules(tmp_path))
    assert upward(graph) == ["dsv3_conformance.format.config imports dsv3_conformance.verdict"]
    assert circles(graph) == [["dsv3_conformance.metrics", "dsv3_conformance.verdict"]]


def test_a_backend_loads_no_harness_at_run_time():
    """Importing both backends in a fresh process loads the format layer and nothing else of the harness."""
    import subprocess

    code = ("import sys, dsv3_conformance.reference.model, dsv3_conformance.impl.model\n"
            "print(sorted(m for m in sys.modules if m.startswith('dsv3_conformance.') and m.split('.')[1]"
            " not in ('format', 'reference', 'impl')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
