"""The conformance suite's pytest plugin (entry point `pytest11`, name `dsv3_conformance`): its options (which
backends, at which scale, what may be missing) and its verdict. It acts only on the suite's own tests (this
package), so it is inert in any other pytest run of the environment; `pytest --pyargs dsv3_conformance.suite` runs the
suite from anywhere.

A check a backend could not run, in whole or in part, is skipped as not compared (conformance/suite/test_suite.py).
At the end of the session this plugin prints what ran, passed, failed and was not compared per check family
and backend, with the reasons, and one verdict line; a session with something not compared that
`--allow-missing` does not name exits 1 (INCOMPLETE), never 0. Under pytest-xdist the controller sees every
worker's reports, so the verdict covers the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3_conformance.backends import DEFAULT_BACKENDS, Backend, resolve_backends
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.verdict import FAILED, INCOMPLETE, Missing, allowed, outcome, parse_allow

NOT_COMPARED = "not_compared"
SUITE = Path(__file__).resolve().parent


def _in_suite(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(SUITE)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3-conformance")
    group.addoption("--backend", default=",".join(DEFAULT_BACKENDS),
                    help="comma-separated backends: built-in names, entry-point names or package.module:object "
                         f"(default: {','.join(DEFAULT_BACKENDS)})")
    group.addoption("--scale", choices=("fast", "small", "full"), default="fast",
                    help="fast: the CI tier; small and full add checks on larger models")
    group.addoption("--checkpoint", default=None, help="a real checkpoint folder for the full tier's layer check")
    group.addoption("--layer", type=int, default=None, help="which layer of --checkpoint (default: the first MoE)")
    group.addoption("--allow-missing", default="", metavar="PARTS",
                    help="comma-separated parts, check families or check keys that may be not compared (e.g. "
                         "mtp,fp8): listed at the end, but the verdict is not INCOMPLETE for them")


def selected_backends(config: pytest.Config) -> list[Backend]:
    try:
        return resolve_backends(config.getoption("--backend"))
    except BadInput as error:
        raise pytest.UsageError(str(error)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and _in_suite(metafunc.definition.path):
        backends = selected_backends(metafunc.config)
        metafunc.parametrize("backend", backends, ids=[backend.name for backend in backends])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = ["fast", "small", "full"]
    chosen = order.index(config.getoption("--scale"))
    for item in items:
        if not _in_suite(item.path):
            continue
        for scale in order[1:]:
            if item.get_closest_marker(scale) and order.index(scale) > chosen:
                item.add_marker(pytest.mark.skip(reason=f"needs --scale {scale}"))


class Coverage:
    """The session's outcomes per (check family, backend), and everything not compared."""

    def __init__(self, allow: tuple[str, ...]):
        self.allow = allow
        self.families: dict[tuple[str, str], dict[str, int]] = {}
        self.missing: list[tuple[str, Missing]] = []  # (backend, what)

    def add(self, report: pytest.TestReport) -> None:
        properties = dict(report.user_properties)
        check, backend = properties.get("check"), properties.get("backend")
        if check is None or not (report.when == "call" or (report.when == "setup" and report.outcome != "passed")):
            return
        counts = self.families.setdefault((check.split(":")[0], backend or "-"), {
            "ran": 0, "passed": 0, "failed": 0, "not compared": 0, "not applicable": 0})
        if NOT_COMPARED in properties:  # a check that passed with only allowed parts missing lists them too
            self.missing += [(backend, Missing(*fields, check)) for fields in json.loads(properties[NOT_COMPARED])]
        if NOT_COMPARED in properties and report.outcome == "skipped":
            counts["not compared"] += 1
        elif report.outcome == "skipped":
            counts["not applicable"] += 1
        else:
            counts["ran"] += 1
            counts["passed" if report.outcome == "passed" else "failed"] += 1

    def verdict(self, exitstatus: int) -> str:
        if exitstatus not in (0, 5):
            return FAILED
        compared = sum(counts["ran"] for counts in self.families.values())
        return outcome(False, compared, [m for _, m in self.missing], self.allow)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "small: runs with --scale small or full")
    config.addinivalue_line("markers", "full: runs with --scale full")
    config.addinivalue_line("markers", "oracle: needs torch and transformers (the oracle extra)")
    allow: tuple[str, ...] = ()
    if config.getoption("--allow-missing"):
        from dsv3_conformance.checks import CHECKS

        known = set(CHECKS) | {key.split(":")[0] for key in CHECKS}
        try:
            allow = parse_allow(config.getoption("--allow-missing"), known)
        except BadInput as error:
            raise pytest.UsageError(str(error)) from None
    config.stash[_COVERAGE] = Coverage(allow)


_COVERAGE = pytest.StashKey[Coverage]()


_CONFIG: list[pytest.Config] = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _CONFIG:
        _CONFIG[0].stash[_COVERAGE].add(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller judges
        return
    coverage = session.config.stash[_COVERAGE]
    if coverage.families and coverage.verdict(int(exitstatus)) == INCOMPLETE:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    coverage = config.stash[_COVERAGE]
    if not coverage.families:
        return
    write = terminalreporter.write_line
    terminalreporter.section("dsv3-conformance coverage")
    header = f"{'family':<14}{'backend':<18}{'ran':>5}{'passed':>8}{'failed':>8}{'not compared':>14}{'n/a':>6}"
    write(header)
    for (family, backend), counts in sorted(coverage.families.items()):
        write(f"{family:<14}{backend:<18}{counts['ran']:>5}{counts['passed']:>8}{counts['failed']:>8}"
              f"{counts['not compared']:>14}{counts['not applicable']:>6}")
    for backend, missing in coverage.missing:
        mark = "allowed" if allowed(missing, coverage.allow) else "NOT COMPARED"
        write(f"{mark}: {backend}: {missing.check or missing.what}: {missing.what if missing.check else ''} "
              f"[{missing.part}] {missing.reason[:200]}")
    verdict = coverage.verdict(int(exitstatus))
    parts = sorted({m.part for _, m in coverage.missing if not allowed(m, coverage.allow)})
    tail = f": not compared ({', '.join(parts)}); allow with --allow-missing {','.join(parts)}" if parts else ""
    write(f"{verdict}{tail if verdict == INCOMPLETE else ''}", bold=True)


@pytest.fixture(scope="session")
def allowed_missing(pytestconfig) -> tuple[str, ...]:
    """What `--allow-missing` allows to be not compared."""
    return pytestconfig.stash[_COVERAGE].allow


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR
