"""Pipeline schedules as data: DualPipe and DualPipeV (the DualPipe repository's order, derived from its code),
and 1F1B and ZB1P for comparison. Framework-free: a schedule is, per rank, the list of operations it runs.

Operations: the format of conformance/format/pipeline.py.

Directions. DualPipe: dir 0 is the stage a rank holds for the micro-batches entering at rank 0 (rank r holds
stage r), dir 1 the one for those entering at the last rank (stage PP-1-r); half the micro-batches travel
each way, numbered per direction. DualPipeV: all micro-batches enter at rank 0 and travel the V: dir 0 is the
first half (rank r holds stage r), dir 1 the way back (stage 2R-1-r). 1F1B and ZB1P have dir 0 only.

How DualPipe orders a rank's work (the repository's eight phases, in our words). Write `half` for PP/2, `h` for
the rank's distance to the nearer end (min(r, PP-1-r)), and "near"/"far" for the direction whose first stage
is at the rank's own end of the pipeline / at the other end (near = dir 0 on the first half of the ranks,
dir 1 on the second half); C/2 micro-batches per direction:
1. 2(half-h-1) forwards of near;
2. h+1 times: a forward of near, then one of far;
3. half-h-1 times: a zero-bubble backward of far, its weight gradient, a forward of far;
4. C/2-PP+h+1 times: an overlapped (forward near, backward far), then an overlapped (forward far, backward
   near); on the two middle ranks the very first pair runs its forward and backward apart;
5. half-h-1 times: a backward of far, then an overlapped (forward far, backward near);
6. h+1 times: a backward of far, then one of near, zero-bubble from the middle of this phase on (from the
   near backward of iteration (h+1)//2 when h is even, from the far one when h is odd);
7. half-h-1 times: a weight gradient, then a zero-bubble backward of near;
8. h+1 weight gradients.
DualPipeV follows the same eight phases with half -> R, h -> r, near -> dir 0, far -> dir 1, C -> 2C, and the
separated first pair on the last rank (where the V turns).
"""

from __future__ import annotations

from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.pipeline import Op, Schedule

METHODS = ("dualpipe", "dualpipev", "1f1b", "zb1p")


class ScheduleError(BadInput):
    """Sizes a method cannot schedule (the message names the rule)."""


def validate(method: str, ranks: int, chunks: int) -> None:
    """The official size rules: DualPipe needs PP even, micro-batches even and >= 2 PP; DualPipeV needs
    micro-batches >= 2 ranks; every method needs at least one rank and one micro-batch."""
    if method not in METHODS:
        raise ScheduleError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if ranks < 1 or chunks < 1:
        raise ScheduleError(f"{method}: ranks and micro-batches must be >= 1, found ranks={ranks}, chunks={chunks}")
    if method == "dualpipe":
        if ranks % 2:
            raise ScheduleError(f"dualpipe needs an even number of ranks (PP), found {ranks}")
        if chunks % 2 or chunks < 2 * ranks:
            raise ScheduleError(f"dualpipe needs an even number of micro-batches >= 2 * ranks = {2 * ranks}, "
                                f"found {chunks}")
    if method == "dualpipev" and chunks < 2 * ranks:
        raise ScheduleError(f"dualpipev needs micro-batches >= 2 * ranks = {2 * ranks}, found {chunks}")


class _Rank:
    """One rank's operation list under construction, numbering micro-batches per direction."""

    def __init__(self, near: int):
        self.near, self.far = near, 1 - near
        self.ops: list[Op] = []
        self.forwards = [0, 0]
        self.backwards = [0, 0]

    def forward(self, direction: int) -> Op:
        op = ["F", direction, self.forwards[direction]]
        self.forwards[direction] += 1
        return op

    def backward(self, direction: int, zero_bubble: bool = False) -> Op:
        op = ["B", direction, self.backwards[direction], zero_bubble]
        self.backwards[direction] += 1
        return op

    def add(self, *ops: Op) -> None:
        self.ops.extend(ops)

    def overlapped(self, forward: int, backward: int) -> None:
        self.ops.append(["FB", self.forward(forward), self.backward(backward)])


def _bidirectional(rank: _Rank, half: int, h: int, per_direction: int, apart_first_pair: bool) -> list[Op]:
    """The eight phases shared by DualPipe and DualPipeV (module docstring)."""
    near, far = rank.near, rank.far
    outer = half - h - 1
    for _ in range(2 * outer):
        rank.add(rank.forward(near))
    for _ in range(h + 1):
        rank.add(rank.forward(near), rank.forward(far))
    for _ in range(outer):
        rank.add(rank.backward(far, zero_bubble=True), ["W"], rank.forward(far))
    for step in range(per_direction - 2 * half + h + 1):
        if step == 0 and apart_first_pair:
            rank.add(rank.forward(near), rank.backward(far))
        else:
            rank.overlapped(near, far)
        rank.overlapped(far, near)
    for _ in range(outer):
        rank.add(rank.backward(far))
        rank.overlapped(far, near)
    zero_bubble = False
    for step in range(h + 1):
        middle = step == (h + 1) // 2
        zero_bubble |= middle and h % 2 == 1
        rank.add(rank.backward(far, zero_bubble))
        zero_bubble |= middle and h % 2 == 0
        rank.add(rank.backward(near, zero_bubble))
    for _ in range(outer):
        rank.add(["W"], rank.backward(near, zero_bubble=True))
    rank.add(*(["W"] for _ in range(h + 1)))
    return rank.ops


def dualpipe(ranks: int, chunks: int) -> Schedule:
    validate("dualpipe", ranks, chunks)
    half = ranks // 2
    schedule = []
    for r in range(ranks):
        h = min(r, ranks - 1 - r)
        schedule.append(_bidirectional(_Rank(near=int(r >= half)), half, h, chunks // 2, h == half - 1))
    return schedule


def dualpipev(ranks: int, chunks: int) -> Schedule:
    validate("dualpipev", ranks, chunks)
    return [_bidirectional(_Rank(near=0), ranks, r, chunks, r == ranks - 1) for r in range(ranks)]


def one_f_one_b(ranks: int, chunks: int) -> Schedule:
    """1F1B: rank r runs min(R-r-1, C) warm-up forwards, then alternates one forward and one (full) backward,
    then drains its backwards."""
    validate("1f1b", ranks, chunks)
    schedule = []
    for r in range(ranks):
        rank = _Rank(near=0)
        warmup = min(ranks - r - 1, chunks)
        rank.add(*(rank.forward(0) for _ in range(warmup)))
        for _ in range(chunks - warmup):
            rank.add(rank.forward(0), rank.backward(0))
        rank.add(*(rank.backward(0) for _ in range(warmup)))
        schedule.append(rank.ops)
    return schedule


def zb1p(ranks: int, chunks: int) -> Schedule:
    """ZB1P (zero-bubble ZB-H1, Qi et al. 2023): 1F1B's order and memory, the backward split into the input
    gradient (on the critical path) and the weight gradient. Rank r defers the weight gradients of its first r
    backwards: during the steady phase it runs F, B, and the oldest pending W only once r of them wait; in the
    drain each B is followed by a W, and the deferred ones fill the end, where 1F1B idles."""
    validate("zb1p", ranks, chunks)
    schedule = []
    for r in range(ranks):
        rank = _Rank(near=0)
        warmup = min(ranks - r - 1, chunks)
        deferred = min(r, chunks)
        pending = 0
        rank.add(*(rank.forward(0) for _ in range(warmup)))
        for _ in range(chunks - warmup):
            rank.add(rank.forward(0), rank.backward(0, zero_bubble=True))
            pending += 1
            if pending > deferred:
                rank.add(["W"])
                pending -= 1
        for _ in range(warmup):
            rank.add(rank.backward(0, zero_bubble=True))
            pending += 1
            if pending > deferred:
                rank.add(["W"])
                pending -= 1
        rank.add(*(["W"] for _ in range(pending)))
        schedule.append(rank.ops)
    return schedule


GENERATORS = {"dualpipe": dualpipe, "dualpipev": dualpipev, "1f1b": one_f_one_b, "zb1p": zb1p}


def generate(method: str, ranks: int, chunks: int) -> Schedule:
    """The schedule of `method` for `ranks` ranks and `chunks` micro-batches (validated first)."""
    validate(method, ranks, chunks)
    return GENERATORS[method](ranks, chunks)
