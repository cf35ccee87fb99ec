"""Bigger models, for `--scale small` and `--scale full` (not run by default).

small: a 4-layer model with 64 experts in 8 groups, 256-wide rope/latent spaces, a 96-token prompt.
full: one dense and one MoE layer at the released model's widths (dim 7168, 128 heads, q_lora 1536,
kv_lora 512, expert width 2048, fp8 weights), with 16 experts and a 1024-token vocabulary so that it
fits a workstation; and, with `--checkpoint PATH`, one layer of a real checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conformance.backends import make_runner
from conformance.checks import expect_same_run
from conformance.strategies import build_weights
from reference.checkpoint import load_weights, open_checkpoint
from reference.config import YarnScaling, deepseek_v3_671b, load_config, tiny
from reference.linear import Numerics
from reference.weights import ModelWeights

SMALL = tiny(dim=512, inter_dim=1024, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
             n_routed_experts=64, n_expert_groups=8, n_limited_groups=4, n_activated_experts=6, n_shared_experts=1,
             q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             vocab_size=2048, max_seq_len=256, rope_scaling=YarnScaling(factor=40.0, original_seq_len=128),
             name="scale-small")
FULL_WIDTHS = deepseek_v3_671b().replace(n_layers=2, n_dense_layers=1, n_routed_experts=16, n_expert_groups=8,
                                         n_limited_groups=4, n_activated_experts=8, vocab_size=1024,
                                         max_seq_len=8192, n_mtp_layers=0, name="671b-widths")


def _prompt(config, batch: int, length: int, steps: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, length)), rng.integers(0, config.vocab_size, (batch, steps))


@pytest.mark.small
@pytest.mark.parametrize("dtype, policy", [("float32", "cross.float32"), ("bfloat16", "cross.bfloat16")])
def test_small_model_matches_reference(backend, dtype, policy):
    if backend == "reference" and dtype == "bfloat16":
        pytest.skip("the reference computes in float64 or float32")
    weights = build_weights(SMALL, seed=1, bias_mean=-2.0)
    prompt, following = _prompt(SMALL, batch=2, length=96)
    expect_same_run(f"{backend} {dtype} on {SMALL.name}", make_runner(backend, SMALL, weights, dtype=dtype),
                    make_runner("reference", SMALL, weights), prompt, following, policy)


@pytest.mark.small
def test_small_model_matches_the_oracle(backend):
    pytest.importorskip("transformers", reason="the PyTorch oracle needs the oracle extra")
    from conformance.oracle import OracleRunner

    weights = build_weights(SMALL, seed=2, bias_mean=-2.0)
    prompt, following = _prompt(SMALL, batch=2, length=96)
    expect_same_run(f"{backend} vs transformers on {SMALL.name}", make_runner(backend, SMALL, weights),
                    OracleRunner(SMALL, weights), prompt, following, "oracle.float32")


@pytest.mark.full
@pytest.mark.parametrize("gemm_impl, policy", [("bf16", "cross.float32"), ("fp8", "cross.fp8-path.float32")])
def test_released_widths_match_reference(backend, gemm_impl, policy):
    if backend == "reference":
        pytest.skip("compares a backend against the reference")
    weights = build_weights(FULL_WIDTHS, seed=3, bias_mean=-2.0)
    prompt, following = _prompt(FULL_WIDTHS, batch=1, length=16)
    numerics = Numerics(gemm_impl)
    expect_same_run(f"{backend} on {FULL_WIDTHS.name} ({gemm_impl} path)",
                    make_runner(backend, FULL_WIDTHS, weights, numerics), make_runner("reference", FULL_WIDTHS, weights,
                                                                                      numerics), prompt, following,
                    policy)


@pytest.mark.full
def test_real_checkpoint_layer(backend, request):
    """One layer of a real checkpoint (`--checkpoint PATH`, `--layer N`), vocabulary cut to its first 1024 rows."""
    path = request.config.getoption("--checkpoint")
    if not path:
        pytest.skip("give a checkpoint folder with --checkpoint PATH")
    if backend == "reference":
        pytest.skip("compares a backend against the reference")
    config = load_config(path)
    layer = request.config.getoption("--layer")
    layer = config.n_dense_layers if layer is None else layer
    vocab = min(1024, config.vocab_size)
    with open_checkpoint(path) as checkpoint:
        full = load_weights(checkpoint, config, layers=[layer], progress=True)
        weights = ModelWeights(embed=np.array(full.embed[:vocab]), layers=full.layers, norm=full.norm,
                               head=np.array(full.head[:vocab]))
        one_layer = dataclasses.replace(config, n_layers=1, n_dense_layers=int(not config.is_moe_layer(layer)),
                                        n_mtp_layers=0, vocab_size=vocab, name=f"{config.name} layer {layer}")
        prompt, following = _prompt(one_layer, batch=1, length=16)
        expect_same_run(f"{backend} on layer {layer} of {path}", make_runner(backend, one_layer, weights),
                        make_runner("reference", one_layer, weights), prompt, following, "cross.float32")
