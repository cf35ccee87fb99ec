"""Training: the balancing rules on hand-computed cases, float64 finite-difference gradients of each component
(reference) against TensorFlow's autodiff, one whole training step TF vs reference on two generated configs,
node-limited routing asserted, and fp8 training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.checks.training import CONFIGS
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.training import TrainSettings
from dsv3_conformance.format.weights import LinearWeight
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.reference import training as ref
from dsv3_conformance.reference.training import finite_difference

RNG = np.random.default_rng(0)


# --- the balancing rules, by hand -------------------------------------------------------------------------------

def test_balance_loss_of_a_hand_computed_case():
    """E=4, k=1, one sequence of 2 tokens, both on expert 0; affinities normalized to [0.5, 0.25, 0.25, 0] and
    [0.25, 0.25, 0.25, 0.25]: f = [4, 0, 0, 0] (= 4/(1*2) * [2, 0, 0, 0]), P_0 = 0.375, L = alpha * 1.5."""
    config = tiny(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1)
    scores = np.array([[[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    experts = np.array([[[0], [0]]])
    assert ref.balance_loss(scores, experts, config, 0.1) == pytest.approx(0.1 * 1.5)
    from dsv3_conformance.impl.training import balance_loss

    got = balance_loss(tf.constant(scores, tf.float32), tf.constant(experts), config, 0.1)
    assert float(got) == pytest.approx(0.15, rel=1e-6)


def test_the_bias_moves_against_the_load_and_max_violation():
    loads = np.array([6, 2, 4, 4])  # mean 4
    assert ref.max_violation(loads) == pytest.approx(0.5)
    assert ref.bias_update(np.zeros(4), loads, 0.001).tolist() == [-0.001, 0.001, 0.0, 0.0]
    from dsv3_conformance.impl.training import bias_update

    assert np.allclose(bias_update(tf.zeros(4), tf.constant(loads), 0.001).numpy(), [-0.001, 0.001, 0, 0])


def test_the_bias_never_reaches_the_gating_weights():
    """Shifting every bias by a constant changes no choice and no weight (the weights are the unbiased s)."""
    from dsv3_conformance.reference.moe import route

    config = tiny(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    x = RNG.standard_normal((5, config.dim))
    gate = build_weights(config, seed=1).layers[1].ffn.gate
    weights, experts = route(x, gate, config)
    shifted = dataclasses.replace(gate, bias=gate.bias + 3.0)
    weights2, experts2 = route(x, shifted, config)
    assert np.array_equal(experts, experts2) and np.allclose(weights, weights2)


# --- gradients of the components: float64 finite differences vs TensorFlow ---------------------------------------

def _probe_grad_check(reference_fn, tf_fn, inputs: list[np.ndarray], key: str = "grad.float32") -> None:
    """d sum(f(inputs) * r) / d inputs: finite differences of the reference vs autodiff of TensorFlow."""
    probe = RNG.standard_normal(np.shape(reference_fn(*inputs)))
    values = [tf.Variable(a, dtype=tf.float64) for a in inputs]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(tf_fn(*values), tf.float64) * probe)
    autodiff = tape.gradient(loss, values)
    for index, (array, got) in enumerate(zip(inputs, autodiff)):
        def at(value, index=index):
            args = list(inputs)
            args[index] = value
            return float(np.sum(reference_fn(*args) * probe))
        expected = finite_difference(at, array)
        error = rel_err(tf.convert_to_tensor(got).numpy(), expected)
        assert error <= tolerance(key).value, f"input {index}: rel_err {error:.2e}"


def test_rms_norm_gradient():
    from dsv3_conformance.impl.layers import rms_norm
    from dsv3_conformance.reference.norm import rms_norm as reference

    _probe_grad_check(lambda x, w: reference(x, w, 1e-6), lambda x, w: rms_norm(x, w, 1e-6),
                      [RNG.standard_normal((3, 8)), 1 + 0.1 * RNG.standard_normal(8)])


def test_rope_gradient():
    from dsv3_conformance.impl.rope import apply_rope
    from dsv3_conformance.reference.rope import apply_rope as reference

    angles = RNG.uniform(0, 6, (4, 3))
    cos, sin = np.cos(angles), np.sin(angles)
    _probe_grad_check(lambda x: reference(x, cos, sin), lambda x: apply_rope(x, cos, sin),
                      [RNG.standard_normal((2, 4, 6))])


def test_expert_ffn_gradient():
    from dsv3_conformance.impl.layers import swiglu_ffn
    from dsv3_conformance.reference.ffn import swiglu_ffn as reference
    from dsv3_conformance.format.weights import FFNWeights

    def ffn(build):
        return lambda x, a, b, c: build(x, FFNWeights(LinearWeight(a), LinearWeight(b), LinearWeight(c)),
                                        Numerics(), "expert")
    _probe_grad_check(ffn(reference), ffn(swiglu_ffn), [RNG.standard_normal((3, 8)), RNG.standard_normal((6, 8)) / 3,
                                                        RNG.standard_normal((6, 8)) / 3, RNG.standard_normal((8, 6)) / 3])


def test_gate_weight_path_gradient():
    """The gating weights (unbiased affinities of the chosen experts, normalized, scaled) w.r.t. the tokens and
    the router weight, routing held fixed."""
    from dsv3_conformance.format.weights import GateWeights
    from dsv3_conformance.impl.moe import gate_weights as tf_gate_weights, affinities as tf_affinities
    from dsv3_conformance.reference.moe import affinities, gate_weights, route

    config = tiny(n_routed_experts=8, n_expert_groups=2, n_limited_groups=1, n_activated_experts=2)
    x0, w0 = RNG.standard_normal((4, config.dim)), RNG.standard_normal((8, config.dim)) / 8
    _, experts = route(x0, GateWeights(w0, np.zeros(8)), config)

    def reference(x, w):
        return gate_weights(affinities(x, GateWeights(w, None), config), experts, config)

    def tf_fn(x, w):
        scores = tf_affinities(tf.cast(x, tf.float32), GateWeights(tf.cast(w, tf.float32), None), config)
        return tf_gate_weights(scores, tf.constant(experts), config)
    _probe_grad_check(reference, tf_fn, [x0, w0])


def test_balance_loss_gradient():
    from dsv3_conformance.impl.training import balance_loss as tf_balance

    config = tiny(n_routed_experts=6, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    experts = RNG.integers(0, 6, (2, 5, 2))

    def reference(logits):
        return np.array(ref.balance_loss(1 / (1 + np.exp(-logits)), experts, config, 0.5))

    def tf_fn(logits):
        return tf_balance(tf.sigmoid(tf.cast(logits, tf.float32)), tf.constant(experts), config, 0.5)
    _probe_grad_check(reference, tf_fn, [RNG.standard_normal((2, 5, 6))])


def test_attention_gradient():
    """MLA (naive form): the attention sub-layer's output w.r.t. its input and every projection."""
    from dsv3_conformance.format.weights import AttentionWeights
    from dsv3_conformance.impl import attention as tfa
    from dsv3_conformance.impl.rope import apply_rope, rotation_angles, softmax_scale
    from dsv3_conformance.reference.attention import LatentCache, mla

    config = tiny(dim=8, n_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
                  v_head_dim=2, rope_scaling=None)
    shapes = [(4, 8), (4,), (8, 4), (6, 8), (4,), (8, 4), (8, 4)]
    names = ["q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o"]
    arrays = [RNG.standard_normal(s) / 2 if len(s) == 2 else 1 + 0.1 * RNG.standard_normal(s) for s in shapes]

    def weights(values, lift):
        d = dict(zip(names, values))
        return AttentionWeights(None, LinearWeight(d["q_a"]), d["q_a_norm"], LinearWeight(d["q_b"]),
                                LinearWeight(d["kv_a"]), d["kv_a_norm"], LinearWeight(d["kv_b"]), LinearWeight(d["o"]))

    def reference(x, *values):
        out, _ = mla(x, weights(values, None), config, Numerics(), LatentCache.allocate(config, 1, np.float64), 0,
                     "naive")
        return out

    def tf_fn(x, *values):
        x = tf.cast(x, tf.float32)
        w = weights([tf.cast(v, tf.float32) for v in values], None)
        angles = rotation_angles(config, tf.range(x.shape[1]))
        cos, sin = tf.cast(tf.cos(angles), tf.float32), tf.cast(tf.sin(angles), tf.float32)
        q_nope, q_rope = tfa.project_queries(x, w, config, Numerics())
        q_rope = apply_rope(q_rope, cos[None, :, None], sin[None, :, None])
        latent, rope_key = tfa.project_latent(x, w, config, Numerics())
        heads = tfa.attend(q_nope, q_rope, latent, apply_rope(rope_key, cos[None], sin[None]), w, config, Numerics(),
                           tfa.causal_mask(0, x.shape[1], x.shape[1]), softmax_scale(config), "naive")
        return tfa.output(heads, w, Numerics())
    _probe_grad_check(reference, tf_fn, [RNG.standard_normal((1, 5, 8))] + arrays)


# --- the training step itself is a registered check (conformance/checks/training.py) --------------------------

def test_node_limited_routing_is_asserted_on_every_step(monkeypatch):
    from dsv3_conformance.impl import moe
    from dsv3_conformance.impl.training import Trainer

    config = CONFIGS["mtp2-bias-q-lora-0"]
    trainer = Trainer(config, build_weights(config, seed=5), dtype="float32")
    trainer.step(np.random.default_rng(6).integers(0, 16, (2, 6)))  # the group limit holds
    monkeypatch.setattr(moe, "limit_to_groups", lambda choice, config: choice)
    broken = Trainer(config, build_weights(config, seed=5), dtype="float32")
    with pytest.raises(AssertionError, match="topk_group"):
        for seed in range(10):
            broken.step(np.random.default_rng(seed).integers(0, 16, (2, 6)))


def test_fp8_training_runs_close_to_bfloat16():
    """Widths of 128: every linear GEMM in fp8 (forward, input and weight gradients); the first step's loss is
    that of the bfloat16 step within the fp8 rounding."""
    from dsv3_conformance.impl.training import Trainer

    config = tiny(n_layers=1, n_dense_layers=0, vocab_size=64, dim=128, moe_inter_dim=128, n_heads=2,
                  q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                  n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2, max_seq_len=32)
    weights = build_weights(config, seed=7)
    tokens = np.random.default_rng(8).integers(0, 64, (2, 16))
    plain = Trainer(config, weights, TrainSettings(), dtype="bfloat16").step(tokens)
    fp8 = Trainer(config, weights, TrainSettings(fp8=True), dtype="bfloat16").step(tokens)
    assert abs(float(fp8["main"]) - float(plain["main"])) <= 2e-2 * float(plain["main"])
    assert np.isfinite(fp8["grad_norm"]) and abs(fp8["grad_norm"] / plain["grad_norm"] - 1) < 0.2


@pytest.mark.long
def test_a_restarted_trainer_runs_as_a_fresh_one():
    """restart(weights) (a new seed reusing the compiled step): zero moments, step 0, every variable, MTP and gate
    biases included, from the new weights."""
    from dsv3_conformance.impl.training import Trainer

    config = CONFIGS["mtp2-bias-q-lora-0"]
    batches = [np.random.default_rng(seed).integers(0, 16, (2, 6)) for seed in (6, 7)]
    fresh = Trainer(config, build_weights(config, seed=5), dtype="float32")
    expected = [fresh.step(tokens) for tokens in batches]
    reused = Trainer(config, build_weights(config, seed=9), dtype="float32")
    reused.step(batches[1])  # moments, biases and the step count move away from a fresh start
    reused.restart(build_weights(config, seed=5))
    found = [reused.step(tokens) for tokens in batches]
    for want, got in zip(expected, found):
        for key in ("main", "mtp", "grad_norm"):
            np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6)
    for want, got in zip(fresh.variables + fresh.biases, reused.variables + reused.biases):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
