"""A backend of quantized weights against the float64 reference on a longer prompt set (TOLERANCES.md section 12).

The model's every row is a multiple of 256 values, so k-quants (blocks of 256) and every smaller block apply to
all of its matrices; prompts run 96 positions, then 8 decode steps. Each logits row (every prompt position and
every step) is a next-token distribution, judged under the backend's quantization policy: KL divergence from
the reference's (median, 99th percentile, max) and top-1 agreement. Float backends are held by rel_err bounds
(cross:*, golden:*), not by this check.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends import REFERENCE, Backend
from dsv3_conformance.format.config import ModelConfig, tiny
from dsv3_conformance.metrics import Comparison
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.verdict import CheckFailed, record
from dsv3_conformance.checks.registry import check
from dsv3_conformance.checks.strategies import build_weights

COMPONENT = "quantized weights"
SEED = 1207
BATCH, PROMPT, DECODE = 4, 96, 8


def rows_of_256() -> ModelConfig:
    """Two MoE layers after a dense one; attention output, latents, experts and the dense FFN all 256 wide."""
    return tiny(vocab_size=512, dim=256, inter_dim=512, moe_inter_dim=256, n_layers=3, n_dense_layers=1, n_heads=4,
                n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, q_lora_rank=256,
                kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=64,
                max_seq_len=PROMPT + DECODE, name="rows-of-256")


def logits_of(runner, prompt: np.ndarray, following: np.ndarray) -> np.ndarray:
    """Logits [B, S + steps, V] of a prefill, then one-token decode steps fed `following`'s columns."""
    logits = [runner.prefill(prompt, capacity=prompt.shape[1] + following.shape[1]).logits]
    logits += [runner.decode(column).logits for column in following.T]
    return np.concatenate(logits, axis=1)


def long_prompt_comparison(backend: Backend) -> Comparison:
    """The backend's logits on the longer prompt set against the float64 reference's, as next-token distributions
    under the backend's quantization policy."""
    config = rows_of_256()
    weights = build_weights(config, SEED)
    rng = np.random.default_rng(SEED)
    prompt = rng.integers(0, config.vocab_size, (BATCH, PROMPT))
    following = rng.integers(0, config.vocab_size, (BATCH, DECODE))
    expected = logits_of(REFERENCE.make_runner(config, weights, dtype="float64"), prompt, following)
    got = logits_of(backend.make_runner(config, weights), prompt, following)
    return Comparison.of_distributions(f"{backend.name}: logits of {PROMPT} prompt positions and {DECODE} decode "
                                       f"steps (batch {BATCH})", got, expected,
                                       tolerance(f"quant.{backend.quantization}"))


def _quantized_only(backend: Backend) -> str | None:
    return None if backend.quantization else "float weights: held by rel_err bounds (cross:*, golden:*)"


@check("quantization:long-prompts", COMPONENT, applies=_quantized_only)
def quantized_logits_within_policy(backend):
    """Next-token distributions of a quantized backend within its type's KL and top-1 policy, 416 rows."""
    comparison = long_prompt_comparison(backend)
    record(comparison, f"quant.{backend.quantization}")
    if not comparison.passed:
        raise CheckFailed(comparison.describe(), comparison)
