"""A pipeline-parallel training step in TensorFlow that follows a generated schedule (DualPipe, DualPipeV, 1F1B,
ZB1P) over one device per rank, checked against the same micro-batches run one after another on one device.

The model is the one of the DualPipe repository's own example, written here in TensorFlow: S stages, each
`y = gelu(x W1^T) W2^T`, an MSE loss on the last stage's output. Each rank holds the stages the topology gives
it (the schedule format: conformance/format/pipeline.py; the placement is this executor's own, `_place`):
DualPipe's rank r holds a copy of stage r (dir 0) and of stage R-1-r (dir 1), so each stage exists on two
ranks and its gradient is the sum of both copies' gradients; DualPipeV's rank r holds stages r and 2R-1-r. A
chunk's backward computes the input gradient and, unless it is zero-bubble, the weight gradient too; a
zero-bubble backward leaves the weight gradient to the rank's next `W` (first in, first out). Every weight
gradient a rank adds is also returned with the operation that added it, so that a check can hold each one
against the micro-batch and stage the schedule says it belongs to. Activations and gradients move between ranks as tensors copied onto the
receiving rank's device; device names are TensorFlow's, so the same code places ranks on logical CPU
devices, GPUs, or remote workers.

Operations run in an order that respects every rank's own order and every data dependency (round robin over
the ranks, each running what it can); with TensorFlow's eager ops on each rank's device, the result does not
depend on the interleaving across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dsv3_conformance.format.pipeline import Chunk, Op, Schedule, micro_batches_per_flow, stages


def _place(method: str, ranks: int, flow: int, stage: int) -> tuple[int, int]:
    """(rank, direction tag) that runs `stage` for the micro-batches of `flow`."""
    if method == "dualpipev" and stage >= ranks:
        return 2 * ranks - 1 - stage, 1
    if method == "dualpipe" and flow == 1:
        return ranks - 1 - stage, 1
    return stage, 0


def _stage_held(method: str, ranks: int, rank: int, direction: int) -> tuple[int, int]:
    """(flow, stage) that `rank` runs under `direction`."""
    mirrored = {"dualpipe": ranks - 1 - rank, "dualpipev": 2 * ranks - 1 - rank}.get(method, rank)
    return (direction if method == "dualpipe" else 0), (mirrored if direction else rank)


def _chunks(method: str, ranks: int, rank: int, op: Op) -> list[Chunk]:
    """The forward and backward chunks an operation computes (an FB: its forward, then its backward; a W: none)."""
    parts = {"FB": op[1:], "W": []}.get(op[0], [op])
    found = []
    for kind, direction, mb, *_ in parts:
        flow, stage = _stage_held(method, ranks, rank, direction)
        found.append(Chunk(kind, rank, direction, mb, flow, stage))
    return found


def _input_of(method: str, ranks: int, c: Chunk) -> Chunk | None:
    """The chunk whose result `c` takes: a forward the previous stage's forward (none at stage 0), a backward the
    next stage's backward or, at the last stage, its own forward (through the loss)."""
    last = stages(method, ranks) - 1
    if c.kind == "B" and c.stage == last:
        return Chunk("F", c.rank, c.dir, c.mb, c.flow, c.stage)
    neighbour = c.stage - 1 if c.kind == "F" else c.stage + 1
    if neighbour < 0:
        return None
    rank, direction = _place(method, ranks, c.flow, neighbour)
    return Chunk(c.kind, rank, direction, c.mb, c.flow, neighbour)


def next_weight_gradient(pending: list) -> tuple:
    """The zero-bubble weight gradient a `W` completes: the oldest one left."""
    return pending.pop(0)


@dataclass(frozen=True)
class StageWeights:
    w1: tf.Tensor  # [4h, h]
    w2: tf.Tensor  # [h, 4h]


def stage_forward(x: tf.Tensor, weights: StageWeights) -> tuple[tf.Tensor, tuple]:
    """y = gelu(x W1^T) W2^T, and what the backward needs."""
    pre = tf.einsum("...i,oi->...o", x, weights.w1)
    hidden = tf.nn.gelu(pre, approximate=False)
    return tf.einsum("...i,oi->...o", hidden, weights.w2), (x, pre, hidden)


def stage_input_gradient(grad_y: tf.Tensor, saved: tuple, weights: StageWeights) -> tuple[tf.Tensor, tuple]:
    """dL/dx, and the operands of the weight gradient."""
    x, pre, hidden = saved
    grad_hidden = tf.einsum("...o,oi->...i", grad_y, weights.w2)
    with tf.GradientTape() as tape:
        tape.watch(pre)
        activated = tf.nn.gelu(pre, approximate=False)
    grad_pre = tape.gradient(activated, pre, output_gradients=grad_hidden)
    return tf.einsum("...o,oi->...i", grad_pre, weights.w1), (x, grad_pre, hidden, grad_y)


def stage_weight_gradient(operands: tuple) -> tuple[tf.Tensor, tf.Tensor]:
    """dL/dW1 = grad_pre^T x and dL/dW2 = grad_y^T hidden, summed over the micro-batch's rows."""
    x, grad_pre, hidden, grad_y = operands
    def flat(t: tf.Tensor) -> tf.Tensor:
        return tf.reshape(t, [-1, t.shape[-1]])

    return (tf.matmul(flat(grad_pre), flat(x), transpose_a=True),
            tf.matmul(flat(grad_y), flat(hidden), transpose_a=True))


def mse(output: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """mean((y - l)^2) and its gradient with respect to y."""
    difference = output - label
    return tf.reduce_mean(tf.square(difference)), 2.0 * difference / float(np.prod(output.shape))


@dataclass
class StepResult:
    losses: np.ndarray  # [C] by global micro-batch index
    outputs: np.ndarray  # [C, ...] the last stage's outputs
    grads: list[tuple[np.ndarray, np.ndarray]]  # per stage (dW1, dW2)
    # Each weight gradient as it was added: the sequential run's by (micro-batch, stage); the pipeline's by the
    # (rank, operation index) that added it.
    parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def sequential_step(weights: list[StageWeights], inputs: np.ndarray, labels: np.ndarray, device: str) -> StepResult:
    """Every micro-batch through every stage, one after another, on one device; gradients summed in order."""
    with tf.device(device):
        grads = [[tf.zeros_like(w.w1), tf.zeros_like(w.w2)] for w in weights]
        losses, outputs, parts = [], [], {}
        for x, label in zip(inputs, labels):
            saved = []
            h = tf.constant(x)
            for w in weights:
                h, keep = stage_forward(h, w)
                saved.append(keep)
            loss, grad = mse(h, tf.constant(label))
            losses.append(loss.numpy())
            outputs.append(h.numpy())
            for index in reversed(range(len(weights))):
                grad, operands = stage_input_gradient(grad, saved[index], weights[index])
                dw1, dw2 = stage_weight_gradient(operands)
                grads[index][0] += dw1
                grads[index][1] += dw2
                parts[(len(losses) - 1, index)] = (dw1.numpy(), dw2.numpy())
    return StepResult(np.array(losses), np.array(outputs), [(a.numpy(), b.numpy()) for a, b in grads], parts)


@dataclass
class _Rank:
    device: str
    modules: dict[int, StageWeights]  # dir -> weights of the stage this rank holds for it
    grads: dict[int, list] = field(default_factory=dict)
    saved: dict[tuple, tuple] = field(default_factory=dict)  # (dir, mb) -> forward's saved tensors
    pending: list = field(default_factory=list)  # zero-bubble weight gradients, oldest first


def global_index(method: str, chunks: int, flow: int, mb: int) -> int:
    """The sequential run's micro-batch: DualPipe's flow 0 takes the first half of the batch, flow 1 the second."""
    return flow * micro_batches_per_flow(method, chunks) + mb


def pipeline_step(method: str, schedule: Schedule, weights: list[StageWeights], inputs: np.ndarray,
                  labels: np.ndarray, devices: list[str]) -> StepResult:
    """Run `schedule` (one op list per rank, rank r on devices[r]) over micro-batches inputs[C] and labels[C]."""
    ranks, chunks = len(schedule), len(inputs)
    if len(devices) < ranks:
        raise ValueError(f"{ranks} ranks need {ranks} devices, got {len(devices)}")
    if len(weights) != stages(method, ranks):
        raise ValueError(f"{method} on {ranks} ranks runs {stages(method, ranks)} stages, got {len(weights)}")
    state = []
    for rank in range(ranks):
        held = {(c.dir, c.stage) for op in schedule[rank] for c in _chunks(method, ranks, rank, op)}
        with tf.device(devices[rank]):  # each rank's own copy of the stages it holds
            modules = {d: StageWeights(tf.identity(weights[s].w1), tf.identity(weights[s].w2)) for d, s in held}
            grads = {d: [tf.zeros_like(m.w1), tf.zeros_like(m.w2)] for d, m in modules.items()}
        state.append(_Rank(devices[rank], modules, grads))
    results: dict[Chunk, tf.Tensor] = {}  # a forward's output or a backward's input gradient
    losses = np.zeros(chunks)
    outputs: list = [None] * chunks
    last = stages(method, ranks) - 1

    def receive(rank: _Rank, c: Chunk) -> tf.Tensor | None:
        source = _input_of(method, ranks, c)
        if source is None or (c.kind == "B" and c.stage == last):
            return None
        with tf.device(rank.device):
            return tf.identity(results.pop(source))  # a copy onto this rank's device: the send and the receive

    def forward(rank: _Rank, c: Chunk) -> None:
        index = global_index(method, chunks, c.flow, c.mb)
        with tf.device(rank.device):
            x = receive(rank, c) if c.stage else tf.constant(inputs[index])
            y, rank.saved[(c.dir, c.mb)] = stage_forward(x, rank.modules[c.dir])
            if c.stage == last:
                loss, grad = mse(y, tf.constant(labels[index]))
                losses[index], outputs[index] = loss.numpy(), y.numpy()
                results[Chunk("loss", c.rank, c.dir, c.mb, c.flow, c.stage)] = grad
            else:
                results[c] = y

    parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def accumulate(rank: _Rank, at: tuple[int, int], direction: int, operands: tuple) -> None:
        parts[at] = _accumulate(rank, direction, operands)

    def backward(rank: _Rank, at: tuple[int, int], c: Chunk, zero_bubble: bool) -> None:
        with tf.device(rank.device):
            grad = (results.pop(Chunk("loss", c.rank, c.dir, c.mb, c.flow, c.stage)) if c.stage == last
                    else receive(rank, c))
            grad_x, operands = stage_input_gradient(grad, rank.saved.pop((c.dir, c.mb)), rank.modules[c.dir])
            if c.stage:
                results[c] = grad_x
            if zero_bubble:
                rank.pending.append((c.dir, operands))
            else:
                accumulate(rank, at, c.dir, operands)

    def run(rank_index: int, index: int, op: list) -> None:
        rank = state[rank_index]
        if op[0] == "W":
            accumulate(rank, (rank_index, index), *next_weight_gradient(rank.pending))
            return
        for part in (op[1:] if op[0] == "FB" else [op]):
            c = _chunks(method, ranks, rank_index, part)[0]
            if part[0] == "F":
                forward(rank, c)
            else:
                backward(rank, (rank_index, index), c, part[3])

    for rank, index, op in _execution_order(method, schedule):
        run(rank, index, op)
    left = [(r, len(s.saved), len(s.pending)) for r, s in enumerate(state) if s.saved or s.pending]
    if left or results:
        raise RuntimeError(f"the schedule left work undone: (rank, activations kept, weight gradients pending) {left}, "
                           f"{len(results)} results never consumed")
    return StepResult(losses, np.array(outputs), _stage_grads(method, ranks, state), parts)


def _execution_order(method: str, schedule: Schedule) -> list[tuple[int, int, list]]:
    """(rank, index in its list, op) in an order where every chunk's input was made before it; a stuck schedule
    raises."""
    ranks = len(schedule)
    position, done, order = [0] * ranks, set(), []
    while len(order) < sum(map(len, schedule)):
        progressed = False
        for rank, ops in enumerate(schedule):
            while position[rank] < len(ops):
                chunks = _chunks(method, ranks, rank, ops[position[rank]])
                if any(p is not None and p not in done for p in (_input_of(method, ranks, c) for c in chunks)):
                    break
                order.append((rank, position[rank], ops[position[rank]]))
                done.update(chunks)
                position[rank] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{method}: the schedule cannot proceed at positions {position}")
    return order


def _accumulate(rank: _Rank, direction: int, operands: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Add a weight gradient to the rank's copy of the stage it holds for `direction`; returns it."""
    with tf.device(rank.device):
        dw1, dw2 = stage_weight_gradient(operands)
        rank.grads[direction][0] += dw1
        rank.grads[direction][1] += dw2
    return dw1.numpy(), dw2.numpy()


def _stage_grads(method: str, ranks: int, state: list[_Rank]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each stage's gradient: the sum over the ranks holding a copy of it (DualPipe's two directions)."""
    total: dict[int, list[np.ndarray]] = {}
    for rank, held in enumerate(state):
        for direction, grads in sorted(held.grads.items()):
            stage = _stage_held(method, ranks, rank, direction)[1]
            parts = [g.numpy() for g in grads]
            total[stage] = [a + b for a, b in zip(total[stage], parts)] if stage in total else parts
    return [tuple(total[s]) for s in range(stages(method, ranks))]

