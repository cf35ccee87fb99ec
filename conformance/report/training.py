"""The training section of the report: the last results of each experiment (conformance/studies/experiments.py,
stored in benchmarks/results with the machine that made them), with their plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsv3_conformance.report.section import Section, stored_note
from dsv3_conformance.paths import RESULTS_DIR as RESULTS
from dsv3_conformance.studies.experiments import EXPERIMENTS


def shown(value) -> str:
    """A number, a list of them, or a mean with its spread over seeds, as the report prints it."""
    if isinstance(value, dict):
        return f"{value['mean']:.4g} (seeds: {', '.join(f'{v:.3g}' for v in value['per seed'])})"
    if isinstance(value, list):
        return ", ".join(f"{v:.3g}" for v in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_section(golden_dir, backends: list[str], out: Path):
    """The last results of each experiment (benchmarks/results), with their plots."""

    rows, figures, notes, claims = [], {}, [], {}
    for name in EXPERIMENTS:
        path = RESULTS / f"experiment-{name}.json"
        if not path.is_file():
            rows.append({"experiment": name, "status": f"not run: dsv3-conformance experiment {name}"})
            continue
        result = json.loads(path.read_text())
        notes.append(stored_note(result, path))
        for run_name, numbers in result["summary"].items():
            rows.append({"experiment": f"{name} ({result['steps']} steps)", "run": run_name,
                         **{k: shown(v) for k, v in numbers.items()}})
        for claim, held in result["claims"].items():
            rows.append({"experiment": name, "run": f"claim: {claim}", "status": "holds" if held else "does not hold"})
            claims[f"training, {name}: {claim}"] = bool(held)
        figure = out / f"experiment-{name}.png"
        shutil.copyfile(RESULTS / f"experiment-{name}.png", figure)
        figures[f"Training experiment: {name}"] = figure
    intro = ("The report's training claims at a small scale (conformance/studies/experiments.py; data: the Python standard "
             "library's source as bytes). Claims are reported as measured, whichever way they go.")
    return Section("Training experiments", intro, rows, figures, stored="; ".join(notes), claims=claims)


