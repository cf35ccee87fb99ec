"""The pipeline schedule format: operations per rank, the chunk a forward or backward computes, and how many
stages, flows and micro-batches per flow a method has. Where each stage lives (which rank, under which
direction tag) is each side's own: the harness's in conformance/pipeline/topology.py, the TensorFlow
executor's in impl/pipeline.py.

A schedule is, per rank, the list of operations it runs (SEMANTICS.md section 7):
- `["F", dir, mb]`: the forward chunk of micro-batch `mb` of direction `dir` on the stage this rank holds for
  that direction;
- `["B", dir, mb, zero_bubble]`: its backward chunk; with `zero_bubble` only the input gradient, the weight
  gradient being left to a later `["W"]`;
- `["W"]`: the weight gradient of the oldest zero-bubble backward not yet completed (first in, first out);
- `["FB", F-op, B-op]`: a forward and a backward chunk run overlapped.

A micro-batch travels stages 0..S-1:
- 1F1B, ZB1P: S = R, stage s on rank s, dir 0, one flow;
- DualPipe: S = R, two flows of C/2 micro-batches: flow 0 enters at rank 0 (stage s on rank s), flow 1 at the
  last rank (stage s on rank R-1-s); the direction tag is the flow;
- DualPipeV: S = 2R, one flow: stage s on rank s (dir 0) for s < R, then back, stage s on rank 2R-1-s (dir 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Op = list[Any]
Schedule = list[list[Op]]


@dataclass(frozen=True)
class Chunk:
    """A forward or backward chunk: micro-batch `mb` of `flow` at `stage`, on `rank` with direction tag `dir`."""

    kind: str  # "F" | "B"
    rank: int
    dir: int
    mb: int
    flow: int
    stage: int


def stages(method: str, ranks: int) -> int:
    return 2 * ranks if method == "dualpipev" else ranks


def flows(method: str) -> int:
    return 2 if method == "dualpipe" else 1


def micro_batches_per_flow(method: str, chunks: int) -> int:
    return chunks // 2 if method == "dualpipe" else chunks
