"""Where each stage of a pipeline lives, as the harness reads a schedule (the format: conformance/format/pipeline.py):
the rank and direction tag of a stage, the chunk an operation computes, and which chunk's result another consumes.
The schedule generator, the static checks, the simulator and the executor's check read schedules through it; the
TensorFlow executor has its own (impl/pipeline.py).
"""

from __future__ import annotations

from dsv3_conformance.format.pipeline import Chunk, Op, stages


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
