"""Timing and result files shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from tabulate import tabulate

RESULTS = Path(__file__).parent / "results"


def median_seconds(run: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `run` after `warmup` untimed calls (compilation happens there)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gate(claim: str, measured: object, passed: bool) -> dict:
    """One performance claim with what was measured and whether it held."""
    return {"claim": claim, "measured": measured, "passed": bool(passed)}


def write_results(name: str, title: str, rows: list[dict], gates: list[dict], notes: str) -> Path:
    """benchmarks/results/<name>.json and .md: the measurements, the gates (claim, measured, pass) and notes."""
    RESULTS.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version()}
    payload = {"benchmark": name, "machine": machine, "rows": rows, "gates": gates, "notes": notes,
               "passed": all(gate["passed"] for gate in gates)}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {title}", "", notes, "", tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"), "",
             "## Gates", "", tabulate(gates, headers="keys", tablefmt="github", floatfmt=".3g"), "",
             f"Machine: {machine['processor']}, {machine['platform']}, Python {machine['python']}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.json"


def publish(name: str, title: str, rows: list[dict], gates: list[dict], notes: str) -> int:
    """Writes the results (write_results), says where, and returns the command's exit status: 1 when a gate was
    missed, each named on stderr."""
    print(write_results(name, title, rows, gates, notes))
    missed = [entry["claim"] for entry in gates if not entry["passed"]]
    for claim in missed:
        print(f"gate missed: {claim}", file=sys.stderr)
    return 1 if missed else 0
