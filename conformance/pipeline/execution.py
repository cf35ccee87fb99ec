"""The executor's check: a pipelined training step equals the same micro-batches run one after another on one
device. As the DualPipe repository's example makes it, losses and outputs bit for bit and every stage's gradient
within a cosine difference of 1e-13 (float64, the pipeline summing per-stage gradients in another order); and
beyond it, every weight gradient the executor added, one per stage and micro-batch, against that micro-batch's
gradient of that stage in the sequential run, where the harness reads from the schedule which micro-batch and
stage each backward or W operation completes (a W completes the rank's oldest zero-bubble backward). Sums hide
a W that completes the wrong micro-batch, or a micro-batch completed twice and another never; this does not.

`dsv3-conformance pipeline-step METHOD --ranks R --chunks C` runs it on R logical CPU devices (or on the
TensorFlow devices given with --devices) and exits 0 when every comparison holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from tabulate import tabulate

from dsv3_conformance.format.pipeline import Schedule, micro_batches_per_flow, stages
from dsv3_conformance.pipeline.schedules import METHODS, generate
from dsv3_conformance.pipeline.topology import chunks_of

COSINE_BOUND = 1e-13  # the DualPipe example's own bound on gradients, float64


def cosine_difference(a: np.ndarray, b: np.ndarray) -> float:
    """1 - 2 <a, b> / (|a|^2 + |b|^2): 0 for equal tensors, as the DualPipe example measures gradients."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(1.0 - 2.0 * np.sum(a * b) / np.sum(a * a + b * b))


@dataclass(frozen=True)
class Comparison:
    what: str
    measured: str
    passed: bool


def completed(method: str, schedule: Schedule, chunks: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(rank, operation index) -> (global micro-batch, stage) of every operation that completes a weight gradient:
    a backward that is not zero-bubble completes its own chunk's; a W the oldest zero-bubble backward's of its rank."""
    ranks, per_flow = len(schedule), micro_batches_per_flow(method, chunks)
    done = {}
    for rank, ops in enumerate(schedule):
        waiting = []
        for index, op in enumerate(ops):
            if op[0] == "W":
                chunk = waiting.pop(0)
                done[(rank, index)] = (chunk.flow * per_flow + chunk.mb, chunk.stage)
                continue
            for part, chunk in zip(op[1:] if op[0] == "FB" else [op], chunks_of(method, ranks, rank, op)):
                if chunk.kind == "B" and part[3]:
                    waiting.append(chunk)
                elif chunk.kind == "B":
                    done[(rank, index)] = (chunk.flow * per_flow + chunk.mb, chunk.stage)
    return done


def compare_step(method: str, ranks: int, chunks: int, devices: list[str] | None = None, hidden: int = 16,
                 seed: int = 0) -> list[Comparison]:
    """Build the example model (float64), run the pipelined and the sequential step, compare."""
    import tensorflow as tf

    from dsv3_conformance.impl.devices import logical_cpus
    from dsv3_conformance.impl.pipeline import StageWeights, pipeline_step, sequential_step

    devices = devices or logical_cpus(ranks)
    rng = np.random.default_rng(seed)
    count = stages(method, ranks)
    weights = [StageWeights(tf.constant(rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)),
                            tf.constant(rng.standard_normal((hidden, 4 * hidden)) / np.sqrt(4 * hidden)))
               for _ in range(count)]
    inputs = rng.standard_normal((chunks, 3, 4, hidden))
    labels = rng.standard_normal((chunks, 3, 4, hidden))
    schedule = generate(method, ranks, chunks)
    piped = pipeline_step(method, schedule, weights, inputs, labels, devices)
    plain = sequential_step(weights, inputs, labels, devices[0])
    rows = [Comparison("losses", "bitwise equal" if np.array_equal(piped.losses, plain.losses) else
                       f"max |diff| {np.max(np.abs(piped.losses - plain.losses)):.3e}",
                       np.array_equal(piped.losses, plain.losses)),
            Comparison("outputs", "bitwise equal" if np.array_equal(piped.outputs, plain.outputs) else
                       f"max |diff| {np.max(np.abs(piped.outputs - plain.outputs)):.3e}",
                       np.array_equal(piped.outputs, plain.outputs))]
    for stage, (got, want) in enumerate(zip(piped.grads, plain.grads)):
        worst = max(cosine_difference(g, w) for g, w in zip(got, want))
        rows.append(Comparison(f"stage {stage} gradients", f"cosine difference {worst:.2e} (bound {COSINE_BOUND:.0e})",
                               worst < COSINE_BOUND))
    expected = completed(method, schedule, chunks)
    wrong = [f"rank {rank} op {index} vs micro-batch {expected[(rank, index)][0]} stage {expected[(rank, index)][1]}"
             for rank, index in piped.parts if (rank, index) not in expected or
             max(map(cosine_difference, piped.parts[(rank, index)], plain.parts[expected[(rank, index)]]))
             >= COSINE_BOUND]
    whole = sorted(expected.values()) == sorted(plain.parts) and set(piped.parts) == set(expected)
    rows.append(Comparison(f"weight gradients per stage and micro-batch ({len(plain.parts)})",
                           f"{len(wrong)} differ from the sequential run's (first: {wrong[0]})" if wrong else
                           "each equal to the sequential run's" if whole else "not one per stage and micro-batch",
                           not wrong and whole))
    return rows


def _pipeline_step(args: argparse.Namespace) -> int:
    generate(args.method, args.ranks, args.chunks)  # sizes refused before TensorFlow starts
    devices = args.devices.split(",") if args.devices else None
    rows = compare_step(args.method, args.ranks, args.chunks, devices)
    print(f"{args.method} on {args.ranks} ranks, {args.chunks} micro-batches, vs the micro-batches run in sequence:")
    print(tabulate([(r.what, r.measured, "pass" if r.passed else "FAIL") for r in rows],
                   headers=["compared", "measured", "verdict"]))
    return 0 if all(r.passed for r in rows) else 1


def add_command(commands, integer) -> None:
    parser = commands.add_parser("pipeline-step", help="run a pipelined training step on TensorFlow devices and "
                                                       "compare it with the sequential step")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--ranks", type=integer(1), required=True)
    parser.add_argument("--chunks", type=integer(1), required=True)
    parser.add_argument("--devices", help="comma-separated TensorFlow devices, one per rank (default: logical CPUs)")
    parser.set_defaults(run=_pipeline_step)


# The sizes the test suite and the report run: R in {2, 4} for DualPipe and DualPipeV (the smallest valid
# micro-batch counts, and one more than the smallest), with 1F1B and ZB1P beside them.
STANDARD_RUNS = (("dualpipe", 2, 4), ("dualpipe", 4, 10), ("dualpipev", 2, 6), ("dualpipev", 4, 8),
                 ("1f1b", 4, 6), ("zb1p", 4, 6))


def standard_runs() -> list[dict]:
    """Every standard run in this process (which must start TensorFlow with enough logical CPU devices)."""
    from dsv3_conformance.impl.devices import logical_cpus

    devices = logical_cpus(max(ranks for _, ranks, _ in STANDARD_RUNS))
    rows = []
    for method, ranks, chunks in STANDARD_RUNS:
        for comparison in compare_step(method, ranks, chunks, devices[:ranks]):
            rows.append({"method": method, "ranks": ranks, "micro-batches": chunks, "compared": comparison.what,
                         "measured": comparison.measured, "status": "pass" if comparison.passed else "FAIL"})
    return rows


if __name__ == "__main__":
    import json

    from dsv3_conformance.checks.isolated import add_arguments, planted_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    _, planting = planted_from(parser.parse_args())
    with planting:
        print(json.dumps(standard_runs()))
