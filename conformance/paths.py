"""Where the harness's shipped data lives."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "golden"
# The project's recorded results (what the report shows): written only when a command is asked to (--write).
RESULTS_DIR = ROOT / "benchmarks" / "results"
