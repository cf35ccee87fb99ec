"""The mlx-lm adapter (the `mlxlm` extra): the model mlx-lm builds holds the harness's weights where its own loader
(`sanitize`) puts them, its math is the official math where no recorded divergence applies, and its failure on the
official golden case is exactly its masked-group fill (conformance/golden/divergences.py, mlxlm-masked-groups-zero)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dsv3_conformance.format.weights import MoEWeights
from dsv3_conformance.golden.cases import GoldenCase, check_case
from dsv3_conformance.paths import GOLDEN_DIR

pytest.importorskip("mlx_lm", reason="the mlxlm extra")
from dsv3_conformance.adapters.mlxlm import MLXLM  # noqa: E402
from dsv3_conformance.adapters.mlxlm.runner import MLXRunner  # noqa: E402

ALLOW = ("hidden", "naive", "mtp")


def test_the_loaded_model_holds_the_weights_where_they_belong():
    case = GoldenCase.load(GOLDEN_DIR / "official" / "v3-tiny")
    config, weights = case.config, case.weights()
    layer = MLXRunner(config, weights).model.model.layers[1]
    moe = weights.layers[1].ffn
    np.testing.assert_array_equal(np.array(layer.mlp.switch_mlp.down_proj.weight[5]), moe.experts[5].down_proj.weight)
    np.testing.assert_array_equal(np.array(layer.mlp.gate.e_score_correction_bias), moe.gate.bias)
    kv_b = np.asarray(weights.layers[1].attn.kv_b_proj.weight).reshape(config.n_heads, -1, config.kv_lora_rank)
    np.testing.assert_array_equal(np.array(layer.self_attn.embed_q.weight),
                                  kv_b[:, : config.qk_nope_head_dim].transpose(0, 2, 1))


def test_without_expert_groups_mlx_lm_is_the_official_code_to_float32_rounding():
    """official/v3-tiny-mtp's main model routes over one group: every logits tensor within the float32 bound."""
    result = check_case(GoldenCase.load(GOLDEN_DIR / "official" / "v3-tiny-mtp"), MLXLM, allow=ALLOW)
    assert result.passed and max(r.rel_err for r in result.results if r.tolerance) < 1e-5, result.summary()


def test_the_official_case_fails_by_the_masked_group_fill_alone():
    """Adding one constant to every correction bias changes no official routing choice (every choice score and
    group score moves alike) but lifts every biased score above 0, where mlx-lm's 0.0 for masked experts can no
    longer win: with that shift mlx-lm passes the official case's own expected tensors, without it it fails."""
    case = GoldenCase.load(GOLDEN_DIR / "official" / "v3-tiny")
    weights = case.weights()
    assert not check_case(case, MLXLM, weights=weights, allow=ALLOW).passed
    shifted = replace(weights, layers=tuple(
        replace(layer, ffn=replace(layer.ffn, gate=replace(layer.ffn.gate, bias=layer.ffn.gate.bias + 2.0)))
        if isinstance(layer.ffn, MoEWeights) else layer for layer in weights.layers))
    result = check_case(case, MLXLM, weights=shifted, allow=ALLOW)
    assert result.passed, result.summary()
