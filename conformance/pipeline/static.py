"""Static checks of a pipeline schedule, before anything runs (each returns its problems, empty when sound).

- order: on every rank, each chunk's forward precedes its backward, and every chunk of the method runs
  exactly once;
- links: what a rank sends to a neighbour (activations forward, gradients backward), in the order it
  produces them, is what the neighbour receives, in the order it consumes them (no reordering, no deadlock
  on FIFO links); and the whole schedule runs to its end (simulated with unit times);
- zero bubble: every zero-bubble backward is followed by the weight-gradient step that completes it (W
  pops the oldest pending one), and no W runs with none pending;
- memory: the peak of in-flight activations per rank (forwards whose backward has not run; in an
  overlapped pair the forward counts first) is that of SEMANTICS.md section 7: PP for 1F1B and ZB1P on the
  first rank, PP+1 on every rank for DualPipe and DualPipeV (PP = pipeline stages).
"""

from __future__ import annotations

from collections import defaultdict

from dsv3_conformance.format.pipeline import Chunk, Schedule, flows, micro_batches_per_flow, stages
from dsv3_conformance.pipeline.topology import chunks_of, consumer, producer
from dsv3_conformance.pipeline.simulator import Deadlock, Times, simulate


def _chunks(method: str, schedule: Schedule) -> list[list[Chunk]]:
    ranks = len(schedule)
    return [[c for op in ops for c in chunks_of(method, ranks, rank, op)] for rank, ops in enumerate(schedule)]


def check_order(method: str, schedule: Schedule, chunks: int) -> list[str]:
    problems = []
    ranks = len(schedule)
    per_rank = _chunks(method, schedule)
    expected = {(kind, flow, stage, mb) for kind in "FB" for flow in range(flows(method))
                for stage in range(stages(method, ranks)) for mb in range(micro_batches_per_flow(method, chunks))}
    seen = defaultdict(int)
    for rank, run in enumerate(per_rank):
        position = {}
        for index, c in enumerate(run):
            seen[(c.kind, c.flow, c.stage, c.mb)] += 1
            position[(c.kind, c.dir, c.mb)] = index
        for (kind, direction, mb), index in position.items():
            if kind == "B" and position.get(("F", direction, mb), len(run)) > index:
                problems.append(f"rank {rank}: backward of dir {direction} micro-batch {mb} before its forward")
    problems += [f"chunk {key} runs {count} times" for key, count in seen.items() if count != 1]
    problems += [f"chunk {key} never runs" for key in sorted(expected - set(seen))]
    return problems


def check_links(method: str, schedule: Schedule) -> list[str]:
    """Per directed link and kind, the sender's production order equals the receiver's consumption order."""
    ranks = len(schedule)
    sent: dict[tuple, list] = defaultdict(list)
    received: dict[tuple, list] = defaultdict(list)
    for rank, run in enumerate(_chunks(method, schedule)):
        for c in run:
            source, target = producer(method, ranks, c), consumer(method, ranks, c)
            if source is not None and source.rank != rank:
                received[(source.rank, rank, source.kind)].append((source.flow, source.stage, source.mb))
            if target is not None and target.rank != rank:
                sent[(rank, target.rank, c.kind)].append((c.flow, c.stage, c.mb))
    problems = []
    for link in sorted(set(sent) | set(received)):
        if sent[link] != received[link]:
            source, target, kind = link
            what = "activations" if kind == "F" else "gradients"
            problems.append(f"{what} from rank {source} to rank {target}: sent in order {sent[link]}, received in "
                            f"order {received[link]}")
    try:
        simulate(method, schedule, Times())
    except Deadlock as error:
        problems.append(str(error))
    return problems


def check_zero_bubble(schedule: Schedule) -> list[str]:
    problems = []
    for rank, ops in enumerate(schedule):
        pending = []
        for index, op in enumerate(ops):
            backward = op[2] if op[0] == "FB" else op
            if backward[0] == "B" and backward[3]:
                pending.append((backward[1], backward[2]))
            elif op[0] == "W":
                if not pending:
                    problems.append(f"rank {rank}: W at operation {index} with no zero-bubble backward pending")
                else:
                    pending.pop(0)
        problems += [f"rank {rank}: zero-bubble backward of dir {d} micro-batch {mb} never followed by its W"
                     for d, mb in pending]
    return problems


def peak_activations(method: str, schedule: Schedule) -> list[int]:
    peaks = []
    for run in _chunks(method, schedule):
        current = peak = 0
        for c in run:
            current += 1 if c.kind == "F" else -1
            peak = max(peak, current)
        peaks.append(peak)
    return peaks


def expected_peak(method: str, ranks: int) -> int:
    """SEMANTICS.md section 7: activations per device, in chunks of one micro-batch on one stage."""
    pp = stages(method, ranks)
    return pp if method in ("1f1b", "zb1p") else pp + 1


def check_memory(method: str, schedule: Schedule, chunks: int) -> list[str]:
    peaks = peak_activations(method, schedule)
    wanted = expected_peak(method, len(schedule))
    if method in ("1f1b", "zb1p"):
        wanted = min(wanted, chunks)  # fewer micro-batches than stages never fill the first rank
    if max(peaks) != wanted:
        return [f"peak in-flight activations per rank {peaks}: the table says {wanted}"]
    return []


def check_schedule(method: str, schedule: Schedule, chunks: int) -> list[str]:
    """Every static check; the problems found, each naming the rank or link."""
    return (check_order(method, schedule, chunks) + check_links(method, schedule) + check_zero_bubble(schedule)
            + check_memory(method, schedule, chunks))
