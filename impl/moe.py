"""DeepSeekMoE in TensorFlow: the router, and the routed experts in three forms by where they run.

Outside XLA (the prefill), the T*k routed token copies are sorted by expert and split into one ragged group
per expert, each multiplied against its expert's weights in place (`grouped_experts`). Inside XLA, whose
shapes are static, up to COPIES_LOOP_MAX_ROWS copies per expert on average (fp8 experts: one) loop
over the copies, one row against its expert's weights in place at a time (`copies_in_place`); more are
packed into tiles of m rows, each tile holding rows of one expert only (an expert's last tile is
zero-padded), the expert weights gathered per tile and every tile run as one batched matmul
(`routed_experts`). A block holding only some experts loops over the experts it holds when the copies are
many (`experts_in_place`). The work grows with tokens x k (the tiles add at most one partial tile per used
expert; the loop over held experts multiplies every token by each used one), never with tokens x experts;
the copies are then weighted and summed back per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.weights import FFNWeights, GateWeights, LinearWeight

from . import matvec
from .fp8 import dequantize_weight, fp8_gemm, fp8_training_matmul, quantize_activation
from .layers import project, silu, swiglu_ffn

MAX_TILE_ROWS = 64
# Up to this many routed copies per expert on average (as tile_rows rounds it), float experts inside XLA loop over
# the copies rather than take the tiles: the loop reads each expert's weights in place, the tiles gather them per
# tile, which pays only for tiles of many rows (docs/performance-log.md).
COPIES_LOOP_MAX_ROWS = 32


@dataclass(frozen=True)
class StackedMoE:
    """A MoE block with its routed experts stacked: gate/up weights [R, inter, dim], down [R, dim, inter].

    When only some experts are resident (a layer of a real checkpoint verified on the experts its batch routes
    to), the stack holds those alone, `resident` their expert ids and `slots` each expert's row; inside XLA such
    a block always takes one of the in-place loops (one expert in memory at a time), outside it the ragged groups
    of the experts held, and a step routing a token elsewhere is refused (Transformer checks it).
    """

    gate: GateWeights
    experts: FFNWeights
    shared: FFNWeights | None
    resident: tuple[int, ...] | None = None  # the experts held, when only some are
    slots: tf.Tensor | None = None  # then: each expert's row of the stack [E] (0 for one not held)


# What an expert outside the kept groups scores: -inf, not 0, since with negative biases every kept
# score may be below 0 and a 0 would win.
MASKED_CHOICE = float("-inf")


def affinities(x: tf.Tensor, gate: GateWeights, config: ModelConfig) -> tf.Tensor:
    """Token-to-expert affinities [T, E] in float32 (sigmoid, or softmax for V2-style gates)."""
    logits = tf.matmul(tf.cast(x, tf.float32), gate.weight, transpose_b=True)
    return tf.sigmoid(logits) if config.score_func == "sigmoid" else tf.nn.softmax(logits, axis=-1)


def group_scores(choice: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """Score of each expert group [T, G]: sum of its two best choice scores with a bias, else its best."""
    grouped = tf.reshape(choice, [-1, config.n_expert_groups, config.experts_per_group])
    if config.gate_bias:
        return tf.reduce_sum(tf.math.top_k(grouped, 2).values, axis=-1)
    return tf.reduce_max(grouped, axis=-1)


def limit_to_groups(choice: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """Choice scores with every expert outside the topk_group best groups set to MASKED_CHOICE."""
    if config.n_expert_groups == 1:
        return choice
    kept = top_k(group_scores(choice, config), config.n_limited_groups)
    allowed = tf.reduce_any(tf.one_hot(kept, config.n_expert_groups, on_value=True, off_value=False), axis=1)
    return tf.where(tf.repeat(allowed, config.experts_per_group, axis=-1), choice, MASKED_CHOICE)


def top_k(scores: tf.Tensor, k: int) -> tf.Tensor:
    """Indices [T, k] of the k largest scores per row, best first."""
    return tf.math.top_k(scores, k).indices


def select_experts(choice: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """The k experts [T, k] with the best choice scores inside the kept groups."""
    return top_k(limit_to_groups(choice, config), config.n_activated_experts)


def normalizes_topk(config: ModelConfig) -> bool:
    """Whether the chosen weights are renormalized: for sigmoid scores, not for softmax ones."""
    return config.score_func != "softmax"


def gate_weights(scores: tf.Tensor, experts: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """Unbiased affinities of the chosen experts, normalized for sigmoid gates, times route_scale."""
    weights = tf.gather(scores, experts, batch_dims=1)
    if normalizes_topk(config):
        weights = weights / tf.reduce_sum(weights, axis=-1, keepdims=True)
    return weights * config.route_scale


def route(x: tf.Tensor, gate: GateWeights, config: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Gating weights [T, k] (float32) and chosen experts [T, k] (int32)."""
    scores = affinities(x, gate, config)
    choice = scores if gate.bias is None else scores + gate.bias
    experts = select_experts(choice, config)
    return gate_weights(scores, experts, config), experts


def tile_rows(copies: int, n_experts: int) -> int:
    """Rows per tile: the power of two at or above the mean copies per expert, at most MAX_TILE_ROWS. Rounding
    up, not down, halves the tiles (and the expert weights gathered for them) for a padding of at most one
    tile per expert."""
    rows = 1
    while rows < min(-(-copies // n_experts), MAX_TILE_ROWS):
        rows *= 2
    return rows


def tile_count(copies: int, n_experts: int, rows: int) -> int:
    """Tiles enough for any routing: copies/rows full tiles plus one partial tile per used expert."""
    return (copies + min(n_experts, copies) * (rows - 1)) // rows


def _tile_linear(tiles: tf.Tensor, weight: LinearWeight, tile_expert: tf.Tensor, numerics: Numerics) -> tf.Tensor:
    """tiles [G, m, in] times each tile's expert weight [G, out, in]^T -> [G, m, out]."""
    gathered = tf.gather(weight.weight, tile_expert)
    if weight.scale_inv is None:
        if numerics.fp8_training:
            return fp8_training_matmul(tiles, tf.cast(gathered, tiles.dtype))
        return tf.einsum("gmk,gnk->gmn", tiles, gathered)
    scales = tf.gather(weight.scale_inv, tile_expert)
    if numerics.gemm_impl == "fp8":
        tiles_q, tiles_scale = quantize_activation(tiles, numerics.scale_format("expert"))
        return tf.cast(fp8_gemm(tiles_q, tiles_scale, gathered, scales), tiles.dtype)
    return tf.einsum("gmk,gnk->gmn", tiles, dequantize_weight(gathered, scales, tiles.dtype))


def sorted_copies(experts: tf.Tensor, gating: tf.Tensor, dtype: tf.DType):
    """The T*k routed token copies (experts [T, k]) in expert order: each copy's expert unsorted [T*k], then
    sorted by expert (stable) with its token and gating weight (in `dtype`)."""
    tokens, k = experts.shape
    flat_expert = tf.reshape(experts, [tokens * k])
    order = tf.argsort(flat_expert, stable=True)
    return (flat_expert, tf.gather(flat_expert, order), tf.gather(tf.repeat(tf.range(tokens), k), order),
            tf.gather(tf.reshape(tf.cast(gating, dtype), [tokens * k]), order))


def routed_experts(x: tf.Tensor, gating: tf.Tensor, experts: tf.Tensor, stacked: FFNWeights, config: ModelConfig,
                   numerics: Numerics) -> tf.Tensor:
    """sum over each token's k chosen experts of gating * expert(x), for x [T, dim]."""
    tokens, k = x.shape[0], config.n_activated_experts
    copies, n_experts = tokens * k, config.n_routed_experts
    rows = tile_rows(copies, n_experts)
    tiles = tile_count(copies, n_experts, rows)

    flat_expert, sorted_expert, sorted_token, sorted_gating = sorted_copies(experts, gating, x.dtype)
    counts = tf.math.unsorted_segment_sum(tf.ones([copies], tf.int32), flat_expert, n_experts)
    tiles_per_expert = (counts + rows - 1) // rows
    first_tile = tf.cumsum(tiles_per_expert, exclusive=True)
    rank = tf.range(copies) - tf.gather(tf.cumsum(counts, exclusive=True), sorted_expert)
    slot = (tf.gather(first_tile, sorted_expert) + rank // rows) * rows + rank % rows
    tile_end = tf.cumsum(tiles_per_expert)
    tile_expert = tf.minimum(tf.reduce_sum(tf.cast(tile_end[None, :] <= tf.range(tiles)[:, None], tf.int32), axis=1),
                             n_experts - 1)

    packed = tf.scatter_nd(slot[:, None], tf.gather(x, sorted_token), [tiles * rows, config.dim])
    packed = tf.reshape(packed, [tiles, rows, config.dim])
    hidden = (silu(_tile_linear(packed, stacked.gate_proj, tile_expert, numerics))
              * _tile_linear(packed, stacked.up_proj, tile_expert, numerics))
    out = tf.reshape(_tile_linear(hidden, stacked.down_proj, tile_expert, numerics), [tiles * rows, config.dim])
    weighted = tf.gather(out, slot) * sorted_gating[:, None]
    return tf.math.unsorted_segment_sum(weighted, sorted_token, tokens)


def _expert_linear(x: tf.Tensor, weight: LinearWeight, numerics: Numerics) -> tf.Tensor:
    """x [T, in] through one expert's projection [out, in], read in place: nothing is gathered per token copy."""
    if weight.scale_inv is None:
        if numerics.fp8_training:
            return fp8_training_matmul(x, tf.cast(weight.weight, x.dtype))
        return project(x, tf.cast(weight.weight, x.dtype))
    if numerics.gemm_impl == "fp8":
        x_q, x_scale = quantize_activation(x, numerics.scale_format("expert"))
        return tf.cast(fp8_gemm(x_q, x_scale, weight.weight, weight.scale_inv), x.dtype)
    return project(x, dequantize_weight(weight.weight, weight.scale_inv, x.dtype))


def _one_expert(stacked: FFNWeights, row) -> FFNWeights:
    """Expert `row` of the stack. A Python int slices along the first axis, which outside XLA shares the stack's
    buffer; a tensor (inside XLA) gathers, which XLA turns into a slice read by the matmul."""
    def take(tensor):
        return tensor[row] if isinstance(row, int) else tf.gather(tensor, row)
    return FFNWeights(*(LinearWeight(take(p.weight), None if p.scale_inv is None else take(p.scale_inv))
                        for p in (stacked.gate_proj, stacked.up_proj, stacked.down_proj)))


def _expert_ffn(x: tf.Tensor, expert: FFNWeights, numerics: Numerics) -> tf.Tensor:
    hidden = silu(_expert_linear(x, expert.gate_proj, numerics)) * _expert_linear(x, expert.up_proj, numerics)
    return _expert_linear(hidden, expert.down_proj, numerics)


def _routed_share(experts: tf.Tensor, gating: tf.Tensor, expert, dtype: tf.DType) -> tf.Tensor:
    """Each token's gate weight for `expert` [T] (zero where it did not choose it)."""
    weights = tf.cast(gating, dtype)
    return tf.reduce_sum(tf.where(experts == expert, weights, tf.zeros_like(weights)), axis=-1)


def copies_in_place(x: tf.Tensor, gating: tf.Tensor, experts: tf.Tensor, stacked: FFNWeights, config: ModelConfig,
                    numerics: Numerics, slots: tf.Tensor | None = None) -> tf.Tensor:
    """The routed experts inside XLA: a loop over the T*k routed copies in expert order, each one token's row
    against its expert's weights in place, weighted by its gate and added to its token's row. XLA reads the
    slice of the stack inside a one-row product (it fuses the slice into the matrix-vector product) but copies
    the slice out of the stack before a product of several rows, which a loop over the used experts multiplying
    every token (`experts_in_place`) and the tiles both pay. Consecutive copies of one expert find its weights in
    cache."""
    _, sorted_expert, sorted_token, sorted_gating = sorted_copies(experts, gating, x.dtype)
    if (matvec.applies(x, stacked.gate_proj.weight.shape[1:]) and stacked.gate_proj.scale_inv is None
            and not numerics.fp8_training):  # the whole loop as one kernel call, the experts read in their stacks
        rows = sorted_expert if slots is None else tf.gather(slots, sorted_expert)
        return matvec.experts(x, stacked.gate_proj.weight, stacked.up_proj.weight, stacked.down_proj.weight, rows,
                              sorted_token, sorted_gating)

    def body(i, out):
        expert, token = sorted_expert[i], sorted_token[i]
        row = expert if slots is None else tf.gather(slots, expert)
        y = _expert_ffn(tf.gather(x, token[None]), _one_expert(stacked, row), numerics)
        return i + 1, tf.tensor_scatter_nd_add(out, token[None, None], sorted_gating[i] * y)

    copies = experts.shape[0] * experts.shape[1]  # static: a training step differentiates the loop inside XLA
    _, out = tf.while_loop(lambda i, _: i < copies, body, (tf.constant(0), tf.zeros_like(x)), maximum_iterations=copies)
    return out


def experts_in_place(x: tf.Tensor, gating: tf.Tensor, experts: tf.Tensor, stacked: FFNWeights, config: ModelConfig,
                     numerics: Numerics, slots: tf.Tensor | None = None) -> tf.Tensor:
    """The routed experts of a block holding only some experts, for many tokens: a loop over the experts the
    tokens chose (used ones first), each multiplying every token against its weights and keeping the rows
    routed to it (weighted by their gate, zero elsewhere). Work: used experts x T rows; memory: one expert
    (dequantized, for fp8 weights) at a time, where the tiles would gather one per tile."""
    flat = tf.reshape(experts, [-1])
    counts = tf.math.unsorted_segment_sum(tf.ones_like(flat), flat, config.n_routed_experts)
    order = tf.argsort(tf.cast(counts > 0, tf.int32), direction="DESCENDING", stable=True)
    used = tf.reduce_sum(tf.cast(counts > 0, tf.int32))

    def body(i, out):
        expert = order[i]
        share = _routed_share(experts, gating, expert, x.dtype)
        row = expert if slots is None else tf.gather(slots, expert)
        return i + 1, out + share[:, None] * _expert_ffn(x, _one_expert(stacked, row), numerics)

    _, out = tf.while_loop(lambda i, _: i < used, body, (tf.constant(0), tf.zeros_like(x)))
    return out


def _fp8_groups_in_turn(ordered: tf.Tensor, counts: tf.Tensor, stacked: FFNWeights, rows: dict[int, int],
                        config: ModelConfig, numerics: Numerics) -> tf.Tensor:
    """The expert groups of fp8 experts (the copies `ordered` by expert, `counts` [E] rows each) in one loop over
    the experts, one at a time, an expert dequantized (4 bytes a weight) only when its group has rows: TensorFlow's
    executor otherwise ran every expert's dequantization ahead of the matmuls, holding all of them in float32 at
    once (a full-width layer of 64 experts: 11 GB). One loop body, not a branch per expert: tracing a branch per
    expert of the fp8 GEMM's ops took most of a golden case's minute. Inside the loop an expert's e4m3 bytes are
    gathered (copied) from the stack: a quarter of the float32 values made from them. An expert without a row of
    the stack in `rows` (not resident) yields zeros."""
    n_experts = config.n_routed_experts
    held = tf.constant([e in rows for e in range(n_experts)])
    stack_row = tf.constant([rows.get(e, 0) for e in range(n_experts)])
    starts = tf.cumsum(counts, exclusive=True)

    def body(e, outputs):
        group = ordered[starts[e]: starts[e] + counts[e]]
        out = tf.cond(held[e] & (counts[e] > 0),
                      lambda: _expert_ffn(group, _one_expert(stacked, stack_row[e]), numerics),
                      lambda: tf.zeros_like(group))
        return e + 1, outputs.write(e, out)

    outputs = tf.TensorArray(ordered.dtype, size=n_experts, infer_shape=False, element_shape=[None, config.dim])
    _, outputs = tf.while_loop(lambda e, _: e < n_experts, body, (tf.constant(0), outputs), parallel_iterations=1)
    return outputs.concat()


def grouped_experts(x: tf.Tensor, gating: tf.Tensor, experts: tf.Tensor, stacked: FFNWeights, config: ModelConfig,
                    numerics: Numerics, resident: tuple[int, ...] | None = None) -> tf.Tensor:
    """The routed experts outside XLA, where shapes may depend on the routing: the T*k copies sorted by expert
    and split into one group per expert, each group multiplied against its expert's weights in place, the
    copies weighted and summed back per token. Exactly T*k rows, no padding, no weight copied (XLA's static
    shapes would need tiles, padding and gathered weights).
    With only some experts `resident` (the stack holds those alone, in that order), a group routed elsewhere
    yields zeros: such a step is refused afterwards (impl.model checks the routing). fp8 experts run in turn
    (`_fp8_groups_in_turn`)."""
    tokens, n_experts = x.shape[0], config.n_routed_experts
    flat_expert, _, sorted_token, sorted_gating = sorted_copies(experts, gating, x.dtype)
    counts = tf.math.bincount(flat_expert, minlength=n_experts, maxlength=n_experts)
    ordered = tf.gather(x, sorted_token)
    rows = {expert: row for row, expert in enumerate(range(n_experts) if resident is None else resident)}
    if stacked.gate_proj.scale_inv is not None:
        out = _fp8_groups_in_turn(ordered, counts, stacked, rows, config, numerics)
    else:
        out = tf.concat([_expert_ffn(group, _one_expert(stacked, rows[e]), numerics) if e in rows
                         else tf.zeros_like(group)
                         for e, group in enumerate(tf.split(ordered, counts, num=n_experts))], 0)
    return tf.math.unsorted_segment_sum(out * sorted_gating[:, None], sorted_token, tokens)


def moe(x: tf.Tensor, weights: StackedMoE, config: ModelConfig, numerics: Numerics,
        outside_xla: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Routed experts plus shared experts for x [T, dim]; also the chosen experts [T, k]. Outside XLA the experts
    run as ragged groups; inside, up to COPIES_LOOP_MAX_ROWS copies per expert on average (fp8 experts: one)
    loop over their copies, more take the tiles, or the loop over the held experts when only some are held."""
    gating, experts = route(x, weights.gate, config)
    rows = tile_rows(x.shape[0] * config.n_activated_experts, config.n_routed_experts)
    # fp8 experts are dequantized once per loop iteration: over the copies only where they are no more than the
    # experts (as many as the used experts at most), else once per used expert or per tile.
    fp8 = weights.experts.gate_proj.scale_inv is not None
    if outside_xla:
        out = grouped_experts(x, gating, experts, weights.experts, config, numerics, weights.resident)
    elif rows == 1 or (not fp8 and rows <= COPIES_LOOP_MAX_ROWS):
        out = copies_in_place(x, gating, experts, weights.experts, config, numerics, weights.slots)
    elif weights.slots is not None:
        out = experts_in_place(x, gating, experts, weights.experts, config, numerics, weights.slots)
    else:
        out = routed_experts(x, gating, experts, weights.experts, config, numerics)
    return out + shared_experts(x, weights.shared, numerics), experts


def shared_experts(x: tf.Tensor, shared: FFNWeights | None, numerics: Numerics) -> tf.Tensor:
    """The shared experts' output, zero when there are none."""
    return tf.zeros_like(x) if shared is None else swiglu_ffn(x, shared, numerics, "shared_expert")
