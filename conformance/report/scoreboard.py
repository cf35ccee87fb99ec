"""`dsv3-conformance scoreboard`: every check family of the suite (every golden case included) on each backend, as one
table of backend x family, like ONNX's backend coverage table.

A cell counts the family's checks on that backend: passed, FAILED, not compared (the backend could not run them:
each is listed with its part and reason below the table) and not applicable (by the check's definition), with the
worst comparison of the family: the one nearest its bound (or beyond it), as its error and its tolerance. Every
part may be missing here, so a check that compared something and missed only parts still reports what it compared;
one that compared nothing is "not compared", never passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tabulate import tabulate

from dsv3_conformance.backends import resolve_backends
from dsv3_conformance.report.runs import provenance, read_rows, run_suite
from dsv3_conformance.verdict import PARTS

OUTCOMES = ("passed", "FAILED", "not compared", "n/a")


def _outcome(row: dict) -> str:
    if row["outcome"] == "passed":
        return "passed"
    if row["outcome"] == "skipped":
        return "not compared" if row["not_compared"] else "n/a"
    return "FAILED"


def _worst(comparisons: list[dict]) -> dict | None:
    """The comparison nearest its bound, or furthest beyond it (a failed one first)."""
    bounded = [c for c in comparisons if c.get("tolerance")]
    if not bounded:
        return None
    return max(bounded, key=lambda c: (not c["passed"], c["rel_err"] / c["tolerance"]))


def _statistic(comparison: dict) -> str:
    name = "KL" if comparison.get("kl") else "rel_err"
    return f"{name} {comparison['rel_err']:.1e} / {comparison['tolerance']:.0e}"


def cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(backend, family) -> counts per outcome, the worst comparison and what was not compared."""
    table: dict[tuple[str, str], dict] = {}
    for row in rows:
        if not row.get("check") or not row.get("backend"):
            continue
        cell = table.setdefault((row["backend"], row["check"].split(":")[0]),
                                {**{outcome: 0 for outcome in OUTCOMES}, "comparisons": [], "not_compared": []})
        cell[_outcome(row)] += 1
        cell["comparisons"] += row["comparisons"]
        cell["not_compared"] += [{"check": row["check"], "what": what, "part": part, "reason": reason}
                                 for what, part, reason in row["not_compared"]]
    return table


def cell_text(cell: dict | None) -> str:
    if cell is None:
        return ""
    counts = ", ".join(f"{cell[outcome]} {outcome}" for outcome in OUTCOMES if cell[outcome])
    worst = _worst(cell["comparisons"])
    return counts + (f" (worst {_statistic(worst)})" if worst else "")


def table(rows: list[dict], backends: list[str], compact: bool = False) -> list[dict]:
    """One row per backend, one column per check family; `compact`: the counts alone, passed / FAILED / not
    compared (not applicable left out)."""
    found = cells(rows)
    families = sorted({family for _, family in found})

    def text(cell: dict | None) -> str:
        if not compact:
            return cell_text(cell)
        return "" if cell is None or not any(cell[o] for o in OUTCOMES[:3]) else \
            " / ".join(str(cell[o]) for o in OUTCOMES[:3])

    return [{"backend": backend, **{family: text(found.get((backend, family))) for family in families}}
            for backend in backends]


def write(rows: list[dict], backends: list[str], out: Path, provenance: dict) -> str:
    """scoreboard.md and scoreboard.json in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    found = cells(rows)
    missing: dict[str, dict[str, set[str]]] = {}  # backend -> part -> checks that missed it
    for (backend, _), cell in found.items():
        for item in cell["not_compared"]:
            missing.setdefault(backend, {}).setdefault(item["part"], set()).add(item["check"])
    text = "\n".join([
        "# Conformance scoreboard", "",
        f"Made {provenance['made']} from {provenance['commit']} on {provenance['machine']}: `{provenance['command']}`.",
        "", "At a glance, each cell the family's checks on that backend: passed / FAILED / not compared.", "",
        tabulate(table(rows, backends, compact=True), headers="keys", tablefmt="github", disable_numparse=True), "",
        "## With the worst comparisons", "",
        "Each cell: the family's checks on that backend (passed, FAILED, not compared, not applicable) and the "
        "comparison nearest its bound (error / tolerance; KL for quantized weights).", "",
        tabulate(table(rows, backends), headers="keys", tablefmt="github", disable_numparse=True), "",
        "## Not compared", "",
        "What each backend did not give, by part (conformance/verdict.py PARTS), with the number of checks that missed "
        "it; scoreboard.json lists every check and reason.", "",
        *([f"- {backend}: " + ", ".join(f"{part} ({len(checks)})" for part, checks in sorted(parts.items()))
           for backend, parts in sorted(missing.items())] or ["Nothing."]), ""])
    (out / "scoreboard.md").write_text(text)
    (out / "scoreboard.json").write_text(json.dumps(
        {"provenance": provenance, "backends": backends,
         "cells": [{"backend": backend, "family": family, **{k: v for k, v in cell.items() if k != "comparisons"},
                    "worst": _worst(cell["comparisons"])} for (backend, family), cell in sorted(found.items())]},
        indent=2))
    return text


def _scoreboard(args) -> int:
    backends = [spec.strip() for spec in args.backends.split(",") if spec.strip()]
    resolve_backends(backends)
    out = Path(args.out)
    if args.from_results:  # the tables again from an earlier run's rows
        rows = read_rows(out / "suite")
    else:
        _, rows = run_suite(backends, out / "suite", args.hypothesis_profile, allow=tuple(PARTS))
    text = write(rows, backends, out, provenance())
    print(text)
    failed = any(cell["FAILED"] for cell in cells(rows).values())
    print(f"wrote {out / 'scoreboard.md'} and scoreboard.json")
    return 1 if failed else 0


def add_command(commands, integer) -> None:
    from dsv3_conformance.profiles import PROFILES

    parser = commands.add_parser("scoreboard", help="every check family on each backend, as one table")
    parser.add_argument("--backends", required=True, help="comma-separated backends (names, entry points or "
                                                          "module:attribute)")
    parser.add_argument("--out", default="scoreboard", help="folder for scoreboard.md, scoreboard.json and the "
                                                            "suite's results")
    parser.add_argument("--hypothesis-profile", choices=PROFILES, default=os.environ.get("HYPOTHESIS_PROFILE", "ci"),
                        help="hypothesis profile of the checks (default: $HYPOTHESIS_PROFILE or ci)")
    parser.add_argument("--from-results", action="store_true", help="write the tables from the suite rows an earlier "
                                                                     "run left in OUT/suite, without running again")
    parser.set_defaults(run=_scoreboard)
