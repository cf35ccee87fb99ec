"""The mutation runner's verdicts are honest, planting is undone, and every mutant of the catalogue is caught.

Unit tests of the verdict rules use made-up check runs; the rest plants the real catalogue in each backend.
"""

from __future__ import annotations

import pytest

from dsv3_conformance.backends import REFERENCE
from dsv3_conformance.checks import CHECKS
from dsv3_conformance.mutation.catalogue import CATALOGUE, CONTROL, HISTORICAL, Mutant, Patch
from dsv3_conformance.mutation.planting import NotApplicable, replaced
from dsv3_conformance.mutation.runner import (CheckRun, MutantRun, Session, classify, plant_and_run, plant_in_turn,
                                              run_check)


def test_catalogue_covers_the_historical_bugs_and_has_controls():
    assert len([m for m in CATALOGUE if not m.control]) >= 19
    historical = {m.key for m in CATALOGUE if m.origin == HISTORICAL}
    assert historical >= {"gate-weights-from-biased-scores", "group-score-max-with-bias", "masked-groups-zero",
                          "rope-half-split", "yarn-mscale-missing", "yarn-mscale-applied-twice",
                          "route-scale-missing", "scoring-func-swapped"}
    assert {m.key for m in CATALOGUE} >= {"yarn-ramp-betas-swapped", "rope-on-nope-part", "softmax-scale-nope-only",
                                         "gate-bias-in-logits"}
    assert len([m for m in CATALOGUE if m.origin == CONTROL]) >= 1


def test_a_backend_plants_only_inside_its_own_package():
    """Holders of a planted function are searched in the backend's package alone: the tf backend's is
    dsv3_conformance.impl, not the namespace that also holds the reference and the harness."""
    from dsv3_conformance.backends import TF, Backend

    assert TF.packages == ("dsv3_conformance.impl",) and REFERENCE.packages == ("dsv3_conformance.reference",)
    assert TF.owns("dsv3_conformance.impl.moe") and TF.owns("dsv3_conformance.impl")
    assert not TF.owns("dsv3_conformance.reference.moe") and not TF.owns("dsv3_conformance.cli")
    assert not TF.owns("dsv3_conformance.implementation")
    user = Backend("user", REFERENCE.runner, mutation_targets={"moe": "mine.moe", "norm": "mine.layers.norm"})
    assert user.packages == ("mine",)
    apart = Backend("apart", REFERENCE.runner, mutation_targets={"moe": "one.moe", "norm": "two.norm"})
    assert apart.packages == ("one", "two")


def test_every_named_check_exists():
    from dsv3_conformance.checks import CHECKS

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


def test_where_the_first_failure_ends_checks_a_golden_case_stops_at_its_first_failing_part():
    """The runner's `first_kill` stops a golden check after the part (prefill, decode steps, MTP, speculative
    decoding) where a comparison first failed: still FAILED, with the same comparisons up to there, and nothing of
    the later parts; a case that passes still compares everything."""
    from broken_backends import FAITHFUL, GARBAGE

    from dsv3_conformance.golden.cases import GoldenCase, check_case
    from dsv3_conformance.paths import GOLDEN_DIR
    from dsv3_conformance.verdict import first_failure_ends_checks

    case = GoldenCase.load(GOLDEN_DIR / "official" / "v3-tiny-mtp")
    whole, passing = check_case(case, GARBAGE), check_case(case, FAITHFUL)
    with first_failure_ends_checks():
        cut, still_passing = check_case(case, GARBAGE), check_case(case, FAITHFUL)
    assert whole.failures and cut.failures and whole.verdict == cut.verdict == "FAILED"
    names = [c.name for c in cut.results]
    assert names == [c.name for c in whole.results][:len(names)] and len(names) < len(whole.results)
    assert any("mtp." in c.name for c in whole.results) and not any("mtp." in name or "decode." in name
                                                                    for name in names)
    assert still_passing.verdict == passing.verdict == "PASSED"
    assert [c.name for c in still_passing.results] == [c.name for c in passing.results]


def test_a_missing_target_is_not_applicable():
    mutant = Mutant("ghost", "targets nothing", HISTORICAL, (Patch("moe:no_such_function", lambda o, c: o),), ())
    run = plant_and_run(mutant, REFERENCE, {}, first_kill=True)
    assert not run.applicable and classify(mutant, run, {}).verdict == "not applicable"
    with pytest.raises(NotApplicable):
        with replaced(REFERENCE, "nowhere:route", lambda o, c: o):
            pass


# --- the real catalogue ---------------------------------------------------------------------------------------

def test_planting_every_mutant_in_one_process_leaves_the_whole_backend_bit_for_bit_unchanged():
    """Plant the whole catalogue in turn in this process (exercising the backend under each), then the backend's
    outputs on every probe input equal the unmutated ones bit for bit: nothing leaked; and every real mutant
    changed some output while the controls changed none. (The runner never depends on this: each of its
    mutants runs in a fresh process. The reference shows the planting machinery itself, which is the same
    for every backend.)"""
    assert plant_in_turn(REFERENCE.name) == []


def _groups():
    """The catalogue in groups spread over pytest's workers, each run as one session (one pool of fresh processes,
    one fingerprint per probe section), as `dsv3-conformance mutants` runs it: the reference's mutants, and the tf
    backend's in three groups of about equal cost (the model's semantics; fp8 and MTP; its native kernel, training
    step and distributed parts)."""
    from dsv3_conformance.mutation.probe import sections_of

    def reaches(mutant) -> set[str]:
        return set(sections_of(p.target.split(":")[0] for p in mutant.patches))

    distributed = {"kernel", "training", "pipeline", "expert-parallel"}
    heavy = {"mtp", "fp8-models"}
    every = [m.key for m in CATALOGUE]
    return [("reference", every),
            ("tf", [m.key for m in CATALOGUE if not reaches(m) & (distributed | heavy)]),
            ("tf", [m.key for m in CATALOGUE if reaches(m) & heavy and not reaches(m) & distributed]),
            ("tf", [m.key for m in CATALOGUE if reaches(m) & distributed])]


# The suite (conformance/suite/test_suite.py) runs every check unmutated on both backends in the same CI run and fails
# it if one does not pass: those are the control runs a kill needs, so the sessions here do not repeat them.
_PASSED_BY_THE_SUITE = {(key, backend): CheckRun(key, "passed", "asserted by the suite in the same run")
                        for key in CHECKS for backend in ("reference", "tf")}


@pytest.mark.long
@pytest.mark.parametrize("backend, keys", _groups(), ids=["reference", "tf-semantics", "tf-fp8-mtp", "tf-other"])
def test_every_mutant_is_killed_by_an_assertion_and_every_control_survives(backend, keys):
    """Planted in a fresh process, probed for a change, killed only by a check that passed unmutated; controls
    survive; a mutant that does not apply to the backend (a role it does not declare) is counted, not run."""
    results = Session(jobs=1, known_controls=_PASSED_BY_THE_SUITE).run([backend], keys, first_kill=True)
    expected = {result.mutant: "survived (control)" if result.control else "killed" for result in results}
    wrong = [f"{r.mutant}: {r.verdict}; killed by {r.killed_by}, errors {r.errors}, survived {r.survived}"
             for r in results if r.verdict != expected[r.mutant] and r.verdict != "not applicable"]
    assert not wrong, "\n".join(wrong)
    applied = {r.mutant for r in results if r.verdict != "not applicable"}
    if backend == "tf":  # every mutant applies to tf but the reference-only forced-routing one
        assert applied == set(keys) - {"first-k-dense-off-by-one"}, set(keys) - applied


def test_a_killed_mutant_needs_no_probe_and_an_unprobed_survivor_is_an_error():
    from dsv3_conformance.mutation.runner import SEEN_BY_A_CHECK

    killed = classify(_REAL, _run(CheckRun("a", "failed", "rel_err 0.3"), changed=SEEN_BY_A_CHECK), _PASSED)
    assert killed.verdict == "killed"
    unprobed = _run(CheckRun("a", "passed"), changed=None)
    unprobed.needs_probe = True
    assert classify(_REAL, unprobed, _PASSED).verdict == "error"
