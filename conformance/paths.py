"""Where the harness's shipped data lives: in a checkout, the repository's folders; installed, the package data."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The golden cases and their manifest: `golden/` of the checkout, installed as the package data
# `dsv3_conformance/golden/shipped` (pyproject.toml maps one onto the other).
GOLDEN_DIR = ROOT / "golden" if (ROOT / "golden" / "manifest.json").is_file() else \
    Path(__file__).resolve().parent / "golden" / "shipped"
# The project's recorded results (what the report shows): written only when a command is asked to (--write).
RESULTS_DIR = ROOT / "benchmarks" / "results"
