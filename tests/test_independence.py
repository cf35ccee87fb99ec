"""The two implementations share only the format layer (conformance/format/): all math is written twice.

A bug in shared math would be invisible to every cross-backend check, so imports are checked statically:
impl/ may import TensorFlow, NumPy, the standard library, itself and conformance.format; reference/ the
same without TensorFlow. Neither imports the other, nor the rest of the harness.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = {"numpy", "ml_dtypes"}
ALLOWED = {"impl": THIRD_PARTY | {"tensorflow", "impl"}, "reference": THIRD_PARTY | {"reference"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`; relative imports resolved against its package."""
    package = path.parent.relative_to(ROOT).as_posix().replace("/", ".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in ALLOWED[package] or top in sys.stdlib_module_names or top == "__future__":
                continue
            if module == "conformance.format" or module.startswith("conformance.format."):
                continue
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_backends_import_only_the_format_layer(package):
    problems = violations(package)
    assert not problems, "math must not be shared between backends:\n" + "\n".join(problems)


def test_the_rule_catches_reference_math_in_impl(tmp_path, monkeypatch):
    """The check itself can fail: a planted import of the reference's RoPE is reported."""
    fake_root = tmp_path / "root"
    (fake_root / "impl").mkdir(parents=True)
    (fake_root / "impl" / "rope.py").write_text("from reference.rope import rotation_angles\nimport tensorflow\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert violations("impl") == ["impl/rope.py:1 imports reference.rope"]


def test_the_format_layer_holds_no_backend():
    """conformance/format/ itself imports neither backend (else the backends would share through it)."""
    problems = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                for path in sorted((ROOT / "conformance" / "format").rglob("*.py"))
                for line, module in imported_modules(path) if module.split(".")[0] in ("reference", "impl")]
    assert not problems, problems
