"""The pipeline section of the report: every method's schedule checked statically, simulated against the bubble
column of SEMANTICS.md section 7, drawn as a Gantt chart, and executed on TensorFlow devices."""

from __future__ import annotations

from pathlib import Path

from dsv3_conformance.report.plots import gantt
from dsv3_conformance.backends import TF
from dsv3_conformance.checks.isolated import run_isolated
from dsv3_conformance.pipeline.schedules import METHODS, generate
from dsv3_conformance.pipeline.simulator import Times, bubble_formula, simulate
from dsv3_conformance.pipeline.static import check_schedule, expected_peak, peak_activations

# Times under which the table's bubbles are exact (simulator.py): the input-gradient part of a backward
# takes as long as a forward (B - W = F), and an overlapped pair no longer than F + B.
TABLE_TIMES = Times(F=1.0, B=2.0, W=1.0, FB=2.5)
SIZES = ((4, 8), (4, 20), (8, 16), (8, 20))
GANTT_SIZE = (4, 10)


def table_rows() -> list[dict]:
    rows = []
    for method in METHODS:
        for ranks, chunks in SIZES:
            schedule = generate(method, ranks, chunks)
            timeline = simulate(method, schedule, TABLE_TIMES)
            bubble = max(timeline.idle(rank) for rank in range(ranks))
            formula = bubble_formula(method, ranks, TABLE_TIMES)
            problems = check_schedule(method, schedule, chunks)
            rows.append({"method": method, "ranks": ranks, "micro-batches": chunks,
                         "step time": f"{timeline.step_time:g}", "bubble (simulated)": f"{bubble:g}",
                         "bubble (table)": f"{formula:g}",
                         "peak activations": f"{max(peak_activations(method, schedule))} (table "
                                             f"{expected_peak(method, ranks)})",
                         "static checks": "pass" if not problems else "FAIL: " + "; ".join(problems)[:200],
                         "status": "pass" if not problems and abs(bubble - formula) < 1e-9 else "FAIL"})
    return rows


def report_section(golden_dir, backends: list[str], out: Path):
    from dsv3_conformance.report.section import Section

    ranks, chunks = GANTT_SIZE
    timelines = [simulate(method, generate(method, ranks, chunks), TABLE_TIMES) for method in METHODS]
    rows = table_rows() + [{"method": row["method"], "ranks": row["ranks"], "micro-batches": row["micro-batches"],
                            "static checks": f"executed: {row['compared']}, {row['measured']}", "status": row["status"]}
                           for row in run_isolated("dsv3_conformance.pipeline.execution", TF)]
    intro = ("Schedules of DualPipe and DualPipeV (the DualPipe repository's order), 1F1B and ZB1P: static checks, the "
             "simulated bubble (longest idle time of a rank) against SEMANTICS.md section 7's table at F=1, B=2, W=1, "
             "F&B=2.5, and the TensorFlow executor's step against the micro-batches run in sequence (losses and "
             "outputs bit for bit, gradients within a cosine difference of 1e-13).")
    section = Section("Pipeline schedules", intro, rows,
                      {"Pipeline schedules (Gantt)": gantt(timelines, TABLE_TIMES, out / "pipeline_gantt.png")})
    section.passed = all(row["status"] == "pass" for row in rows)
    return section
