"""Checkpoint layouts, round trips and every bad-input error, message included."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

from dsv3_conformance.format.checkpoint import (CheckpointError, hf_to_official, load_weights, official_to_hf,
                                                open_checkpoint, write_hf, write_official)
from dsv3_conformance.format.config import tiny, tiny_fp8
from dsv3_conformance.format.weights import expected_tensors
from dsv3_conformance.reference.synthetic import random_tensors

FLOAT = tiny(n_mtp_layers=1)
# Widths whose model-parallel halves stay aligned to 128x128 scale blocks.
FP8 = tiny_fp8(n_heads=8, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, inter_dim=256,
               n_shared_experts=2, n_mtp_layers=1)


def _bf16(tensors: dict) -> dict:
    """The same tensors with every float32 one stored as BF16, as released checkpoints store them."""
    return {name: t.astype(ml_dtypes.bfloat16) if t.dtype == np.float32 and not name.endswith("scale_inv") else t
            for name, t in tensors.items()}


@pytest.fixture(scope="module", params=["float", "fp8", "fp8+bf16"])
def model(request):
    config = FLOAT if request.param == "float" else FP8
    tensors = random_tensors(config, seed=3)
    return config, _bf16(tensors) if request.param.endswith("bf16") else tensors


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_layout_round_trip_is_bitwise(tmp_path, model, shards):
    config, tensors = model
    write_hf(tmp_path, tensors, config, shards=shards)
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.layout == ("hf" if shards == 1 else "hf-sharded")
        _same(checkpoint.read_all(), tensors)
        load_weights(checkpoint, config)


@pytest.mark.parametrize("mp", [1, 2])
def test_official_layout_round_trip_is_bitwise_without_mtp(tmp_path, model, mp):
    config, tensors = model
    write_official(tmp_path, tensors, config, mp=mp)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    main_model = {n: t for n, t in tensors.items() if not n.startswith(f"model.layers.{config.n_layers}.")}
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.layout == "official" and checkpoint.drops_mtp
        _same(checkpoint.read_all(), main_model)
        weights = load_weights(checkpoint, config)
    assert weights.mtp == ()


def test_official_files_split_and_place_tensors_as_spec_section_9(tmp_path):
    config, tensors = FLOAT, random_tensors(FLOAT, seed=1)
    write_official(tmp_path, tensors, config, mp=2)
    from dsv3_conformance.format.safetensors_io import SafetensorsFile

    first, second = (SafetensorsFile(tmp_path / f"model{i}-mp2.safetensors") for i in range(2))
    assert first.tensors["embed.weight"].shape == (config.vocab_size // 2, config.dim)
    assert first.tensors["layers.0.attn.wo.weight"].shape == (config.dim, config.n_heads * config.v_head_dim // 2)
    assert first.tensors["layers.0.attn.wkv_a.weight"].shape == (config.kv_lora_rank + config.qk_rope_head_dim,
                                                                  config.dim)
    assert "layers.1.ffn.experts.0.w1.weight" in first and "layers.1.ffn.experts.0.w1.weight" not in second
    assert "layers.1.ffn.experts.7.w1.weight" in second and "layers.1.ffn.gate.bias" in second
    assert not any(name.startswith(f"layers.{config.n_layers}.") for name in first.keys())


@pytest.mark.parametrize("hf, official", [
    ("model.embed_tokens.weight", "embed.weight"), ("lm_head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight"),
    ("model.layers.2.self_attn.q_proj.weight", "layers.2.attn.wq.weight"),
    ("model.layers.2.self_attn.q_a_proj.weight_scale_inv", "layers.2.attn.wq_a.scale"),
    ("model.layers.2.self_attn.q_a_layernorm.weight", "layers.2.attn.q_norm.weight"),
    ("model.layers.2.self_attn.q_b_proj.weight", "layers.2.attn.wq_b.weight"),
    ("model.layers.2.self_attn.kv_a_proj_with_mqa.weight", "layers.2.attn.wkv_a.weight"),
    ("model.layers.2.self_attn.kv_a_layernorm.weight", "layers.2.attn.kv_norm.weight"),
    ("model.layers.2.self_attn.kv_b_proj.weight", "layers.2.attn.wkv_b.weight"),
    ("model.layers.2.self_attn.o_proj.weight", "layers.2.attn.wo.weight"),
    ("model.layers.3.mlp.gate.weight", "layers.3.ffn.gate.weight"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "layers.3.ffn.gate.bias"),
    ("model.layers.3.mlp.experts.17.gate_proj.weight", "layers.3.ffn.experts.17.w1.weight"),
    ("model.layers.3.mlp.experts.17.down_proj.weight_scale_inv", "layers.3.ffn.experts.17.w2.scale"),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", "layers.3.ffn.shared_experts.w3.weight"),
])
def test_name_mapping_of_spec_section_9(hf, official):
    assert hf_to_official(hf) == official
    assert official_to_hf(official) == hf


def test_loading_one_layer_reads_only_that_layer(tmp_path):
    config, tensors = FLOAT, random_tensors(FLOAT, seed=2)
    others = {n: t for n, t in tensors.items() if not n.startswith("model.layers.0.")}
    write_hf(tmp_path, others, config)
    with open_checkpoint(tmp_path) as checkpoint:
        weights = load_weights(checkpoint, config, layers=[1])
        assert len(weights.layers) == 1
        assert not checkpoint.get("lm_head.weight").flags.owndata  # a view of the memory map
        with pytest.raises(CheckpointError, match="missing 12 tensor"):
            load_weights(checkpoint, config)


# --- every bad input, with its message --------------------------------------------------------------------

def _write(tmp_path, config, tensors):
    write_hf(tmp_path, tensors, config)
    return open_checkpoint(tmp_path)


def _error(tmp_path, config, tensors) -> str:
    with pytest.raises(CheckpointError) as caught:
        with _write(tmp_path, config, tensors) as checkpoint:
            load_weights(checkpoint, config)
    return str(caught.value)


def test_missing_tensor(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert "missing 1 tensor(s) the config needs: 'model.layers.1.mlp.experts.3.up_proj.weight'" in _error(
        tmp_path, FLOAT, tensors)


def test_a_checkpoint_without_mtp_tensors_loads_without_mtp(tmp_path):
    """transformers saves no MTP tensors: the model loads without its MTP module."""
    assert FLOAT.n_mtp_layers > 0
    with _write(tmp_path, FLOAT, random_tensors(FLOAT, seed=0, include_mtp=False)) as checkpoint:
        assert load_weights(checkpoint, FLOAT).mtp == ()


def test_a_partial_mtp_module_is_missing_tensors(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    prefix = f"model.layers.{FLOAT.n_layers}."
    for name in [name for name in tensors if name.startswith(prefix)][1:]:
        del tensors[name]
    assert "set num_nextn_predict_layers to 0" in _error(tmp_path, FLOAT, tensors)


def test_unexpected_tensor(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    message = _error(tmp_path, FLOAT, tensors)
    assert "unexpected tensor(s) the config does not describe: 'model.layers.0.self_attn.rotary_emb.inv_freq'" in message
    assert "(in model.safetensors)" in message


def test_wrong_shape(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = np.ones((5, 16), np.float32)
    assert re.search(r"tensor 'model.layers.0.self_attn.kv_b_proj.weight' in .*model.safetensors: wrong shape, "
                     r"expected \[128, 16\], found \[5, 16\]", _error(tmp_path, FLOAT, tensors))


def test_wrong_dtype(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int64)
    assert "'model.norm.weight' in" in (message := _error(tmp_path, FLOAT, tensors))
    assert "wrong dtype, expected BF16 or F16 or F32 or F64, found I64" in message


def test_fp8_weight_stored_as_float(tmp_path):
    tensors = random_tensors(FP8, seed=0)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].astype(np.float32)
    assert f"'{name}' in" in (message := _error(tmp_path, FP8, tensors))
    assert "wrong dtype, expected F8_E4M3, found F32" in message


def test_scale_shape_not_matching_its_weight(tmp_path):
    tensors = random_tensors(FP8, seed=0)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    tensors[name] = np.ones((1, 2), np.float32)
    message = _error(tmp_path, FP8, tensors)
    assert f"'{name}'" in message and "wrong shape, expected [2, 2], found [1, 2]" in message
    assert "ceil(out/128) x ceil(in/128)" in message


def test_scale_dtype(tmp_path):
    tensors = random_tensors(FP8, seed=0)
    name = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"
    tensors[name] = tensors[name].astype(ml_dtypes.bfloat16)
    assert "wrong dtype, expected F32, found BF16" in _error(tmp_path, FP8, tensors)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight(tmp_path, bad):
    tensors = random_tensors(FLOAT, seed=0)
    tensors["model.layers.1.mlp.gate.weight"][2, 3] = bad
    assert "'model.layers.1.mlp.gate.weight' in" in (message := _error(tmp_path, FLOAT, tensors))
    assert "1 NaN or Inf value(s) in a weight" in message


def test_nonfinite_scale(tmp_path):
    tensors = random_tensors(FP8, seed=0)
    tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"][0, 1] = np.inf
    assert "'model.layers.0.mlp.gate_proj.weight_scale_inv'" in (message := _error(tmp_path, FP8, tensors))
    assert "NaN or Inf value(s) in a scale" in message


def test_nan_bit_pattern_in_fp8_weight(tmp_path):
    tensors = random_tensors(FP8, seed=0)
    name = "model.layers.0.self_attn.o_proj.weight"
    weight = tensors[name].copy()
    weight.view(np.uint8)[0, :3] = 0xFF  # e4m3fn NaN
    tensors[name] = weight
    assert f"'{name}'" in (message := _error(tmp_path, FP8, tensors)) and "3 NaN or Inf value(s)" in message


def test_truncated_file(tmp_path):
    tensors = random_tensors(FLOAT, seed=0)
    write_hf(tmp_path, tensors, FLOAT)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' needs data bytes up to"):
        open_checkpoint(tmp_path)


def test_corrupt_header(tmp_path):
    write_hf(tmp_path, random_tensors(FLOAT, seed=0), FLOAT)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt header, not valid JSON"):
        open_checkpoint(tmp_path)


def test_index_entry_pointing_to_a_missing_shard(tmp_path):
    write_hf(tmp_path, random_tensors(FLOAT, seed=0), FLOAT, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: tensor '.*' points to shard "
                                              r"'model-00002-of-00002.safetensors', which does not exist"):
        open_checkpoint(tmp_path)


def test_index_entry_not_in_its_shard(tmp_path):
    write_hf(tmp_path, random_tensors(FLOAT, seed=0), FLOAT, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor 'model.extra.weight' is indexed in "
                                              "'model-00001-of-00002.safetensors', which does not hold it"):
        open_checkpoint(tmp_path)


def test_missing_official_file(tmp_path):
    write_official(tmp_path, random_tensors(FLOAT, seed=0), FLOAT, mp=2)
    (tmp_path / "model1-mp2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="official layout with mp=2 lacks model1-mp2.safetensors"):
        open_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "weights-1.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found weights-1.safetensors without an index"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        open_checkpoint(tmp_path / "nowhere")


def test_unaligned_fp8_split_is_refused(tmp_path):
    config = tiny_fp8()
    with pytest.raises(CheckpointError, match="would cut its 128x128 scale blocks"):
        write_official(tmp_path, random_tensors(config, seed=0), config, mp=2)


def test_expected_tensor_count_of_the_671b_model():
    """Counted from the structure in SEMANTICS.md sections 1 and 4: 61 layers (3 dense) + 1 MTP module, fp8 scales."""
    from dsv3_conformance.format.config import deepseek_v3_671b

    specs = expected_tensors(deepseek_v3_671b())
    attention = 2 * 5 + 2  # q_a, q_b, kv_a, kv_b, o (weight + scale each), q_a and kv_a norms
    dense = 2 + attention + 2 * 3  # two norms, attention, three ffn projections with scales
    moe = 2 + attention + 2 + 2 * 3 * 257  # gate weight and bias, 256 routed + 1 shared expert
    mtp = moe + 6  # enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens
    assert len(specs) == 3 + 3 * dense + 58 * moe + mtp


@pytest.mark.parametrize("content, message", [("{", "not valid JSON"), ('{"metadata": {}}', "has no weight_map object")])
def test_malformed_index(tmp_path, content, message):
    write_hf(tmp_path, random_tensors(FLOAT, seed=0), FLOAT, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: .*{message}"):
        open_checkpoint(tmp_path)


def test_an_mtp_embedding_that_differs_from_the_main_one_is_refused(tmp_path):
    """The MTP module shares the main embedding and head; the checkpoint's copies must equal them."""
    config = FLOAT.replace(n_mtp_layers=1)
    tensors = random_tensors(config, seed=0)
    name = f"model.layers.{config.n_layers}.shared_head.head.weight"
    tensors[name] = tensors[name] + 1
    assert f"tensor '{name}' differs from 'lm_head.weight'" in _error(tmp_path, config, tensors)
