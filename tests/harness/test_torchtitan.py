"""The torchtitan adapter's tests (torchtitan_checks.py) in a process of their own: torchtitan imports triton, whose
LLVM aborts a process that has loaded TensorFlow's (the adapter refuses to load there), and this suite's workers load
TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the torchtitan extra")


def test_the_torchtitan_adapter_in_a_process_without_tensorflow():
    checks = Path(__file__).with_name("torchtitan_checks.py")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "-W", "ignore", str(checks)], capture_output=True, text=True, timeout=900,
                          cwd=checks.parents[2])
    assert done.returncode == 0 and " passed" in done.stdout, (done.stdout + done.stderr)[-4000:]
