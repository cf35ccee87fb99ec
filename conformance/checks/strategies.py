"""Hypothesis strategies: small but complete DeepSeek-V3-family configs, their weights and inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from dsv3_conformance.format.config import ModelConfig, YarnScaling
from dsv3_conformance.format.weights import ModelWeights, assemble
from dsv3_conformance.reference.synthetic import random_tensors


def model_examples() -> int:
    """Examples for a test that builds and compiles whole models: a quarter of the profile's, at least 3."""
    return max(3, settings.default.max_examples // 4)


@st.composite
def routing_shapes(draw, max_groups: int = 8) -> dict:
    """Expert counts, groups and top-k that validate: k <= experts reachable in topk_group groups."""
    groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if g <= max_groups]))
    per_group = draw(st.integers(2, 4))
    limited = draw(st.integers(1, groups))
    top_k = draw(st.integers(1, min(limited * per_group, 6)))
    return dict(n_routed_experts=groups * per_group, n_expert_groups=groups, n_limited_groups=limited,
                n_activated_experts=top_k)


@st.composite
def configs(draw, fp8_weights: bool | None = None, fp8_aligned: bool = False, max_groups: int = 8,
            oracle_compatible: bool = False, mtp: bool = False) -> ModelConfig:
    """A small config: q_lora 0 or not, sigmoid+bias or softmax, 1 to 8 groups, YaRN on or off, rms_norm_eps and
    rope_theta at and away from the released values.

    `fp8_aligned` makes every width a multiple of 128, as the fp8 activation path needs.
    `oracle_compatible` keeps to what the transformers class implements as the official code does
    (sigmoid with a bias; YaRN either active or absent; mscale equal to mscale_all_dim). `mtp` adds one
    or two MTP modules.
    """
    sigmoid = True if oracle_compatible else draw(st.booleans())
    fp8 = draw(st.booleans()) if fp8_weights is None else fp8_weights
    if fp8_aligned:
        heads = draw(st.sampled_from([1, 2, 4]))
        widths = dict(dim=128 * draw(st.integers(1, 2)), inter_dim=128, moe_inter_dim=128, kv_lora_rank=128,
                      qk_nope_head_dim=32, qk_rope_head_dim=draw(st.sampled_from([32, 64])), v_head_dim=128 // heads,
                      q_lora_rank=draw(st.sampled_from([0, 128])))
    else:
        heads = draw(st.integers(1, 3))
        widths = dict(dim=draw(st.sampled_from([16, 24, 32, 48])), inter_dim=draw(st.sampled_from([16, 40, 64])),
                      moe_inter_dim=draw(st.sampled_from([8, 12, 16])), kv_lora_rank=draw(st.sampled_from([8, 12, 16])),
                      qk_nope_head_dim=draw(st.sampled_from([4, 8])), qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])),
                      v_head_dim=draw(st.sampled_from([4, 8])), q_lora_rank=draw(st.sampled_from([0, 8, 12])))
    max_seq_len = draw(st.sampled_from([24, 48]))
    yarn = draw(st.sampled_from([None, "on"] if oracle_compatible else [None, "on", "off"]))
    mscale = draw(st.sampled_from([0.707, 1.0]))
    rope_scaling = None if yarn is None else YarnScaling(
        factor=draw(st.sampled_from([4.0, 40.0])),
        original_seq_len=max_seq_len // 2 if yarn == "on" else max_seq_len,
        beta_fast=32.0, beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale if oracle_compatible else 1.0)
    layers = draw(st.integers(1, 3))
    # eps and theta away from the released 1e-6 and 10000 too, so a backend that hard-codes them is seen (the
    # oracle fixes its latent norms' eps at 1e-6: hf-latent-norm-eps).
    eps = 1e-6 if oracle_compatible else draw(st.sampled_from([1e-6, 1e-3, 1e-2]))
    theta = draw(st.sampled_from([10000.0, 500.0, 1e6]))
    return ModelConfig(vocab_size=draw(st.sampled_from([32, 61])), n_layers=layers,
                       rms_norm_eps=eps, rope_theta=theta,
                       n_dense_layers=draw(st.integers(0, layers)), n_heads=heads,
                       n_shared_experts=draw(st.integers(0, 2)), score_func="sigmoid" if sigmoid else "softmax",
                       gate_bias=sigmoid, route_scale=draw(st.sampled_from([1.0, 2.5])) if sigmoid else 1.0,
                       max_seq_len=max_seq_len, rope_scaling=rope_scaling, fp8_weights=fp8,
                       n_mtp_layers=draw(st.integers(1, 2)) if mtp else 0,
                       name="generated", **widths, **draw(routing_shapes(max_groups)))


def build_weights(config: ModelConfig, seed: int, bias_mean: float = -1.0) -> ModelWeights:
    tensors = random_tensors(config, seed, bias_mean=bias_mean)
    return assemble(lambda spec: tensors[spec.name], config)


@st.composite
def models(draw, **config_kwargs) -> tuple[ModelConfig, ModelWeights]:
    """A config and its weights, gate biases drawn from strongly negative to mildly positive means."""
    config = draw(configs(**config_kwargs))
    bias_mean = draw(st.sampled_from([-8.0, -2.0, -1.0, 0.0, 0.5]))
    return config, build_weights(config, draw(st.integers(0, 2**31 - 1)), bias_mean)


@st.composite
def token_batches(draw, config: ModelConfig, max_batch: int = 3, max_len: int | None = None,
                  min_len: int = 1) -> np.ndarray:
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(min_len, max_len or config.max_seq_len))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


@st.composite
def prompt_and_continuation(draw, config: ModelConfig, decode_steps: int = 2,
                            max_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A prompt [B, S] and `decode_steps` more tokens per sequence [B, T]; sometimes ending at max_seq_len."""
    longest = config.max_seq_len - decode_steps
    near_end = draw(st.booleans(), label="prompt ends at max_seq_len")
    prompt = draw(token_batches(config, max_batch=max_batch, max_len=longest, min_len=longest if near_end else 1))
    following = np.random.default_rng(draw(st.integers(0, 2**31 - 1))).integers(
        0, config.vocab_size, (len(prompt), decode_steps))
    return prompt, following
