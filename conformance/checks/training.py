"""The training step (report sections 2.1.2, 2.2, 3.3; SEMANTICS.md sections 3 and 4) of a backend that declares
one (`Backend.trainer`), over several steps, so that the optimizer's moments are not zero, against the float64
reference (reference/training.py). At every step:
- the losses (main, MTP, sequence-wise balance) at the step's weights (`train.loss.float32`);
- the gradients themselves: every trained tensor's gradient along a seeded random direction against the
  reference's central finite difference of its total loss along it (`grad.float32`), so a gradient's magnitude
  counts (scaled gradients fail) and every tensor is seen;
- the expert loads, exactly (routing);
- the update against the reference's AdamW (its own clipping, learning-rate schedule, weight decay and moments
  carried over the steps) applied to the backend's own gradients (`train.update.float32`);
- the correction biases against the reference's update rule on the same loads.
The reference is this check's oracle, so it does not apply to it.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.reference import training as ref

from dsv3_conformance.backends import REFERENCE, Unsupported
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.training import TrainSettings
from dsv3_conformance.verdict import expect, expect_close
from dsv3_conformance.checks.registry import register
from dsv3_conformance.checks.strategies import build_weights

COMPONENT = "training"
STEPS = 3
CONFIGS = {
    "mtp2-bias-q-lora-0": tiny(n_mtp_layers=2, n_layers=2, n_dense_layers=1, vocab_size=16, dim=8, inter_dim=8,
                               moe_inter_dim=4, n_heads=2, q_lora_rank=0, kv_lora_rank=4, qk_nope_head_dim=2,
                               qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_expert_groups=2,
                               n_limited_groups=1, n_activated_experts=2, max_seq_len=16, rope_scaling=None),
    "moe-moe-yarn-q-lora": tiny(n_mtp_layers=0, n_layers=2, n_dense_layers=0, vocab_size=16, dim=8, moe_inter_dim=4,
                                n_heads=1, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
                                v_head_dim=2, n_routed_experts=4, n_expert_groups=1, n_limited_groups=1,
                                n_activated_experts=2, n_shared_experts=0, max_seq_len=16),
}
# A warm-up step then the cosine, clipping active, a balance loss and a bias speed large enough to be measured.
SETTINGS = TrainSettings(learning_rate=1e-2, warmup_steps=1, total_steps=4, balance_alpha=1e-2, bias_gamma=1e-2)


def _not_the_reference(backend) -> str | None:
    return "the reference is this check's float64 oracle" if backend == REFERENCE else None


def _bias_paths(weights) -> list[tuple]:
    """The correction biases, in the order of the MoE blocks' loads (main layers, then MTP depths)."""
    return [path for path, _ in ref.arrays(weights) if path[-1] == "bias"]


def _one_step(name: str, step: int, trainer, before, tokens: np.ndarray, moments: dict, rng) -> None:
    config = CONFIGS[name]
    done = trainer.step(tokens)
    after = ref.in_float64(trainer.weights())
    where = f"{name}, step {step}"
    wanted = ref.losses(before, config, tokens, SETTINGS)
    for part in ("main", "mtp", "balance"):
        expect_close(f"{where}: {part} loss", np.array([done.losses[part]]), np.array([getattr(wanted, part)]),
                     "train.loss.float32")
    expect(np.array_equal(np.asarray(done.loads), np.array(wanted.loads)),
           f"{where}: expert loads {np.asarray(done.loads).tolist()}, the reference routes {np.array(wanted.loads).tolist()}")
    grads = dict(ref.arrays(ref.in_float64(done.gradients)))
    paths = ref.trainable_paths(before)
    directions = {path: rng.standard_normal(grads[path].shape) for path in paths}
    got = np.array([float(np.sum(grads[p] * directions[p])) for p in paths])
    want = np.array([ref.directional_derivative(before, config, tokens, SETTINGS, p, directions[p]) for p in paths])
    expect_close(f"{where}: the gradient of each of {len(paths)} trained tensors along a random direction",
                 got, want, "grad.float32")
    expect(abs(done.learning_rate - ref.learning_rate_at(SETTINGS, step)) <= 1e-12 * SETTINGS.learning_rate,
           f"{where}: learning rate {done.learning_rate}, the schedule gives {ref.learning_rate_at(SETTINGS, step)}")
    clipped, _ = ref.clip_by_global_norm([grads[p] for p in paths], SETTINGS.clip_norm)
    old, new = dict(ref.arrays(before)), dict(ref.arrays(after))
    expected_update, got_update = [], []
    for path, grad in zip(paths, clipped):
        m, v = moments.get(path, (np.zeros_like(grad), np.zeros_like(grad)))
        updated, m, v = ref.adamw(old[path], grad, m, v, step, ref.learning_rate_at(SETTINGS, step), SETTINGS)
        moments[path] = (m, v)
        expected_update.append((updated - old[path]).ravel())
        got_update.append((new[path] - old[path]).ravel())
    expect_close(f"{where}: every parameter's AdamW update", np.concatenate(got_update), np.concatenate(expected_update),
                 "train.update.float32")
    biases = _bias_paths(before)
    if SETTINGS.uses_bias and biases:
        moved = [new[p] - old[p] for p in biases]
        rule = [ref.bias_update(old[p], load, SETTINGS.bias_gamma) - old[p] for p, load in zip(biases, wanted.loads)]
        expect_close(f"{where}: correction bias updates", np.concatenate(moved), np.concatenate(rule),
                     "train.update.float32")


def training_steps_match_the_reference(backend) -> None:
    """Several training steps (moments carried): losses, gradients, loads, updates and biases vs the reference."""
    if backend.trainer is None:
        raise Unsupported(f"backend {backend.name} declares no training step (Backend.trainer)", "training")
    for name, config in CONFIGS.items():
        weights = build_weights(config, seed=3)
        trainer = backend.trainer(config, weights, SETTINGS, "float32")
        rng = np.random.default_rng(4)
        moments: dict = {}
        before = ref.in_float64(trainer.weights())
        for step in range(1, STEPS + 1):
            tokens = rng.integers(0, config.vocab_size, (2, 6))
            _one_step(name, step, trainer, before, tokens, moments, rng)
            before = ref.in_float64(trainer.weights())


register("training:steps", COMPONENT, training_steps_match_the_reference, applies=_not_the_reference)
