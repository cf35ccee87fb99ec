"""Pipeline schedules: the official DualPipe/DualPipeV orders, the size rules, the static checks (each shown to
catch its fault), the simulator against the bubble table, and the TensorFlow executor against the sequential
step."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.paths import GOLDEN_DIR, ROOT
from dsv3_conformance.backends import TF
from dsv3_conformance.checks.isolated import run_isolated
from dsv3_conformance.pipeline.execution import STANDARD_RUNS, cosine_difference
from dsv3_conformance.pipeline.schedules import METHODS, ScheduleError, generate
from dsv3_conformance.pipeline.simulator import Deadlock, Times, bubble_formula, simulate
from dsv3_conformance.pipeline.static import (check_links, check_memory, check_order, check_schedule, check_zero_bubble,
                                              peak_activations)

OFFICIAL = json.loads((GOLDEN_DIR / "official" / "dualpipe-schedules" / "schedules.json").read_text())
SIZES = [(2, 4), (2, 6), (4, 8), (4, 10), (4, 20), (6, 12), (6, 18), (8, 16), (8, 20)]


@pytest.mark.parametrize("method, key", [(m, k) for m in OFFICIAL for k in OFFICIAL[m]])
def test_official_schedules_are_reproduced_exactly(method, key):
    ranks, chunks = map(int, key.split("x"))
    assert generate(method, ranks, chunks) == OFFICIAL[method][key]


def test_the_command_prints_only_the_schedule_json(capsys):
    assert main(["schedule", "dualpipe", "--ranks", "4", "--chunks", "8"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == OFFICIAL["dualpipe"]["4x8"]


@pytest.mark.parametrize("method, ranks, chunks, message", [
    ("dualpipe", 3, 6, "even number of ranks"),
    ("dualpipe", 4, 6, "micro-batches >= 2 * ranks = 8"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipev", 4, 7, "micro-batches >= 2 * ranks = 8"),
])
def test_invalid_sizes_are_refused_with_the_official_rules(capsys, method, ranks, chunks, message):
    with pytest.raises(ScheduleError, match="ranks"):
        generate(method, ranks, chunks)
    assert main(["schedule", method, "--ranks", str(ranks), "--chunks", str(chunks)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


@pytest.mark.parametrize("method", METHODS)
def test_every_valid_size_passes_the_static_checks(method):
    for ranks, chunks in SIZES + [(3, 6), (5, 12), (1, 2)]:
        try:
            schedule = generate(method, ranks, chunks)
        except ScheduleError:
            continue
        assert check_schedule(method, schedule, chunks) == [], (method, ranks, chunks)


def test_a_backward_before_its_forward_is_found():
    schedule = copy.deepcopy(generate("1f1b", 4, 8))
    ops = schedule[3]
    first_b = next(i for i, op in enumerate(ops) if op[0] == "B")
    ops[first_b - 1], ops[first_b] = ops[first_b], ops[first_b - 1]
    assert any("before its forward" in p for p in check_order("1f1b", schedule, 8))


def test_a_dropped_chunk_is_found():
    schedule = copy.deepcopy(generate("dualpipev", 2, 4))
    schedule[0].remove(["F", 0, 0])
    assert any("never runs" in p for p in check_order("dualpipev", schedule, 4))


def test_sends_out_of_order_are_found():
    """Two forwards of rank 0 swapped: rank 1 still receives them in the order it consumes them."""
    schedule = copy.deepcopy(generate("1f1b", 4, 8))
    schedule[0][0], schedule[0][1] = schedule[0][1], schedule[0][0]
    problems = check_links("1f1b", schedule)
    assert any("activations from rank 0 to rank 1" in p for p in problems)


def test_a_deadlock_is_found():
    """Rank 1 waits for a gradient of micro-batch 0 before rank 2 has its forward."""
    schedule = copy.deepcopy(generate("1f1b", 4, 8))
    ops = schedule[1]
    first_b = next(i for i, op in enumerate(ops) if op[0] == "B")
    ops.insert(0, ops.pop(first_b))
    with pytest.raises(Deadlock):
        simulate("1f1b", schedule, Times())
    assert any("no rank can proceed" in p for p in check_links("1f1b", schedule))


def test_a_zero_bubble_backward_without_its_weight_gradient_is_found():
    schedule = copy.deepcopy(generate("dualpipe", 4, 8))
    schedule[0].remove(["W"])
    assert any("never followed by its W" in p for p in check_zero_bubble(schedule))
    schedule = copy.deepcopy(generate("zb1p", 4, 8))
    schedule[2].insert(0, ["W"])
    assert any("no zero-bubble backward pending" in p for p in check_zero_bubble(schedule))


def test_memory_beyond_the_table_is_found():
    """All forwards first (GPipe order) holds every micro-batch on rank 0: more than 1F1B's PP."""
    schedule = copy.deepcopy(generate("1f1b", 4, 8))
    schedule[0] = [op for op in schedule[0] if op[0] == "F"] + [op for op in schedule[0] if op[0] == "B"]
    assert peak_activations("1f1b", schedule)[0] == 8
    assert check_memory("1f1b", schedule, 8)


# Times for which the table's formulas are exact: the input gradient (B - W) costs a forward, and an
# overlapped pair costs at most F + B. Outside them the formulas are approximations (simulator.py).
TABLE_TIMES = [Times(1.0, 2.0, 1.0, 2.5), Times(1.0, 2.0, 1.0, 3.0), Times(1.0, 1.5, 0.5, 2.0),
               Times(2.0, 3.0, 1.0, 4.0)]


@pytest.mark.parametrize("method", METHODS)
def test_simulated_bubbles_match_the_table(method):
    for times in TABLE_TIMES:
        for ranks, chunks in SIZES:
            try:
                schedule = generate(method, ranks, chunks)
            except ScheduleError:
                continue
            timeline = simulate(method, schedule, times)
            bubble = max(timeline.idle(rank) for rank in range(ranks))
            assert bubble == pytest.approx(bubble_formula(method, ranks, times), abs=1e-9), (times, ranks, chunks)


def test_link_latency_lengthens_the_step():
    schedule = generate("dualpipe", 4, 8)
    assert simulate("dualpipe", schedule, Times(link=0.5)).step_time > simulate("dualpipe", schedule, Times()).step_time


def test_dualpipe_beats_1f1b_and_zb1p_on_bubbles():
    times = Times(1.0, 2.0, 1.0, 2.5)
    bubbles = {m: max(simulate(m, generate(m, 8, 16), times).idle(r) for r in range(8)) for m in METHODS}
    assert bubbles["dualpipe"] < bubbles["zb1p"] < bubbles["1f1b"]


def test_the_cosine_difference_is_the_examples():
    assert cosine_difference([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert cosine_difference([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)


def test_the_executor_equals_the_sequential_step():
    """DualPipe and DualPipeV on 2 and 4 logical CPU devices (and 1F1B, ZB1P): losses and outputs bit for bit,
    gradients within a cosine difference of 1e-13."""
    rows = run_isolated("dsv3_conformance.pipeline.execution", TF)
    assert {(r["method"], r["ranks"]) for r in rows} == {(m, r) for m, r, _ in STANDARD_RUNS}
    failed = [r for r in rows if r["status"] != "pass"]
    assert not failed, failed


_BROKEN = """
import sys
import dsv3_conformance.impl.pipeline as pipeline
from dsv3_conformance.pipeline import execution
from dsv3_conformance.impl.devices import logical_cpus
devices = logical_cpus(4)
if sys.argv[1] == "no-copy-sum":  # each stage's gradient from one of its two copies only
    pipeline._stage_grads = lambda method, ranks, state: [tuple(g.numpy() for g in held.grads[0]) for held in state]
else:  # a zero-bubble weight gradient added to the rank's other stage
    accumulate = pipeline._accumulate
    pipeline._accumulate = lambda rank, direction, operands: accumulate(rank, 1 - direction, operands)
print(",".join(r.what for r in execution.compare_step("dualpipe", 4, 8, devices) if not r.passed))
"""


@pytest.mark.parametrize("mode", ["no-copy-sum", "weight-gradient-to-the-other-stage"])
def test_the_executor_check_catches_a_broken_step(mode):
    done = subprocess.run([sys.executable, "-c", _BROKEN, mode], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gradients" in done.stdout and "losses" not in done.stdout
