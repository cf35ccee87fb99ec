"""The mutation runner's verdicts are honest, planting is undone, and every mutant of the catalogue is caught.

Unit tests of the verdict rules use made-up check runs; the rest plants the real catalogue in each backend.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.backends import REFERENCE, TF
from conformance.mutation.catalogue import CATALOGUE, CONTROL, HISTORICAL, MUTANTS, Mutant, Patch
from conformance.mutation.planting import NotApplicable, import_backend, replaced
from conformance.mutation.probe import fingerprint, first_difference
from conformance.mutation.runner import CheckRun, MutantRun, classify, plant_and_run, run_check

BACKENDS = [REFERENCE, TF]


def test_catalogue_covers_the_historical_bugs_and_has_controls():
    assert len([m for m in CATALOGUE if not m.control]) >= 19
    historical = {m.key for m in CATALOGUE if m.origin == HISTORICAL}
    assert historical >= {"gate-weights-from-biased-scores", "group-score-max-with-bias", "masked-groups-zero",
                          "rope-half-split", "yarn-mscale-missing", "yarn-mscale-applied-twice",
                          "route-scale-missing", "scoring-func-swapped"}
    assert {m.key for m in CATALOGUE} >= {"yarn-ramp-betas-swapped", "rope-on-nope-part", "softmax-scale-nope-only",
                                         "gate-bias-in-logits"}
    assert len([m for m in CATALOGUE if m.origin == CONTROL]) >= 1


def test_every_named_check_exists():
    from conformance.checks import CHECKS

    missing = {(m.key, key) for m in CATALOGUE for key in m.checks if key not in CHECKS}
    assert not missing


# --- verdict rules ----------------------------------------------------------------------------------------------

_REAL = Mutant("real", "a bug", HISTORICAL, (), ("a", "b"))
_CONTROL = Mutant("noop", "nothing", CONTROL, (), ("a",))
_PASSED = {"a": CheckRun("a", "passed"), "b": CheckRun("b", "passed")}


def _run(*checks: CheckRun, changed: str | None = "logits") -> MutantRun:
    return MutantRun("real", "reference", changed=changed, checks=list(checks))


def test_a_kill_needs_the_checks_own_assertion():
    result = classify(_REAL, _run(CheckRun("a", "failed", "rel_err 0.3 vs 1e-05"), CheckRun("b", "passed")), _PASSED)
    assert result.verdict == "killed" and result.killed_by == ["a: rel_err 0.3 vs 1e-05"] and result.survived == ["b"]


def test_a_crash_is_an_error_never_a_kill():
    result = classify(_REAL, _run(CheckRun("a", "error", "AttributeError: no attribute 'rout'")), _PASSED)
    assert result.verdict == "error" and not result.killed_by and not result.ok


def test_a_check_that_fails_unmutated_cannot_kill():
    controls = {"a": CheckRun("a", "failed", "rel_err 2e-05"), "b": CheckRun("b", "passed")}
    result = classify(_REAL, _run(CheckRun("a", "failed", "rel_err 0.3")), controls)
    assert result.verdict == "error" and "control run failed" in result.errors[0]


def test_an_unknown_check_is_an_error():
    run = run_check("routing:misspelled", REFERENCE)
    assert run.outcome == "error" and "KeyError" in run.detail
    assert classify(_REAL, _run(run), {**_PASSED, "routing:misspelled": run}).verdict == "error"


def test_a_mutant_that_changes_nothing_is_equivalent_and_not_killed():
    assert classify(_REAL, _run(CheckRun("a", "passed"), changed=None), _PASSED).verdict == "EQUIVALENT"


def test_controls_must_survive_unchanged():
    assert classify(_CONTROL, _run(CheckRun("a", "passed"), changed=None), _PASSED).verdict == "survived (control)"
    assert classify(_CONTROL, _run(CheckRun("a", "failed", "x"), changed=None), _PASSED).verdict == "KILLED (control)"
    assert not classify(_CONTROL, _run(CheckRun("a", "passed"), changed="logits"), _PASSED).ok


def test_a_missing_target_is_not_applicable():
    mutant = Mutant("ghost", "targets nothing", HISTORICAL, (Patch("moe:no_such_function", lambda o, c: o),), ())
    run = plant_and_run(mutant, REFERENCE, {}, first_kill=True)
    assert not run.applicable and classify(mutant, run, {}).verdict == "not applicable"
    with pytest.raises(NotApplicable):
        with replaced(REFERENCE, "nowhere:route", lambda o, c: o):
            pass


# --- the real catalogue -----------------------------------------------------------------------------------------

_FINGERPRINTS: dict[str, dict] = {}
_CONTROLS: dict[tuple[str, str], CheckRun] = {}


def _fingerprint(backend):
    if backend.name not in _FINGERPRINTS:
        _FINGERPRINTS[backend.name] = fingerprint(backend)
    return _FINGERPRINTS[backend.name]


def _control(key: str, backend) -> CheckRun:
    if (key, backend.name) not in _CONTROLS:
        _CONTROLS[key, backend.name] = run_check(key, backend)
    return _CONTROLS[key, backend.name]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_planting_every_mutant_leaves_the_whole_backend_bit_for_bit_unchanged(backend):
    """Plant each mutant in turn in one process (exercising the backend under it), then the backend's
    outputs on every probe input equal the unmutated ones bit for bit: nothing leaked."""
    import_backend(backend)
    before = _fingerprint(backend)
    for mutant in CATALOGUE:
        with contextlib.ExitStack() as stack:
            for patch in mutant.patches:
                stack.enter_context(replaced(backend, patch.target, patch.make))
            changed = first_difference(backend, before)
        assert (changed is None) == mutant.control, f"{mutant.key}: first changed output {changed}"
    assert first_difference(backend, before) is None


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("mutant", CATALOGUE, ids=lambda m: m.key)
def test_mutant_is_killed_by_an_assertion(mutant, backend):
    run = plant_and_run(mutant, backend, _fingerprint(backend), first_kill=not mutant.control)
    controls = {check.check: _control(check.check, backend) for check in run.checks}
    result = classify(MUTANTS[mutant.key], run, controls)
    expected = "survived (control)" if mutant.control else "killed"
    assert result.verdict == expected, (f"{mutant.key} on {backend.name}: {result.verdict}; killed by {result.killed_by}"
                                        f", errors {result.errors}, survived {result.survived}")
