"""Running the catalogue with honest verdicts.

Every check a mutant names first runs unmutated (the control run) and must pass. A mutant is killed
only by a check that passed its control run and then raised `CheckFailed`, the check's own assertion on
compared values; any other exception is an `error`, never a kill. Before its checks, every mutant is
probed (probe.py): a mutant that changes no output of the backend is equivalent, which a real mutant
must not be and a control mutant must be. Every task runs in a worker process that is replaced after a
few tasks, so XLA compilations cannot pile up in one process (bounded memory), and every worker loads
the same hypothesis profile as pytest.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import queue
import time
import traceback
from dataclasses import dataclass, field

from ..backends import Backend, Unsupported, resolve_backend
from ..verdict import CheckFailed
from .catalogue import CATALOGUE, MUTANTS, Mutant
from .planting import NotApplicable, import_backend, replaced

# Tasks a worker runs before it is replaced by a fresh process.
TASKS_PER_WORKER = 20


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
    from ..checks import CHECKS

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


def plant_and_run(mutant: Mutant, backend: Backend, unmutated: dict, first_kill: bool) -> MutantRun:
    """Plant `mutant`, probe against the `unmutated` fingerprint, then run its checks (the first kill ends it
    when `first_kill`)."""
    from .probe import first_difference

    run = MutantRun(mutant.key, backend.name)
    start = time.perf_counter()
    try:
        import_backend(backend)
        with contextlib.ExitStack() as stack:
            for patch in mutant.patches:
                stack.enter_context(replaced(backend, patch.target, patch.make))
            run.changed = first_difference(backend, unmutated)
            for key in mutant.checks:
                run.checks.append(run_check(key, backend))
                if first_kill and run.checks[-1].outcome == "failed":
                    break
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
        result.errors.append(f"planting: {run.error}")
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


def _fingerprint_task(backend_spec: str) -> dict:
    from .probe import fingerprint

    return fingerprint(resolve_backend(backend_spec))


def _mutant_task(key: str, backend_spec: str, unmutated: dict, first_kill: bool) -> MutantRun:
    return plant_and_run(MUTANTS[key], resolve_backend(backend_spec), unmutated, first_kill)


# Mutants planted in turn in one process by the planting check: enough to show that removal is complete
# across many plantings, few enough that TensorFlow's compiled programs stay bounded (it has segfaulted
# after every mutant's programs were compiled in one process).
PLANTING_GROUP = 12


def plant_in_turn(keys: list[str], backend_spec: str) -> list[str]:
    """Plant each mutant in turn in this process, exercising the whole backend under it, then compare the
    whole backend with its unmutated fingerprint. Problems: a real mutant that changed no output, a control
    that changed one, and any output still different after all were removed."""
    from .probe import fingerprint, first_difference

    backend = resolve_backend(backend_spec)
    import_backend(backend)
    before = fingerprint(backend)
    problems = []
    for key in keys:
        mutant = MUTANTS[key]
        with contextlib.ExitStack() as stack:
            for patch in mutant.patches:
                stack.enter_context(replaced(backend, patch.target, patch.make))
            changed = first_difference(backend, before)
        if (changed is None) != mutant.control:
            problems.append(f"{key}: first changed output {changed}")
    if (left := first_difference(backend, before)) is not None:
        problems.append(f"after planting and removing {', '.join(keys)}: {left} differs from before")
    return problems


def check_planting(backend_spec: str, profile: str = "ci") -> list[str]:
    """`plant_in_turn` over the whole catalogue, PLANTING_GROUP mutants per fresh process."""
    keys = [mutant.key for mutant in CATALOGUE]
    groups = [keys[i:i + PLANTING_GROUP] for i in range(0, len(keys), PLANTING_GROUP)]
    with multiprocessing.get_context("spawn").Pool(1, initializer=_worker_init, initargs=(profile, os.cpu_count() or 1),
                                                   maxtasksperchild=1) as pool:
        return [problem for problems in pool.starmap(plant_in_turn, [(group, backend_spec) for group in groups])
                for problem in problems]


def _worker_init(profile: str, threads: int) -> None:
    os.environ["HYPOTHESIS_PROFILE"] = profile
    # The workers share the machine's cores: each runs TensorFlow on its share (set before TF is imported).
    os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
    from .. import profiles

    profiles.load(profile)


def select(keys: list[str] | None) -> list[Mutant]:
    unknown = sorted(set(keys or []) - set(MUTANTS))
    if unknown:
        raise KeyError(f"unknown mutant(s) {unknown}: see `dsv3-conformance mutants --list`")
    return [mutant for mutant in CATALOGUE if not keys or mutant.key in keys]


def run_catalogue(backend_specs: list[str], keys: list[str] | None = None, first_kill: bool = False,
                  jobs: int = 1, profile: str = "ci",
                  known_controls: dict[tuple[str, str], CheckRun] | None = None) -> list[MutantResult]:
    """Mutant runs of the selected mutants on each backend, and the control run of every check they ran, in
    `jobs` fresh-process workers. `known_controls` ((check, backend name) -> run) are unmutated runs made
    already, by the suite in the same session: they are not repeated."""
    from tqdm.auto import tqdm

    mutants = select(keys)
    names = {spec: resolve_backend(spec).name for spec in backend_specs}
    controls: dict[tuple[str, str], CheckRun] = {
        (key, spec): run for (key, name), run in (known_controls or {}).items() for spec in backend_specs
        if names[spec] == name}
    runs: dict[tuple[str, str], MutantRun] = {}
    finished: queue.Queue = queue.Queue()
    progress = tqdm(total=len(backend_specs) * (1 + len(mutants)), desc="controls and mutants", unit="task")
    # multiprocessing.Pool, not ProcessPoolExecutor: its worker recycling (maxtasksperchild) is reliable on 3.11.
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    with multiprocessing.get_context("spawn").Pool(max(jobs, 1), initializer=_worker_init, initargs=(profile, threads),
                                                   maxtasksperchild=TASKS_PER_WORKER) as pool:
        pending = 0

        def submit(kind: str, key: str, spec: str, task, *args) -> None:
            nonlocal pending
            pending += 1
            pool.apply_async(task, args, callback=lambda result: finished.put((kind, key, spec, result, None)),
                             error_callback=lambda error: finished.put((kind, key, spec, None, error)))

        # Unmutated fingerprints first: every mutant of a backend is probed against the same one. Every control
        # run is queued at once; with --first-kill, only those of the checks some mutant did run.
        for spec in backend_specs:
            submit("fingerprint", "", spec, _fingerprint_task, spec)
        if not first_kill:
            for key, spec in sorted({(key, spec) for spec in backend_specs for m in mutants for key in m.checks}):
                if (key, spec) not in controls:
                    controls[(key, spec)] = None  # scheduled
                    progress.total += 1
                    submit("control", key, spec, _control_task, key, spec)
        while pending:
            kind, key, spec, result, error = finished.get()
            pending -= 1
            progress.update()
            if error is not None:
                raise RuntimeError(f"{kind} task {key or spec} on {spec} died in its worker: {error!r}") from error
            if kind == "fingerprint":
                for mutant in mutants:
                    submit("mutant", mutant.key, spec, _mutant_task, mutant.key, spec, result, first_kill)
            elif kind == "mutant":
                runs[(key, spec)] = result
                for check in result.checks:
                    if (check.check, spec) not in controls:
                        controls[(check.check, spec)] = None  # scheduled
                        progress.total += 1
                        submit("control", check.check, spec, _control_task, check.check, spec)
            else:
                controls[(key, spec)] = result
    progress.close()
    results = []
    for spec in backend_specs:
        backend_controls = {key: run for (key, s), run in controls.items() if s == spec}
        for mutant in mutants:
            result = classify(mutant, runs[(mutant.key, spec)], backend_controls)
            result.backend = names[spec]
            results.append(result)
    return results
