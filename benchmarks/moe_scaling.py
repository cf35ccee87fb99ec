"""MoE cost of the TensorFlow implementation as top-k and the number of experts grow.

The tiled sorted MoE of impl/moe.py does work proportional to tokens x k; a dense "every expert on every
token" layer does work proportional to tokens x experts. Both are timed in one run, XLA-compiled, on the
same weights. Run: python -m dsv3_conformance.benchmarks.moe_scaling
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.impl.model import to_tf
from dsv3_conformance.impl.moe import route, routed_experts

from .timing import gate, median_seconds, publish

TOKENS = 2048
DIM, INTER = 256, 128


def _layer(experts: int, k: int):
    config = tiny(dim=DIM, moe_inter_dim=INTER, n_routed_experts=experts, n_expert_groups=1, n_limited_groups=1,
                  n_activated_experts=k, n_shared_experts=0, n_layers=1, n_dense_layers=0)
    weights = to_tf(build_weights(config, seed=0).layers[0].ffn, tf.float32)
    return config, weights


def _tiled(x, weights, config):
    """The tiled path alone, at every size (the model itself loops over the copies up to
    impl.moe.COPIES_LOOP_MAX_ROWS copies per expert, which the k=1 row reaches)."""
    gating, chosen = route(x, weights.gate, config)
    return routed_experts(x, gating, chosen, weights.experts, config, Numerics())


def _dense_baseline(x, weights, config):
    """Every expert on every token, masked by the routing weights: cost grows with experts."""
    gating, chosen = route(x, weights.gate, config)
    dense_gating = tf.reduce_sum(tf.one_hot(chosen, config.n_routed_experts) * gating[..., None], axis=1)
    stacked = weights.experts
    hidden = (tf.nn.silu(tf.einsum("td,efd->etf", x, stacked.gate_proj.weight))
              * tf.einsum("td,efd->etf", x, stacked.up_proj.weight))
    out = tf.einsum("etf,edf->etd", hidden, stacked.down_proj.weight)
    return tf.einsum("etd,te->td", out, dense_gating)


def main() -> None:
    x = tf.constant(np.random.default_rng(0).standard_normal((TOKENS, DIM)), tf.float32)
    rows = []
    for experts, k in [(64, 1), (64, 2), (64, 4), (64, 8), (16, 8), (256, 8)]:
        config, weights = _layer(experts, k)
        tiled = tf.function(lambda x: _tiled(x, weights, config), jit_compile=True)
        dense = tf.function(lambda x: _dense_baseline(x, weights, config), jit_compile=True)
        np.testing.assert_allclose(tiled(x).numpy(), dense(x).numpy(), rtol=1e-4, atol=1e-4)
        rows.append({"experts": experts, "k": k, "tiled_ms": 1e3 * median_seconds(lambda: tiled(x)),
                     "dense_ms": 1e3 * median_seconds(lambda: dense(x))})
    by = {(row["experts"], row["k"]): row for row in rows}
    k_ratio = by[(64, 8)]["tiled_ms"] / by[(64, 1)]["tiled_ms"]
    e_ratio = by[(256, 8)]["tiled_ms"] / by[(16, 8)]["tiled_ms"]
    dense_e_ratio = by[(256, 8)]["dense_ms"] / by[(16, 8)]["dense_ms"]
    gates = [
        gate("tiled MoE cost grows with k: time(k=8) / time(k=1) at 64 experts >= 3", k_ratio, k_ratio >= 3),
        gate("tiled MoE cost does not grow with experts: time(256) / time(16) at k=8 <= 3", e_ratio, e_ratio <= 3),
        gate("the dense baseline does grow with experts: time(256) / time(16) at k=8 >= 8",
             dense_e_ratio, dense_e_ratio >= 8),
    ]
    notes = (f"{TOKENS} tokens, dim {DIM}, expert width {INTER}, float32, XLA on the CPU; median of 5 runs after "
             "a compiling warm-up. Ratios within one run; absolute times depend on the machine. Each tile copies "
             "its expert's weights, so with few rows per tile (e.g. 512 tokens over 64 experts, 8 rows) that copy "
             "outweighs the matmul and the k-scaling flattens; at 2048 tokens tiles hold 32 to 64 rows, the regime "
             "of a prefill. The matmul rows are tokens x k plus at most one partial tile per used expert.")
    raise SystemExit(publish("moe_scaling", "MoE cost vs top-k and expert count (TensorFlow)", rows, gates, notes))


if __name__ == "__main__":
    main()
