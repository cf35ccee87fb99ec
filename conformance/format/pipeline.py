"""The pipeline schedule format, and where each stage of a pipeline lives: the one table the schedule
generator, the static checks, the simulator and the TensorFlow executor share.

A schedule is, per rank, the list of operations it runs (SEMANTICS.md section 7):
- `["F", dir, mb]`: the forward chunk of micro-batch `mb` of direction `dir` on the stage this rank holds for
  that direction;
- `["B", dir, mb, zero_bubble]`: its backward chunk; with `zero_bubble` only the input gradient, the weight
  gradient being left to a later `["W"]`;
- `["W"]`: the weight gradient of the oldest zero-bubble backward not yet completed (first in, first out);
- `["FB", F-op, B-op]`: a forward and a backward chunk run overlapped.

A micro-batch travels stages 0..S-1. `hop(method, ranks, flow, stage)` says on which rank and under which
direction tag stage `stage` runs for micro-batches of `flow`:
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


def hop(method: str, ranks: int, flow: int, stage: int) -> tuple[int, int]:
    """(rank, dir) of `stage` for micro-batches of `flow`."""
    if method == "dualpipe":
        return (stage if flow == 0 else ranks - 1 - stage), flow
    if method == "dualpipev":
        return (stage, 0) if stage < ranks else (2 * ranks - 1 - stage, 1)
    return stage, 0


def locate(method: str, ranks: int, rank: int, direction: int, mb: int) -> tuple[int, int]:
    """(flow, stage) of the chunk a rank runs under direction tag `direction` for micro-batch `mb`."""
    if method == "dualpipe":
        return direction, (rank if direction == 0 else ranks - 1 - rank)
    if method == "dualpipev":
        return 0, (rank if direction == 0 else 2 * ranks - 1 - rank)
    return 0, rank


def chunk(method: str, ranks: int, rank: int, op: Op) -> Chunk:
    """The chunk of a plain `F` or `B` operation of `rank`."""
    flow, stage = locate(method, ranks, rank, op[1], op[2])
    return Chunk(op[0], rank, op[1], op[2], flow, stage)


def chunks_of(method: str, ranks: int, rank: int, op: Op) -> list[Chunk]:
    """The chunks an operation computes (none for a W, two for an FB, its forward first)."""
    if op[0] == "FB":
        return [chunk(method, ranks, rank, op[1]), chunk(method, ranks, rank, op[2])]
    if op[0] == "W":
        return []
    return [chunk(method, ranks, rank, op)]


def producer(method: str, ranks: int, c: Chunk) -> Chunk | None:
    """The chunk whose result `c` consumes: the previous stage's forward for a forward (None at stage 0); the
    next stage's backward for a backward, or, at the last stage, the same stage's forward (the loss)."""
    last = stages(method, ranks) - 1
    if c.kind == "F":
        if c.stage == 0:
            return None
        rank, direction = hop(method, ranks, c.flow, c.stage - 1)
        return Chunk("F", rank, direction, c.mb, c.flow, c.stage - 1)
    if c.stage == last:
        return Chunk("F", c.rank, c.dir, c.mb, c.flow, c.stage)
    rank, direction = hop(method, ranks, c.flow, c.stage + 1)
    return Chunk("B", rank, direction, c.mb, c.flow, c.stage + 1)


def consumer(method: str, ranks: int, c: Chunk) -> Chunk | None:
    """The chunk that consumes `c`'s result: the next stage's forward (at the last stage, the same stage's
    backward, through the loss); the previous stage's backward (None at stage 0)."""
    last = stages(method, ranks) - 1
    if c.kind == "F":
        if c.stage == last:
            return Chunk("B", c.rank, c.dir, c.mb, c.flow, c.stage)
        rank, direction = hop(method, ranks, c.flow, c.stage + 1)
        return Chunk("F", rank, direction, c.mb, c.flow, c.stage + 1)
    if c.stage == 0:
        return None
    rank, direction = hop(method, ranks, c.flow, c.stage - 1)
    return Chunk("B", rank, direction, c.mb, c.flow, c.stage - 1)
