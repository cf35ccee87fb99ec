"""Runs that the report and the scoreboard share: the suite under the report plugin, and the provenance of a result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Tests that are not registered checks, by module.
COMPONENTS = {"test_data": "golden data", "test_divergences": "PyTorch oracle", "test_checkpoint_layer": "scale tiers"}


def provenance() -> dict[str, str]:
    """When, from what commit, on which machine and by which command the report was made."""
    from datetime import datetime, timezone

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True) \
        if (root / ".git").exists() else None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip() if done and done.returncode == 0 else ""
    commit = (done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")) if done and done.returncode == 0 \
        else "an installed package (no checkout)"
    return {"made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["dsv3-conformance" if sys.argv[0].endswith(("dsv3-conformance", "__main__.py",
                                                                               "cli.py")) else sys.argv[0],
                                 *sys.argv[1:]])}


def run_suite(backends: list[str], results_dir: Path, profile: str,
              allow: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    """Run `pytest conformance/` with the report plugin; returns its exit status and one row per test."""
    results_dir = results_dir.resolve()  # pytest runs in the project's folder
    results_dir.mkdir(parents=True, exist_ok=True)
    for stale in results_dir.glob("results-*.jsonl"):
        stale.unlink()
    suite = Path(__file__).resolve().parents[1]  # conformance/: its conftest.py and suite/
    command = [sys.executable, "-m", "pytest", str(suite), "-n", "auto", "-q", "-p", "dsv3_conformance.report.plugin",
               "--results-dir", str(results_dir), "--backend", ",".join(backends), "-p", "no:cacheprovider",
               "--hypothesis-profile", profile, "--allow-missing", ",".join(allow)]
    path = os.pathsep.join(filter(None, [str(suite.parent), os.environ.get("PYTHONPATH")]))
    status = subprocess.call(command, cwd=suite.parent, env={**os.environ, "PYTHONPATH": path})
    return status, read_rows(results_dir)


def read_rows(results_dir: Path) -> list[dict]:
    """The rows a suite run under the report plugin wrote to `results_dir`, one per test."""
    rows = []
    for path in sorted(Path(results_dir).glob("results-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        module = row["nodeid"].split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        row["component"] = row.get("component") or COMPONENTS.get(module, module)
        row["check"] = row.get("check") or row["nodeid"].split("::")[-1]
    return sorted(rows, key=lambda r: (r["component"], r["check"], r["backend"] or ""))
