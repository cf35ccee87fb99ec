"""Every golden case of the shipped manifest, as one check per case."""

from __future__ import annotations

from dsv3_conformance.golden.cases import GoldenCase, check_case
from dsv3_conformance.golden.manifest import case_dirs
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.verdict import CheckFailed, Incomplete, record
from dsv3_conformance.checks.registry import register

COMPONENT = "golden cases"


def golden_check(case_dir):
    def matches_golden_case(backend):
        """Backend output vs every expected tensor of the case (rel_err within the policy's tolerance)."""
        case = GoldenCase.load(case_dir)
        result = check_case(case, backend)
        for comparison in result.results:
            record(comparison, result.policy[comparison.name])
        failures = result.failures
        if failures:
            worst = max(failures, key=lambda r: (r.tolerance > 0, r.rel_err))  # a float tensor says more than tokens
            raise CheckFailed(f"{result.case} on {backend.name}: {len(failures)} tensor(s) out of tolerance, worst "
                              f"{worst.describe()}", worst)
        if result.missing or not result.results:
            raise Incomplete(result.missing, compared=bool(result.results))
    return matches_golden_case


for _case_dir in case_dirs(GOLDEN_DIR):
    register(f"golden:{_case_dir.relative_to(GOLDEN_DIR).as_posix()}", COMPONENT, golden_check(_case_dir))
