"""Running the catalogue with honest verdicts.

Every check a mutant names first runs unmutated (the control run) and must pass. A mutant is killed
only by a check that passed its control run and then raised `CheckFailed`, the check's own assertion on
compared values; any other exception is an `error`, never a kill. A mutant no check killed (every
surviving control included) is then probed (probe.py): a mutant that changes no output of the backend is
equivalent, which a real mutant must not be and a control mutant must be; a killed one changed what its
check measured, so it is not probed, and no fingerprint is made for sections only killed mutants reach. Every task (a mutant, a control run, a fingerprint) runs in a
fresh process forked from a server that preloaded the backends and never had anything planted: no mutant
can leak into another, XLA compilations cannot pile up in one process (bounded memory), and every worker
loads the same hypothesis profile as pytest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import multiprocessing
import os
import pkgutil
import queue
import time
import traceback
from dataclasses import dataclass, field

from dsv3_conformance import cores
from dsv3_conformance.backends import BUILTIN, Backend, Unsupported, resolve_backend
from dsv3_conformance.verdict import CheckFailed, first_failure_ends_checks
from dsv3_conformance.mutation.catalogue import CATALOGUE, MUTANTS, ROLES, Mutant
from dsv3_conformance.mutation.planting import NotApplicable, import_backend, planted

@dataclass
class CheckRun:
    """One check on one backend, mutated or not: passed, failed (with what it measured), error or unsupported."""

    check: str
    outcome: str  # "passed" | "failed" | "error" | "unsupported"
    detail: str = ""
    seconds: float = 0.0


def _first_line(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def run_check(key: str, backend: Backend) -> CheckRun:
    from dsv3_conformance.checks import CHECKS

    start = time.perf_counter()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            CHECKS[key].run(backend)
    except CheckFailed as failure:
        return CheckRun(key, "failed", failure.detail[:300], time.perf_counter() - start)
    except Unsupported as reason:
        return CheckRun(key, "unsupported", str(reason)[:300], time.perf_counter() - start)
    except Exception as error:  # a crash or a harness bug: an error, never a verdict
        return CheckRun(key, "error", _first_line(error), time.perf_counter() - start)
    return CheckRun(key, "passed", "", time.perf_counter() - start)


@dataclass
class MutantRun:
    """A mutant planted in one backend: whether it changed anything, and each of its checks."""

    mutant: str
    backend: str
    applicable: bool = True
    changed: str | None = None  # the first probe output that differed; None: equivalent
    checks: list[CheckRun] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    needs_probe: bool = False  # no check killed it: the probe must still say whether it changed anything


# What a killed mutant records as its change: the check's own measurement (not probed).
SEEN_BY_A_CHECK = "seen by the check that killed it"


def probed_sections(mutant: Mutant) -> list[str]:
    """The probe's sections a mutant is probed in: those its targets' roles reach (what it replaces is all it can
    change), so that the fingerprint of a section is made only where some mutant needs it."""
    from dsv3_conformance.mutation.probe import sections_of

    return sections_of(patch.target.split(":")[0] for patch in mutant.patches)


def plant_and_run(mutant: Mutant, backend: Backend, unmutated: dict | None, first_kill: bool) -> MutantRun:
    """Plant `mutant` and run its checks (the first kill ends them when `first_kill`); unless one killed it, probe
    it against the `unmutated` fingerprint, or, when that is None, mark it to be probed (`needs_probe`)."""
    from dsv3_conformance.mutation.probe import first_difference

    run = MutantRun(mutant.key, backend.name)
    start = time.perf_counter()
    try:
        import_backend(backend)
        with planted(backend, mutant), first_failure_ends_checks() if first_kill else contextlib.nullcontext():
            for key in mutant.checks:
                run.checks.append(run_check(key, backend))
                if first_kill and run.checks[-1].outcome == "failed":
                    break
            if any(check.outcome == "failed" for check in run.checks):
                run.changed = SEEN_BY_A_CHECK
            elif unmutated is None:
                run.needs_probe = True
            else:
                run.changed = first_difference(backend, unmutated, probed_sections(mutant))
    except NotApplicable as reason:
        run.applicable, run.error = False, str(reason)
    except Exception as error:  # planting or probing broke: an error of the harness
        run.error = _first_line(error)
    run.seconds = time.perf_counter() - start
    return run


@dataclass
class MutantResult:
    """The verdict on one mutant in one backend."""

    mutant: str
    backend: str
    control: bool
    verdict: str  # killed | SURVIVED | survived (control) | KILLED (control) | EQUIVALENT | not applicable | error
    killed_by: list[str] = field(default_factory=list)  # "check: what it measured"
    survived: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict in ("killed", "survived (control)", "not applicable")

    @property
    def killed(self) -> bool:
        return bool(self.killed_by)

    def to_json(self) -> dict:
        return {"mutant": self.mutant, "backend": self.backend, "control": self.control, "verdict": self.verdict,
                "killed_by": self.killed_by, "survived": self.survived, "errors": self.errors,
                "changed_output": self.changed, "seconds": round(self.seconds, 1)}


def classify(mutant: Mutant, run: MutantRun, controls: dict[str, CheckRun]) -> MutantResult:
    """The verdict: a kill needs a check that passed unmutated and failed on its own assertion."""
    result = MutantResult(mutant.key, run.backend, mutant.control, "", changed=run.changed, seconds=run.seconds)
    if not run.applicable:
        result.verdict = "not applicable"
        return result
    if run.error:
        result.errors.append(run.error if run.error.startswith("probing:") else f"planting: {run.error}")
    if run.needs_probe:
        result.errors.append("not probed: whether it changed anything is unknown")
    for check in run.checks:
        control = controls.get(check.check)
        if control is None or control.outcome != "passed":
            result.errors.append(f"{check.check}: control run {control.outcome if control else 'missing'}"
                                 + (f" ({control.detail})" if control and control.detail else ""))
        elif check.outcome == "failed":
            result.killed_by.append(f"{check.check}: {check.detail}")
        elif check.outcome == "error":
            result.errors.append(f"{check.check}: {check.detail}")
        elif check.outcome == "passed":
            result.survived.append(check.check)
    if result.errors:
        result.verdict = "error"
    elif mutant.control:
        result.verdict = ("KILLED (control)" if result.killed_by else
                          "survived (control)" if run.changed is None else "EQUIVALENCE BROKEN (control)")
    elif run.changed is None:
        result.verdict = "EQUIVALENT"
    else:
        result.verdict = "killed" if result.killed_by else "SURVIVED"
    return result


# --- the pool --------------------------------------------------------------------------------------------------

def _control_task(key: str, backend_spec: str) -> CheckRun:
    return run_check(key, resolve_backend(backend_spec))


def _fingerprint_task(backend_spec: str, section: str) -> dict:
    from dsv3_conformance.mutation.probe import fingerprint

    return fingerprint(resolve_backend(backend_spec), [section])


def _mutant_task(key: str, backend_spec: str, first_kill: bool) -> MutantRun:
    return plant_and_run(MUTANTS[key], resolve_backend(backend_spec), None, first_kill)


def _probe_task(key: str, backend_spec: str, unmutated: dict) -> tuple[str | None, str]:
    """(the first output the planted mutant changes or None, an error of the probe or ""), in a fresh process."""
    from dsv3_conformance.mutation.probe import first_difference

    mutant, backend = MUTANTS[key], resolve_backend(backend_spec)
    try:
        import_backend(backend)
        with planted(backend, mutant):
            return first_difference(backend, unmutated, probed_sections(mutant)), ""
    except Exception as error:  # probing broke: an error of the harness
        return None, f"probing: {_first_line(error)}"


def plant_in_turn(backend_spec: str, keys: list[str] | None = None) -> list[str]:
    """Plant each mutant in turn in this process, exercising the whole backend under it, then compare the
    whole backend with its unmutated fingerprint. Problems: a real mutant that changed no output, a control
    that changed one, and any output still different after all were removed.

    The runner never relies on this (each of its mutants runs in a process of its own); it shows that
    planting alone, in one process, also undoes itself completely."""
    from dsv3_conformance.mutation.probe import fingerprint, first_difference

    backend = resolve_backend(backend_spec)
    import_backend(backend)
    before = fingerprint(backend)
    problems = []
    applied = 0
    for mutant in select(keys):
        try:
            with planted(backend, mutant):
                changed = first_difference(backend, before)
        except NotApplicable:
            continue
        applied += 1
        if (changed is None) != mutant.control:
            problems.append(f"{mutant.key}: first changed output {changed}")
    if (left := first_difference(backend, before)) is not None:
        problems.append(f"after planting and removing {applied} mutants: {left} differs from before")
    return problems


def _worker_init(profile: str, threads: int) -> None:
    os.environ["HYPOTHESIS_PROFILE"] = profile
    cores.give_tensorflow(threads)  # the workers share the cores this process was given
    from dsv3_conformance import profiles

    profiles.load(profile)


def _preload(backend_specs: list[str]) -> list[str]:
    """Modules the fork server imports once, so that every fresh worker starts with them (TensorFlow's import
    alone takes seconds): the checks, the probe, and every module of the built-in and the selected backends.
    Nothing is ever planted in the server."""
    modules = ["numpy", "hypothesis", "dsv3_conformance.checks", "dsv3_conformance.mutation.probe"]
    backends = {backend.name: backend for backend in BUILTIN.values()}
    backends.update({resolve_backend(spec).name: resolve_backend(spec) for spec in backend_specs})
    for backend in backends.values():
        for package_name in backend.packages:
            spec = importlib.util.find_spec(package_name)
            if spec is None or not spec.submodule_search_locations:
                continue
            modules.append(package_name)
            modules += [info.name for info in pkgutil.walk_packages(spec.submodule_search_locations,
                                                                     prefix=f"{package_name}.")]
    return list(dict.fromkeys(modules))


def _pool(jobs: int, profile: str, backend_specs: list[str]):
    """`jobs` workers, each task in a fresh process forked from a server that preloaded the backends: a mutant
    can never leak into another task, and XLA compilations never pile up in one process (bounded memory)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_preload(backend_specs))
    threads = cores.share(jobs)
    # multiprocessing.Pool, not ProcessPoolExecutor: its one-task workers (maxtasksperchild) are reliable on 3.11.
    return context.Pool(max(jobs, 1), initializer=_worker_init, initargs=(profile, threads), maxtasksperchild=1)


def select(keys: list[str] | None) -> list[Mutant]:
    unknown = sorted(set(keys or []) - set(MUTANTS))
    if unknown:
        raise KeyError(f"unknown mutant(s) {unknown}: see `dsv3-conformance mutants --list`")
    return [mutant for mutant in CATALOGUE if not keys or mutant.key in keys]


class Session:
    """Mutant runs with shared unmutated work: each backend's fingerprint and each check's control run are made
    once per session and reused by every later run (the report hands in the suite's own runs as controls)."""

    def __init__(self, jobs: int = 1, profile: str = "ci",
                 known_controls: dict[tuple[str, str], CheckRun] | None = None):
        self.jobs, self.profile = jobs, profile
        self.controls: dict[tuple[str, str], CheckRun] = dict(known_controls or {})  # (check, backend name)
        self.fingerprints: dict[tuple[str, str], dict] = {}  # (backend name, probe section) -> its outputs

    def run(self, backend_specs: list[str], keys: list[str] | None = None,
            first_kill: bool = False) -> list[MutantResult]:
        """The selected mutants on each backend, with the control run of every check they ran, in fresh
        processes (`jobs` at a time)."""
        from tqdm.auto import tqdm

        mutants = select(keys)
        backends = {spec: resolve_backend(spec) for spec in backend_specs}
        names = {spec: backend.name for spec, backend in backends.items()}
        runs: dict[tuple[str, str], MutantRun] = {}
        finished: queue.Queue = queue.Queue()
        progress = tqdm(total=len(backend_specs) * len(mutants), desc="controls and mutants", unit="task")
        with _pool(self.jobs, self.profile, backend_specs) as pool:
            pending = 0

            def submit(kind: str, key: str, spec: str, task, *args) -> None:
                nonlocal pending
                pending += 1
                pool.apply_async(task, args, callback=lambda result: finished.put((kind, key, spec, result, None)),
                                 error_callback=lambda error: finished.put((kind, key, spec, None, error)))

            waiting = {spec: [m for m in mutants if all(p.target.split(":")[0] in backends[spec].mutation_targets
                                                          for p in m.patches)] for spec in backend_specs}
            for spec in backend_specs:  # a role the backend does not declare: not applicable, nothing to run
                for mutant in mutants:
                    if mutant not in waiting[spec]:
                        runs[(mutant.key, spec)] = MutantRun(mutant.key, names[spec], applicable=False,
                                                             error=f"backend {names[spec]} declares no module for a "
                                                                   "role this mutant plants in")
                        progress.update()

            probing: dict[str, list[Mutant]] = {spec: [] for spec in backend_specs}

            def ready(spec: str) -> None:
                """Probe every surviving mutant of `spec` whose probe sections all have their fingerprint."""
                for mutant in list(probing[spec]):
                    sections = probed_sections(mutant)
                    if all(self.fingerprints.get((names[spec], section)) is not None for section in sections):
                        probing[spec].remove(mutant)
                        unmutated = {section: self.fingerprints[(names[spec], section)] for section in sections}
                        progress.total += 1
                        submit("probe", mutant.key, spec, _probe_task, mutant.key, spec, unmutated)

            def probe(mutant: Mutant, spec: str) -> None:
                """A survivor is probed against the unmutated fingerprint of each section it reaches, made once."""
                probing[spec].append(mutant)
                for section in probed_sections(mutant):
                    if (names[spec], section) not in self.fingerprints:
                        self.fingerprints[(names[spec], section)] = None  # scheduled
                        progress.total += 1
                        submit("fingerprint", section, spec, _fingerprint_task, spec, section)
                ready(spec)

            def control(key: str, spec: str) -> None:
                if (key, names[spec]) not in self.controls:
                    self.controls[(key, names[spec])] = None  # scheduled
                    progress.total += 1
                    submit("control", key, spec, _control_task, key, spec)

            # Every mutant runs its checks at once; only the survivors wait for fingerprints. When every mutant
            # runs every check it names, every control run is queued at once; stopping at the first kill, only
            # those of the checks some mutant did run.
            for spec in backend_specs:
                for mutant in waiting[spec]:
                    submit("mutant", mutant.key, spec, _mutant_task, mutant.key, spec, first_kill)
            if not first_kill:
                for key, spec in sorted({(key, spec) for spec in backend_specs for m in mutants for key in m.checks}):
                    control(key, spec)
            while pending:
                kind, key, spec, result, error = finished.get()
                pending -= 1
                progress.update()
                if error is not None:
                    raise RuntimeError(f"{kind} task {key or spec} on {spec} died in its worker: {error!r}") from error
                if kind == "fingerprint":
                    self.fingerprints[(names[spec], key)] = result[key]
                    ready(spec)
                elif kind == "mutant":
                    runs[(key, spec)] = result
                    for check in result.checks:
                        control(check.check, spec)
                    if result.needs_probe:
                        probe(MUTANTS[key], spec)
                elif kind == "probe":
                    run = runs[(key, spec)]
                    run.changed, run.needs_probe = result[0], False
                    run.error = run.error or result[1]
                else:
                    self.controls[(key, names[spec])] = result
        progress.close()
        results = []
        for spec in backend_specs:
            backend_controls = {key: run for (key, name), run in self.controls.items() if name == names[spec]}
            for mutant in mutants:
                result = classify(mutant, runs[(mutant.key, spec)], backend_controls)
                result.backend = names[spec]
                results.append(result)
        return results


def summarize(results: list[MutantResult]) -> tuple[str, str]:
    """The verdict on a mutation run and its line: FAILED when a real mutant survived (or was equivalent, or broke)
    or a control was killed; INCOMPLETE when no mutant applies to some backend, which then proves nothing about
    the checks on it; PASSED otherwise. Mutants that do not apply to a backend (a role it does not declare) are
    counted, not run."""
    from dsv3_conformance.verdict import FAILED, INCOMPLETE, PASSED

    real = [r for r in results if not r.control and r.verdict != "not applicable"]
    controls = [r for r in results if r.control]
    bad = [f"{r.mutant} on {r.backend}: {r.verdict}" for r in results if not r.ok]
    backends = list(dict.fromkeys(r.backend for r in results))
    idle = [name for name in backends if all(r.verdict == "not applicable" for r in results if r.backend == name)]
    unapplied = sum(r.verdict == "not applicable" for r in results)
    line = (f"{sum(r.verdict == 'killed' for r in real)}/{len(real)} mutants killed, "
            f"{sum(r.ok for r in controls)}/{len(controls)} controls survived"
            + (f", {unapplied} not applicable" if unapplied else ""))
    if bad:
        return FAILED, f"FAILED: {line}; NOT OK: {', '.join(bad)}"
    if idle:
        return INCOMPLETE, (f"INCOMPLETE: {line}; no mutant applies to {', '.join(idle)}: a backend must declare "
                            f"Backend.mutation_targets, the module playing each role ({', '.join(ROLES)}), for the "
                            "catalogue to test the checks on it")
    return PASSED, f"PASSED: {line}"


def run_catalogue(backend_specs: list[str], keys: list[str] | None = None, first_kill: bool = False,
                  jobs: int = 1, profile: str = "ci",
                  known_controls: dict[tuple[str, str], CheckRun] | None = None) -> list[MutantResult]:
    """One session's run of the selected mutants on each backend. `known_controls` ((check, backend name) ->
    run) are unmutated runs made already, by the suite in the same session: they are not repeated."""
    return Session(jobs, profile, known_controls).run(backend_specs, keys, first_kill)
