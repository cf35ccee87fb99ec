"""The two implementations share only the format layer (conformance/format/): all math is written twice.

A bug in shared math would be invisible to every cross-backend check, so it is checked twice. Statically: impl/
may import TensorFlow, NumPy, the standard library, itself and conformance.format; reference/ the same without
TensorFlow; neither imports the other, nor the rest of the harness. At run time, which no spelling of an import
escapes: a fresh Python imports every module of one backend and runs a model through it, and must then hold no
module of the other (nor TensorFlow, for the reference).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from project_names import NAMES, module_of, part_of

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = {"numpy", "ml_dtypes"}
ALLOWED = {"impl": THIRD_PARTY | {"tensorflow", "impl", "format"}, "reference": THIRD_PARTY | {"reference", "format"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`; relative imports resolved against its package."""
    package = module_of(path.parent / "__init__.py", ROOT)
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
            part = part_of(module)
            if part in ALLOWED[package] or part in sys.stdlib_module_names or part == "__future__":
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
    (fake_root / "impl" / "rope.py").write_text(
        "from dsv3_conformance.reference.rope import rotation_angles\nimport tensorflow\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert violations("impl") == ["impl/rope.py:1 imports dsv3_conformance.reference.rope"]


def test_the_format_layer_holds_no_backend():
    """conformance/format/ itself imports neither backend (else the backends would share through it)."""
    problems = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                for path in sorted((ROOT / "conformance" / "format").rglob("*.py"))
                for line, module in imported_modules(path) if part_of(module) in ("reference", "impl")]
    assert not problems, problems


_RUN = """
import importlib, json, pkgutil, sys
import numpy as np
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.weights import assemble

package = importlib.import_module(PACKAGE)
for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
    importlib.import_module(info.name)
EXTRA
config = tiny(n_mtp_layers=1)
rng = np.random.default_rng(0)
weights = assemble(lambda spec: (rng.standard_normal(spec.shape) / 4).astype(np.float32), config)
model = importlib.import_module(PACKAGE + ".model").Transformer(config, weights)
model.prefill(np.arange(8).reshape(2, 4))
model.decode(np.array([1, 2]))
model.mtp(np.array([[3], [4]]))
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(package: str, extra: str = "") -> set[str]:
    """The parts of the project (reference, impl, format, harness) and the outside packages loaded by a fresh
    Python that imports every module of `package` and runs a model with MTP through it (prefill, decode, the MTP
    module), after running `extra`."""
    code = _RUN.replace("PACKAGE", repr(NAMES[package])).replace("EXTRA", extra)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {part_of(name) for name in json.loads(done.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("package, foreign", [("impl", {"reference"}), ("reference", {"impl", "tensorflow"})])
def test_a_running_backend_holds_no_module_of_the_other(package, foreign):
    assert not loaded_by(package) & foreign


def test_the_run_time_rule_catches_an_import_no_parser_sees():
    """importlib.import_module(".".join(...)) of the reference's RoPE in impl/ passes the static rule; at run time
    it is seen."""
    planted = 'importlib.import_module(".".join(["dsv3_conformance", "reference", "rope"]))'
    assert "reference" in loaded_by("impl", planted)
