"""A backend that lives outside the harness runs through the suite, check-golden and report by name.

tests/harness/out_of_tree/dsv3_hf_backend.py wraps transformers' DeepseekV3ForCausalLM. It is registered the way
a user's package would be: an entry point of group `conformance.backends`, here declared by a
distribution's metadata folder put on the path, so that nothing of the harness is edited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv3_conformance.paths import ROOT

pytest.importorskip("transformers", reason="the example backend wraps transformers (the oracle extra)")
PLUGIN = ROOT / "tests" / "harness" / "out_of_tree"
# What transformers does not implement (SEMANTICS.md; the backend declares each Unsupported), and what this adaptor
# does not offer: allowed to be missing, and each listed in the report.
ALLOWED = "bfloat16,cross,expert-parallel,fp8,main,mtp,naive,pipeline,properties,routing,training"


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """PYTHONPATH with the plugin module and an installed-distribution record declaring its entry point."""
    site = tmp_path_factory.mktemp("site")
    info = site / "dsv3_hf_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsv3-hf-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dsv3_conformance.backends]\nhf-transformers = dsv3_hf_backend:BACKEND\n")
    path = os.pathsep.join([str(site), str(PLUGIN), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path}


def _run(environment, *args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_check_golden_runs_it_by_module_path(environment, tmp_path):
    """transformers has no separate naive attention form: INCOMPLETE (exit 1) until that part is allowed."""
    out = tmp_path / "result.json"
    command = ["-m", "dsv3_conformance.cli", "check-golden", "golden/official/v3-tiny",
               "--backend", "dsv3_hf_backend:BACKEND", "--json", str(out)]
    done = _run(environment, *command)
    assert done.returncode == 1 and done.stdout.strip().splitlines()[-1] == (
        "INCOMPLETE: 17 tensors within tolerance; 1 not compared (naive): allow them with --allow-missing naive"), \
        done.stdout[-3000:] + done.stderr[-3000:]
    done = _run(environment, *command, "--allow-missing", "naive")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "hf-transformers" and result["passed"] and result["verdict"] == "PASSED"
    assert [m["tensor"] for m in result["not_compared"]] == ["prefill.logits_last.naive"]


@pytest.mark.long
def test_the_suite_and_the_report_run_it_by_entry_point_name(environment, tmp_path):
    """The report runs the suite as `pytest conformance/ --backend hf-transformers` (conformance.report.runs.run_suite)
    and records every test's outcome and message: one run shows both taking the backend by its entry-point name."""
    done = _run(environment, "-m", "dsv3_conformance.cli", "report", "golden", "--backend", "hf-transformers",
                "--suite", "--sections", "none", "--out", str(tmp_path), "--allow-missing", ALLOWED)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "PASSED" and report["allowed_missing"] == ALLOWED.split(",")
    assert {row["part"] for row in report["not_compared"]} == set(ALLOWED.split(","))
    assert {case["backend"] for case in report["golden"]} == {"hf-transformers"}
    rows = [row for row in report["checks"] if row["backend"] == "hf-transformers"]
    assert len([row for row in rows if row["outcome"] == "passed"]) >= 24, rows  # oracle/eps-theta: a divergence
    assert any(row["outcome"] == "skipped" and "backend hf-transformers has no gemm_impl fp8" in row["message"]
               for row in rows), rows
    board = {row["backend"]: row for row in report["scoreboard"]}
    assert list(board) == ["hf-transformers"] and "passed" in board["hf-transformers"]["golden"], board
