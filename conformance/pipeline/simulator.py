"""A discrete-event simulator of pipeline schedules: given the time of each kind of chunk and the link latency,
when every operation of every rank starts and ends, each rank's idle time, and the step time.

Each rank runs its operations in order; an operation starts when the rank is free and every chunk it consumes
has been produced (topology.producer), plus the link latency when the producer ran on another rank. Times: a
forward F, a full backward B (input and weight gradient), the weight gradient W alone (so a zero-bubble
backward takes B - W), and an overlapped forward-and-backward pair F&B. A schedule that can never finish
(a rank waiting for a chunk no rank will produce first) is a deadlock and raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3_conformance.format.pipeline import Chunk, Op, Schedule
from dsv3_conformance.pipeline.topology import chunks_of, producer


class Deadlock(RuntimeError):
    """No rank can start its next operation."""


@dataclass(frozen=True)
class Times:
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 2.5  # an overlapped F&B pair (F + B when nothing overlaps)
    link: float = 0.0

    def of(self, op: Op) -> float:
        if op[0] == "F":
            return self.F
        if op[0] == "B":
            return self.B - self.W if op[3] else self.B
        if op[0] == "W":
            return self.W
        return self.FB


@dataclass(frozen=True)
class Interval:
    rank: int
    op: Op
    start: float
    end: float


@dataclass
class Timeline:
    method: str
    ranks: int
    intervals: list[Interval] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        return max(i.end for i in self.intervals)

    def busy(self, rank: int) -> float:
        return sum(i.end - i.start for i in self.intervals if i.rank == rank)

    def idle(self, rank: int) -> float:
        """Time the rank waits between its first operation's start (time 0) and the end of the step."""
        return self.step_time - self.busy(rank)

    def ordered(self) -> list[list[Interval]]:
        return [[i for i in self.intervals if i.rank == r] for r in range(self.ranks)]


def simulate(method: str, schedule: Schedule, times: Times) -> Timeline:
    ranks = len(schedule)
    done: dict[Chunk, tuple[int, float]] = {}  # chunk -> (rank, end time)
    position = [0] * ranks
    free = [0.0] * ranks
    timeline = Timeline(method, ranks)
    remaining = sum(map(len, schedule))
    while remaining:
        progressed = False
        for rank, ops in enumerate(schedule):
            while position[rank] < len(ops):
                op = ops[position[rank]]
                chunks = chunks_of(method, ranks, rank, op)
                ready = free[rank]
                waiting = False
                for c in chunks:
                    source = producer(method, ranks, c)
                    if source is None:
                        continue
                    if source not in done:
                        waiting = True
                        break
                    where, end = done[source]
                    ready = max(ready, end + (times.link if where != rank else 0.0))
                if waiting:
                    break
                end = ready + times.of(op)
                timeline.intervals.append(Interval(rank, op, ready, end))
                for c in chunks:
                    done[c] = (rank, end)
                free[rank] = end
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {rank: schedule[rank][position[rank]] for rank in range(ranks) if position[rank] < len(schedule[rank])}
            raise Deadlock(f"{method}: no rank can proceed; next operations {stuck}")
    return timeline


def bubble_formula(method: str, ranks: int, times: Times) -> float:
    """The bubble of SEMANTICS.md section 7's table (PP: pipeline stages of 1F1B/ZB1P/DualPipe = ranks; the
    DualPipe rows' PP for DualPipeV is its stage count, 2 ranks)."""
    pp = 2 * ranks if method == "dualpipev" else ranks
    if method == "1f1b":
        return (pp - 1) * (times.F + times.B)
    if method == "zb1p":
        return (pp - 1) * (times.F + times.B - 2 * times.W)
    return (pp / 2 - 1) * (times.FB + times.B - 3 * times.W)
