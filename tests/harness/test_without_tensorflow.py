"""Where TensorFlow is absent (the GPU image has none), the format layer, the reference, the checks, the goldens
and the suite still run on the reference; asking for the tf backend is bad input naming the missing module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = Path(__file__).resolve().parent / "no_tensorflow"


def _run(*command):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCK), str(ROOT)])}
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=environment)


def test_tensorflow_is_really_unimportable_there():
    done = _run("-c", "import tensorflow")
    assert done.returncode == 1 and "No module named 'tensorflow'" in done.stderr


def test_the_reference_runs_and_the_tf_backend_is_refused_by_name():
    checked = _run("-m", "dsv3_conformance", "check-golden", "golden/official/v3-tiny", "--backend", "reference")
    assert checked.returncode == 0
    refused = _run("-m", "dsv3_conformance", "check-golden", "golden/official/v3-tiny", "--backend", "tf")
    assert refused.returncode == 2 and "the module 'tensorflow' is not installed" in refused.stderr


def test_the_suite_runs_on_the_reference():
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance/", "--backend", "reference", "-k",
                "golden or routing or fp8:")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "passed" in done.stdout and "tensorflow" not in done.stdout.lower()
