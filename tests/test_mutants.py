"""The suite's kill-rate: every mutant of the catalogue, planted in each backend, is caught by a check."""

from __future__ import annotations

import pytest

from conformance.mutants import CATALOGUE, HISTORICAL, resolve, run_mutant


def test_catalogue_covers_the_historical_bugs_and_has_at_least_15():
    assert len(CATALOGUE) >= 15
    historical = {m.key for m in CATALOGUE if m.origin == HISTORICAL}
    assert historical >= {"gate-weights-from-biased-scores", "group-score-max-with-bias", "masked-groups-zero",
                          "rope-half-split", "yarn-mscale-missing", "yarn-mscale-applied-twice",
                          "route-scale-missing", "scoring-func-swapped"}


@pytest.mark.parametrize("backend", ["reference", "tf"])
@pytest.mark.parametrize("mutant", CATALOGUE, ids=lambda m: m.key)
def test_mutant_is_killed(mutant, backend):
    result = run_mutant(mutant, backend, stop_at_first_kill=True)
    assert result.killed, f"mutant {mutant.key} ({mutant.bug}) survived on {backend}: checks {result.survived} passed"


@pytest.mark.parametrize("mutant", CATALOGUE, ids=lambda m: m.key)
def test_planting_is_undone(mutant):
    """After a run every patched function is the original again: mutants never leak into other checks."""
    targets = [target for patches in mutant.patches.values() for target, _ in patches]
    before = {target: vars(owner)[name] for target in targets for owner, name in [resolve(target)]}
    for backend in mutant.patches:
        with mutant.planted(backend):
            assert any(vars(owner)[name] is not before[t] for t in targets for owner, name in [resolve(t)])
    for target, original in before.items():
        owner, name = resolve(target)
        assert vars(owner)[name] is original, target
