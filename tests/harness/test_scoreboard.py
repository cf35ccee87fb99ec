"""The scoreboard's table: per backend and check family, counts of passed / FAILED / not compared / not applicable
checks and the comparison nearest its bound, from the suite's per-test rows (written here by hand, so that every
count is known), and the command's exit status: 1 when any cell holds a failure."""

from __future__ import annotations

import json
from types import SimpleNamespace

from dsv3_conformance.report import scoreboard


def _row(check, backend, outcome, comparisons=(), not_compared=()):
    return {"check": check, "backend": backend, "outcome": outcome, "comparisons": list(comparisons),
            "not_compared": [list(item) for item in not_compared], "nodeid": f"x::{check}", "message": ""}


def _comparison(rel_err, tolerance, passed=True, kl=None):
    return {"name": "t", "rel_err": rel_err, "tolerance": tolerance, "passed": passed, **({"kl": kl} if kl else {})}


ROWS = [
    _row("golden:a", "one", "passed", [_comparison(1e-6, 1e-5), _comparison(5e-6, 1e-5)]),
    _row("golden:b", "one", "failed", [_comparison(2e-5, 1e-5, passed=False)]),
    _row("golden:c", "one", "skipped", not_compared=[("mtp.0.logits", "mtp", "no MTP modules")]),
    _row("routing:k", "one", "skipped"),
    _row("golden:a", "two", "passed", [_comparison(0.1, 0.6, kl=[0.01, 0.05, 0.1])],
         not_compared=[("prefill.layer.0.hidden", "hidden", "no block outputs")]),
]


def test_cells_count_every_outcome_and_keep_the_comparison_nearest_its_bound():
    table = {row["backend"]: row for row in scoreboard.table(ROWS, ["one", "two"])}
    assert table["one"]["golden"] == "1 passed, 1 FAILED, 1 not compared (worst rel_err 2.0e-05 / 1e-05)"
    assert table["one"]["routing"] == "1 n/a"
    assert table["two"]["golden"] == "1 passed (worst KL 1.0e-01 / 6e-01)"
    assert table["two"]["routing"] == ""
    compact = {row["backend"]: row for row in scoreboard.table(ROWS, ["one", "two"], compact=True)}
    assert compact["one"]["golden"] == "1 / 1 / 1" and compact["one"]["routing"] == ""


def test_the_command_writes_the_table_lists_what_was_not_compared_and_fails_on_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(scoreboard, "run_suite", lambda backends, where, profile, allow: (1, ROWS))
    monkeypatch.setattr(scoreboard, "resolve_backends", lambda names: None)
    args = SimpleNamespace(backends="one,two", out=str(tmp_path), hypothesis_profile="ci", from_results=False)
    assert scoreboard._scoreboard(args) == 1
    text = (tmp_path / "scoreboard.md").read_text()
    assert "- one: mtp (1)" in text and "- two: hidden (1)" in text
    cells = {(c["backend"], c["family"]): c for c in json.loads((tmp_path / "scoreboard.json").read_text())["cells"]}
    assert cells[("one", "golden")]["FAILED"] == 1 and cells[("one", "golden")]["worst"]["rel_err"] == 2e-5
    monkeypatch.setattr(scoreboard, "run_suite", lambda backends, where, profile, allow: (0, ROWS[2:]))
    assert scoreboard._scoreboard(args) == 0
