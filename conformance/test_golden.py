"""Every shipped golden case on every selected backend, and the integrity of the golden files."""

from __future__ import annotations

import pytest

from conformance.checks import record
from conformance.golden import GoldenCase, check_case
from conformance.manifest import case_dirs, verify
from conformance.conftest import GOLDEN_DIR

CASES = case_dirs(GOLDEN_DIR)


def test_golden_files_match_manifest(golden_dir):
    """sha256 of every golden file equals the manifest's: a changed or truncated file is named."""
    problems = verify(golden_dir)
    assert not problems, "golden files differ from golden/manifest.json:\n" + "\n".join(map(str, problems))


@pytest.mark.parametrize("case_dir", CASES, ids=[path.name for path in CASES])
def test_golden_case(case_dir, backend):
    """Backend output vs every expected tensor of the case (rel_err within the policy's tolerance)."""
    case = GoldenCase.load(case_dir)
    result = check_case(case, backend)
    for comparison in result.results:
        record(comparison, result.policy[comparison.name])
    failures = [r.describe() for r in result.results if not r.passed]
    assert result.results, f"{result.case}: no expected tensor was compared"
    assert not failures, (f"{result.case} on {backend}: {len(failures)} tensor(s) out of tolerance, first "
                          + "\n".join(failures))
    assert not result.not_compared, f"expected tensors this harness did not compare: {result.not_compared}"
