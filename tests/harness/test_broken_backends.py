"""Deliberately broken backends (broken_backends.py, public Backend API only) get no pass: `check-golden` and
`verify-checkpoint` exit 1 on each, FAILED where they computed something wrong (NaN included) and INCOMPLETE
where they skipped work; the faithful wrapper passes both. Allowing a part to be missing is explicit and
named in the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.paths import GOLDEN_DIR, ROOT

MODULE = "broken_backends"
# (backend, golden case it is run on, check-golden's verdict, verify-checkpoint's verdict)
CASES = [
    ("FAITHFUL", "official/v3-tiny-mtp", "PASSED", "PASSED"),
    ("NO_MTP", "official/v3-tiny-mtp", "INCOMPLETE", "INCOMPLETE"),
    ("NOTHING", "official/v3-tiny", "INCOMPLETE", "INCOMPLETE"),
    ("GARBAGE", "official/v3-tiny", "FAILED", "FAILED"),
    ("GARBAGE", "official/v3-tiny-bf16", "FAILED", "FAILED"),
    ("NAN", "official/v3-tiny", "FAILED", "FAILED"),
    ("NAN", "official/v3-tiny-fp8-act", "FAILED", "FAILED"),
    ("NO_GROUP_LIMIT", "oracle/moe-groups", "FAILED", "FAILED"),
    ("HARD_CODED_THETA", "oracle/eps-theta", "FAILED", "FAILED"),
]


def _verdict(out: str) -> str:
    return out.strip().splitlines()[-1].split(":")[0]


@pytest.mark.parametrize("backend, case, verdict, _", CASES, ids=[f"{b}-{c}" for b, c, _, _ in CASES])
def test_check_golden(backend, case, verdict, _, tmp_path, capsys):
    out = tmp_path / "result.json"
    status = main(["check-golden", str(GOLDEN_DIR / case), "--backend", f"{MODULE}:{backend}", "--json", str(out)])
    printed = capsys.readouterr().out
    assert (status, _verdict(printed)) == (0 if verdict == "PASSED" else 1, verdict), printed[-3000:]
    assert json.loads(out.read_text())["verdict"] == verdict


@pytest.mark.parametrize("backend, case, _, verdict", CASES, ids=[f"{b}-{c}" for b, c, _, _ in CASES])
def test_verify_checkpoint(backend, case, _, verdict, tmp_path, capsys):
    out = tmp_path / "result.json"
    status = main(["verify-checkpoint", str(GOLDEN_DIR / case), "--layers", "all", "--backend",
                   f"{MODULE}:{backend}", "--json", str(out)])
    printed = capsys.readouterr().out
    assert (status, _verdict(printed)) == (0 if verdict == "PASSED" else 1, verdict), printed[-3000:]
    assert json.loads(out.read_text())["verdict"] == verdict


def test_allowing_a_missing_part_is_explicit_and_named(capsys):
    case = str(GOLDEN_DIR / "official/v3-tiny-mtp")
    assert main(["check-golden", case, "--backend", f"{MODULE}:NO_MTP", "--allow-missing", "mtp"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "PASSED: 11 tensors within tolerance; 3 allowed missing (mtp)"
    assert main(["verify-checkpoint", case, "--layers", "all", "--backend", f"{MODULE}:NO_MTP",
                 "--allow-missing", "mtp"]) == 0
    assert "1 allowed missing (mtp)" in capsys.readouterr().out
    # Allowing another part does not allow this one; an unknown part is bad input.
    assert main(["check-golden", case, "--backend", f"{MODULE}:NO_MTP", "--allow-missing", "naive"]) == 1
    assert main(["check-golden", case, "--backend", f"{MODULE}:NO_MTP", "--allow-missing", "mpt"]) == 2
    assert "unknown part(s) ['mpt']" in capsys.readouterr().err


def test_a_backend_that_runs_nothing_is_never_passed_even_with_everything_allowed(capsys):
    everything = "main,mtp,speculative,naive,layers"
    case = str(GOLDEN_DIR / "official/v3-tiny-mtp")
    assert main(["check-golden", case, "--backend", f"{MODULE}:NOTHING", "--allow-missing", everything]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("INCOMPLETE: nothing compared")
    assert main(["verify-checkpoint", case, "--layers", "all", "--backend", f"{MODULE}:NOTHING",
                 "--allow-missing", everything]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("INCOMPLETE: nothing compared")


def test_a_backend_that_breaks_the_contract_is_bad_input_naming_what(capsys):
    case = str(GOLDEN_DIR / "official" / "v3-tiny")
    assert main(["check-golden", case, "--backend", f"{MODULE}:MISDECLARED"]) == 2
    error = capsys.readouterr().err
    assert "dtypes 'float32' must be a tuple" in error and "attention_forms ('flash',)" in error
    assert "default_dtype 'float16'" in error
    assert main(["check-golden", case, "--backend", f"{MODULE}:NO_DECODE"]) == 2
    assert "its runner NoDecode has no decode" in capsys.readouterr().err


def _suite(*args):
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "harness")}
    return subprocess.run([sys.executable, "-m", "pytest", "conformance/suite/test_suite.py", "-q", "-p",
                           "no:cacheprovider", "-k", "golden:official/v3-tiny-mtp", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=environment)


def test_in_the_suite_a_check_with_only_allowed_gaps_passes_and_one_with_nothing_compared_never_does():
    """The suite's golden check on the MTP case: the backend without MTP compared the main model and missed only
    MTP; allowed, the check passes (counted as ran) with its gaps listed; not allowed, the session is INCOMPLETE.
    The backend that runs nothing stays INCOMPLETE whatever is allowed."""
    allowed = _suite("--backend", f"{MODULE}:NO_MTP", "--allow-missing", "mtp,naive")
    assert allowed.returncode == 0, allowed.stdout[-3000:]
    assert "1 passed" in allowed.stdout and "allowed:" in allowed.stdout and "PASSED" in allowed.stdout
    assert _suite("--backend", f"{MODULE}:NO_MTP").returncode == 1
    nothing = _suite("--backend", f"{MODULE}:NOTHING", "--allow-missing", "main,mtp,speculative,naive")
    assert nothing.returncode == 1 and "INCOMPLETE" in nothing.stdout, nothing.stdout[-3000:]
