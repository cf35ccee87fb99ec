"""A pytest plugin that writes one JSON line per test: outcome, backend, and every comparison it made.

Enable with `-p dsv3_conformance.report.plugin --results-dir DIR`; under pytest-xdist each worker writes its
own file. `conformance.report.build` reads them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsv3_conformance.metrics import Comparison
from dsv3_conformance.verdict import LISTENERS

_directory: Path | None = None
_comparisons: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--results-dir", default=None, help="folder for per-test JSON lines (report plugin)")


def _listen(comparison: Comparison, policy_key: str) -> None:
    _comparisons.append({**comparison.to_json(), "policy": policy_key})


def pytest_configure(config: pytest.Config) -> None:
    global _directory
    if config.getoption("--results-dir"):
        _directory = Path(config.getoption("--results-dir"))
        _directory.mkdir(parents=True, exist_ok=True)
        LISTENERS.append(_listen)


def pytest_runtest_setup(item: pytest.Item) -> None:
    _comparisons.clear()
    params = getattr(item, "callspec", None)
    if params is not None and "backend" in params.params:
        backend = params.params["backend"]
        item.user_properties.append(("backend", getattr(backend, "name", backend)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One line per test: from its call, or from setup when it never got there (a skip or an error).

    Written by the process that ran the test: under xdist the controller sees the workers' reports again
    (they carry a `node`) and skips them.
    """
    if _directory is None or getattr(report, "node", None) is not None:
        return
    if not (report.when == "call" or (report.when == "setup" and report.outcome != "passed")):
        return
    message = report.longreprtext.strip().splitlines()[-1][:300] if report.outcome != "passed" else ""
    properties = dict(report.user_properties)
    line = {"nodeid": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 2),
            "backend": properties.get("backend"), "check": properties.get("check"),
            "component": properties.get("component"), "comparisons": list(_comparisons), "message": message,
            "not_compared": json.loads(properties.get("not_compared", "[]"))}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(_directory / f"results-{worker}.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")
