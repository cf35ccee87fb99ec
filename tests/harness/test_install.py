"""A non-editable install works from any folder: the shipped golden cases are package data, the commands find
them, and the suite runs as a pytest plugin (`pytest --pyargs dsv3_conformance.suite`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("install")  # one worker builds and installs once


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed, not editable, into a folder of its own; built from a copy of the sources, so that
    nothing is written into the checkout."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / "dsv3-conformance"
    outputs = {ROOT / name for name in (".git", "build", "report", ".hypothesis", ".pytest_cache")}
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        name for name in names if Path(folder) / name in outputs or name == "__pycache__" or name.endswith(".egg-info")])
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600,
                          cwd=source)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    environment = {**os.environ, "PYTHONPATH": str(target)}
    return target, elsewhere, environment


def _run(installed, *command, timeout=900):
    target, elsewhere, environment = installed
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout,
                          cwd=elsewhere, env=environment)


def test_the_installed_commands_find_the_shipped_cases(installed):
    target = installed[0]
    shipped = target / "dsv3_conformance" / "golden" / "shipped"
    assert (shipped / "manifest.json").is_file()
    located = _run(installed, "-c", "import dsv3_conformance.paths as p; print(p.GOLDEN_DIR)")
    assert located.stdout.strip() == str(shipped), located.stderr[-2000:]
    verified = _run(installed, "-m", "dsv3_conformance", "golden", "verify")
    assert verified.returncode == 0 and "match the manifest" in verified.stdout, verified.stderr[-2000:]
    checked = _run(installed, "-m", "dsv3_conformance", "check-golden", str(shipped / "official" / "v3-tiny"))
    assert checked.returncode == 0 and "PASSED" in checked.stdout, (checked.stdout + checked.stderr)[-2000:]
    report = _run(installed, "-m", "dsv3_conformance", "report", "--backend", "reference", "--sections", "none",
                  "--out", str(installed[1] / "report"))
    assert report.returncode == 0, (report.stdout + report.stderr)[-2000:]
    assert (installed[1] / "report" / "report.html").is_file()


def test_the_suite_runs_as_a_plugin_from_elsewhere(installed):
    done = _run(installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "dsv3_conformance.suite",
                "--backend", "reference", "-k", "golden and official/v3-tiny]")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "dsv3-conformance coverage" in done.stdout and "PASSED" in done.stdout
