"""Bigger models, for `--scale small` and `--scale full` (not run by default).

small: a 4-layer model with 64 experts in 8 groups, 256-wide rope/latent spaces, a 96-token prompt.
full: one dense and one MoE layer at the released model's widths (dim 7168, 128 heads, q_lora 1536,
kv_lora 512, expert width 2048, fp8 weights), with 16 experts and a 1024-token vocabulary so that it
fits a workstation.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends import REFERENCE
from dsv3_conformance.format.config import YarnScaling, deepseek_v3_671b, tiny
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.checks.cross import against_reference_in, expect_same_run, require_dtype
from dsv3_conformance.checks.registry import register
from dsv3_conformance.checks.strategies import build_weights

COMPONENT = "scale tiers"
SMALL = tiny(dim=512, inter_dim=1024, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
             n_routed_experts=64, n_expert_groups=8, n_limited_groups=4, n_activated_experts=6, n_shared_experts=1,
             q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             vocab_size=2048, max_seq_len=256, rope_scaling=YarnScaling(factor=40.0, original_seq_len=128),
             name="scale-small")
FULL_WIDTHS = deepseek_v3_671b().replace(n_layers=2, n_dense_layers=1, n_routed_experts=16, n_expert_groups=8,
                                         n_limited_groups=4, n_activated_experts=8, vocab_size=1024,
                                         max_seq_len=8192, n_mtp_layers=0, name="671b-widths")


def prompt_for(config, batch: int, length: int, steps: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, length)), rng.integers(0, config.vocab_size, (batch, steps))


def _small(dtype: str, policy: str):
    def small_model_matches_reference(backend):
        """A 4-layer, 64-expert model, 96-token prompts, against the float64 reference."""
        require_dtype(backend, dtype)
        weights = build_weights(SMALL, seed=1, bias_mean=-2.0)
        prompt, following = prompt_for(SMALL, batch=2, length=96)
        expect_same_run(f"{backend.name} {dtype} on {SMALL.name}", backend,
                        backend.make_runner(SMALL, weights, dtype=dtype),
                        REFERENCE.make_runner(SMALL, weights), prompt, following, policy)
    return small_model_matches_reference


def small_model_matches_the_oracle(backend):
    """The same small model against transformers."""
    from dsv3_conformance.golden.oracle import OracleRunner

    weights = build_weights(SMALL, seed=2, bias_mean=-2.0)
    prompt, following = prompt_for(SMALL, batch=2, length=96)
    expect_same_run(f"{backend.name} vs transformers on {SMALL.name}", backend, backend.make_runner(SMALL, weights),
                    OracleRunner(SMALL, weights), prompt, following, "oracle.float32")


def _full(gemm_impl: str, policy: str):
    def released_widths_match_reference(backend):
        """One dense and one MoE layer at the released widths against the float64 reference."""
        weights = build_weights(FULL_WIDTHS, seed=3, bias_mean=-2.0)
        prompt, following = prompt_for(FULL_WIDTHS, batch=1, length=16)
        numerics = Numerics(gemm_impl)
        expect_same_run(f"{backend.name} on {FULL_WIDTHS.name} ({gemm_impl} path)", backend,
                        backend.make_runner(FULL_WIDTHS, weights, numerics),
                        REFERENCE.make_runner(FULL_WIDTHS, weights, numerics), prompt, following, policy)
    return released_widths_match_reference


def _not_the_reference(backend) -> str | None:
    return "the reference is this check's oracle" if backend == REFERENCE else None


for _dtype in ("float32", "bfloat16"):
    register(f"scale:small[{_dtype}]", COMPONENT, _small(_dtype, f"cross.{_dtype}"), scale="small",
             applies=against_reference_in(_dtype))
register("scale:small-oracle", COMPONENT, small_model_matches_the_oracle, scale="small", needs_oracle=True)
for _impl, _policy in (("bf16", "cross.float32"), ("fp8", "cross.fp8-path.float32")):
    register(f"scale:full[{_impl}]", COMPONENT, _full(_impl, _policy), scale="full", applies=_not_the_reference)
