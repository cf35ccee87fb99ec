"""The llama.cpp adapter (the `llamacpp` extra): the GGUF file says what the official semantics say, and
llama.cpp run on it is judged by the golden cases like any backend.

The layout tests read the file back with the gguf package's reader and compare it with the config and weights
(not with llama.cpp's converter). The golden tests run llama.cpp itself; what it does not give (block outputs, the
naive attention form) is allowed to be missing and named.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.format.config import tiny
from dsv3_conformance.golden.cases import GoldenCase
from dsv3_conformance.paths import GOLDEN_DIR

gguf = pytest.importorskip("gguf", reason="the llamacpp extra")
from dsv3_conformance.adapters.llamacpp import gguf_file  # noqa: E402

V3_TINY = GOLDEN_DIR / "official" / "v3-tiny"


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    case = GoldenCase.load(V3_TINY)
    path = gguf_file.write(tmp_path_factory.mktemp("gguf") / "model.gguf", case.config, case.weights(), "f32")
    return case, *_read(path)


def test_the_metadata_carries_every_field_that_changes_the_model(written):
    case, fields, _ = written
    config = case.config
    expected = {"general.architecture": "deepseek2", "deepseek2.block_count": config.n_layers,
                "deepseek2.embedding_length": config.dim, "deepseek2.attention.head_count": config.n_heads,
                "deepseek2.attention.head_count_kv": 1, "deepseek2.rope.dimension_count": config.qk_rope_head_dim,
                "deepseek2.attention.key_length_mla": config.qk_nope_head_dim + config.qk_rope_head_dim,
                "deepseek2.attention.value_length_mla": config.v_head_dim,
                "deepseek2.attention.q_lora_rank": config.q_lora_rank,
                "deepseek2.attention.kv_lora_rank": config.kv_lora_rank,
                "deepseek2.leading_dense_block_count": config.n_dense_layers,
                "deepseek2.expert_count": config.n_routed_experts,
                "deepseek2.expert_used_count": config.n_activated_experts,
                "deepseek2.expert_group_count": config.n_expert_groups,
                "deepseek2.expert_group_used_count": config.n_limited_groups,
                "deepseek2.expert_weights_norm": True, "deepseek2.expert_gating_func": 2,
                "deepseek2.rope.scaling.type": "yarn",
                "deepseek2.rope.scaling.original_context_length": config.rope_scaling.original_seq_len,
                "tokenizer.ggml.model": "none", "deepseek2.vocab_size": config.vocab_size}
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(config.route_scale)
    assert fields["deepseek2.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields["deepseek2.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * config.rope_scaling.mscale)


def test_the_absorbed_attention_weights_rebuild_kv_b(written):
    """attn_k_b [heads, kv_lora, nope] and attn_v_b [heads, v, kv_lora] are kv_b_proj's two halves per head."""
    case, _, tensors = written
    config, kv_b = case.config, case.weights().layers[1].attn.kv_b_proj.weight
    k_b = np.asarray(tensors["blk.1.attn_k_b.weight"].data).reshape(config.n_heads, config.kv_lora_rank,
                                                                     config.qk_nope_head_dim)
    v_b = np.asarray(tensors["blk.1.attn_v_b.weight"].data).reshape(config.n_heads, config.v_head_dim,
                                                                     config.kv_lora_rank)
    rebuilt = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(kv_b.shape)
    np.testing.assert_array_equal(rebuilt, np.asarray(kv_b, np.float32))


def test_the_experts_are_stacked_and_the_router_keeps_float32(written):
    case, _, tensors = written
    moe = case.weights().layers[1].ffn
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert tuple(int(n) for n in gate.shape) == (case.config.dim, case.config.moe_inter_dim,
                                                 case.config.n_routed_experts)  # ggml order
    np.testing.assert_array_equal(np.asarray(gate.data)[3], np.asarray(moe.experts[3].gate_proj.weight, np.float32))
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.exp_probs_b.bias"].data), moe.gate.bias)


@pytest.mark.parametrize("n_group, topk_group, written_count", [(4, 2, 4), (4, 4, None), (1, 1, None)])
def test_a_group_limit_is_written_only_where_it_limits(tmp_path, n_group, topk_group, written_count):
    """topk_group == n_group keeps every group: nothing is written (llama.cpp asserts topk_group < n_group)."""
    from dsv3_conformance.format.weights import assemble

    config = tiny(n_expert_groups=n_group, n_limited_groups=topk_group)
    rng = np.random.default_rng(0)
    weights = assemble(lambda spec: rng.standard_normal(spec.shape).astype(np.float32) / 8, config)
    fields, _ = _read(gguf_file.write(tmp_path / "m.gguf", config, weights, "f32"))
    assert fields.get("deepseek2.expert_group_count") == written_count


llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra")


def test_llama_cpp_in_float32_with_a_float32_cache_passes_the_official_golden_case(capsys):
    assert main(["check-golden", str(V3_TINY), "--backend", "llamacpp-f32-exact", "--allow-missing",
                 "hidden,naive"]) == 0
    out = capsys.readouterr().out
    assert "4 allowed missing (hidden, naive)" in out and "tokens.decoded" in out


def test_llama_cpp_s_default_f16_cache_is_what_moves_its_float32_logits(tmp_path):
    """As its users run it (an f16 KV cache) llama.cpp misses the float32 bound that the same file passes with a
    float32 cache: the difference is the cache setting, and the greedy tokens stay the same."""
    out = tmp_path / "default.json"
    assert main(["check-golden", str(V3_TINY), "--backend", "llamacpp-f32", "--allow-missing", "hidden,naive",
                 "--json", str(out)]) == 1
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert results["tokens.decoded"]["passed"]
    assert 1e-5 < max(r["rel_err"] for name, r in results.items() if "logits" in name) < 1e-2


@pytest.mark.parametrize("backend", ["llamacpp-f16", "llamacpp-bf16", "llamacpp-q8_0", "llamacpp-q4_k_m",
                                     "llamacpp-iq4_nl"])
def test_quantized_files_pass_their_quantization_policy_on_the_official_cases(backend, capsys):
    """Every logits row of the official float32 and bfloat16 cases, pooled, as next-token distributions under the
    type's policy (TOLERANCES.md section 12); greedy tokens are left to the policy's top-1 share."""
    for case in ("v3-tiny", "v3-tiny-bf16"):
        assert main(["check-golden", str(GOLDEN_DIR / "official" / case), "--backend", backend,
                     "--allow-missing", "hidden,naive"]) == 0, capsys.readouterr().out[-2000:]
        assert "top-1" in capsys.readouterr().out


def test_the_quantizer_s_file_holds_the_type_it_is_named_for_and_reads_back():
    """On rows of 256 (quantization:long-prompts' model) llama.cpp's Q4_K_M mixture is mostly Q4_K; an f32 file read
    back gives the reference the very weights it was written from (the same logits, to the last bit)."""
    from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner
    from dsv3_conformance.backends import REFERENCE
    from dsv3_conformance.checks.quantization import rows_of_256
    from dsv3_conformance.checks.strategies import build_weights

    config = rows_of_256()
    weights = build_weights(config, 5)
    quantized, f32 = LlamaCppRunner(config, weights, "q4_k_m"), LlamaCppRunner(config, weights, "f32")
    types = gguf_file.tensor_types(quantized.path)
    assert types.get("Q4_K", 0) > sum(count for name, count in types.items() if name not in ("Q4_K", "F32"))
    read = gguf_file.read_weights(f32.path, config, weights)
    tokens = np.arange(12)[None] * 7 % config.vocab_size
    np.testing.assert_array_equal(REFERENCE.make_runner(config, read, dtype="float64").prefill(tokens).logits,
                                  REFERENCE.make_runner(config, weights, dtype="float64").prefill(tokens).logits)


def test_the_long_prompt_check_tells_the_types_apart():
    """Q4_K_M passes its own policy on the longer prompt set and fails q8_0's: the policy sees a type's loss."""
    from dataclasses import replace

    from dsv3_conformance.adapters.llamacpp import Q4_K_M
    from dsv3_conformance.checks.quantization import long_prompt_comparison

    assert long_prompt_comparison(Q4_K_M).passed
    assert not long_prompt_comparison(replace(Q4_K_M, quantization="q8_0")).passed


def test_a_model_llama_cpp_cannot_load_is_declared_not_compared(tmp_path, capsys):
    """A query-compressed model of 27 layers (llamacpp-lite-by-depth): the adapter declares it Unsupported (part
    "config"), and llama.cpp does refuse the file, its reason in the error."""
    from dsv3_conformance.format.weights import assemble

    config = tiny(n_layers=27)
    rng = np.random.default_rng(0)
    weights = assemble(lambda spec: rng.standard_normal(spec.shape).astype(np.float32) / 8, config)
    from dsv3_conformance.adapters.llamacpp import F32_EXACT
    from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner
    from dsv3_conformance.backends import Unsupported

    with pytest.raises(Unsupported, match="llamacpp-lite-by-depth") as declared:
        F32_EXACT.make_runner(config, weights)
    assert declared.value.part == "config"
    with pytest.raises(RuntimeError, match="llama.cpp refused .*attn_q.weight' not found"):
        LlamaCppRunner(config, weights, "f32", "exact", refuse_known=False).prefill(np.zeros((1, 4), np.int64))
