"""A DeepSeek-V3 model as a GGUF file for llama.cpp's `deepseek2` architecture, written from the official semantics
of each config field (SEMANTICS.md) with the `gguf` package's format definitions (key and tensor names), not from
llama.cpp's converter.

Layout: MLA in its absorbed form (llama.cpp's `attn_k_b` [heads, kv_lora_rank, qk_nope] and `attn_v_b` [heads,
v_head_dim, kv_lora_rank], split from kv_b_proj); one kv head of kv_lora_rank + qk_rope_head_dim; routed experts
stacked [experts, out, in]; the router, every norm and the correction bias in float32. No tokenizer: the vocabulary is
`none`, of vocab_size dummy tokens (the harness feeds token ids). fp8 weights are dequantized with their 128x128
block scales first. Types: f32, f16, bf16 and q8_0 (q8_0 where a row is a multiple of 32 values, the router and
attn_k_b excepted, as llama.cpp's own quantizer keeps them); the others come from llama.cpp's quantizer (runner.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import FFNWeights, LayerWeights, LinearWeight, ModelWeights, MoEWeights
from dsv3_conformance.adapters.weights import dense

TYPES = ("f32", "f16", "bf16", "q8_0")
# Types made by llama.cpp's own quantizer from the f32 file, by their llama_ftype (llama.h). On rows that are not a
# multiple of a type's block (256 for k-quants) the quantizer falls back to another type (`tensor_types` tells).
QUANTIZER_TYPES = {"q4_k_m": 15, "iq4_nl": 25}


def _metadata(writer, config: ModelConfig) -> None:
    import gguf

    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("none")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.inter_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(1)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # Written even when 0 (no query compression): llama.cpp requires the key unless the depth is one of its "lite"
    # models' (27, 26 or 48 layers), and for those it ignores it.
    writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_leading_dense_block_count(config.n_dense_layers)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.n_activated_experts)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_feed_forward_length(config.moe_inter_dim)
    writer.add_expert_weights_scale(config.route_scale)
    # The official gate renormalizes the chosen weights for sigmoid scores only.
    writer.add_expert_weights_norm(config.score_func == "sigmoid")
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if config.score_func == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    # A group limit that keeps every group limits nothing; llama.cpp asserts topk_group < n_group when it is set.
    if config.n_expert_groups > 1 and config.n_limited_groups < config.n_expert_groups:
        writer.add_expert_group_count(config.n_expert_groups)
        writer.add_expert_group_used_count(config.n_limited_groups)
    yarn = config.rope_scaling
    if yarn is not None and config.max_seq_len > yarn.original_seq_len:
        # The official code extends RoPE only when max_seq_len exceeds the original length; its attention scale
        # is (0.1 * mscale * ln(factor) + 1)^2, which llama.cpp reads from yarn_log_multiplier (stored times 0.1).
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn.factor)
        writer.add_rope_scaling_orig_ctx_len(yarn.original_seq_len)
        writer.add_rope_scaling_yarn_log_mul(0.1 * yarn.mscale)
        writer.add_rope_scaling_yarn_beta_fast(yarn.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(yarn.beta_slow)


def _tensors(config: ModelConfig, weights: ModelWeights) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in numpy order (the reverse of ggml's ne)."""
    out = {"token_embd.weight": weights.embed, "output_norm.weight": weights.norm, "output.weight": weights.head}
    for index, layer in enumerate(weights.layers):
        out.update({f"blk.{index}.{name}": array for name, array in _layer(config, layer).items()})
    return {name: np.ascontiguousarray(np.asarray(array, np.float32)) for name, array in out.items()}


def _layer(config: ModelConfig, layer: LayerWeights) -> dict[str, np.ndarray]:
    attn = layer.attn
    out = {"attn_norm.weight": layer.attn_norm, "ffn_norm.weight": layer.ffn_norm,
           "attn_kv_a_mqa.weight": dense(attn.kv_a_proj), "attn_kv_a_norm.weight": attn.kv_a_norm,
           "attn_output.weight": dense(attn.o_proj)}
    if attn.q_proj is not None:
        out["attn_q.weight"] = dense(attn.q_proj)
    else:
        out.update({"attn_q_a.weight": dense(attn.q_a_proj), "attn_q_a_norm.weight": attn.q_a_norm,
                    "attn_q_b.weight": dense(attn.q_b_proj)})
    kv_b = dense(attn.kv_b_proj).reshape(config.n_heads, config.qk_nope_head_dim + config.v_head_dim,
                                         config.kv_lora_rank)
    out["attn_k_b.weight"] = kv_b[:, : config.qk_nope_head_dim].transpose(0, 2, 1)
    out["attn_v_b.weight"] = kv_b[:, config.qk_nope_head_dim:]
    if isinstance(layer.ffn, FFNWeights):
        out.update(_ffn(layer.ffn, ""))
        return out
    moe: MoEWeights = layer.ffn
    out["ffn_gate_inp.weight"] = moe.gate.weight
    if moe.gate.bias is not None:
        out["exp_probs_b.bias"] = moe.gate.bias
    for part in ("gate", "up", "down"):
        out[f"ffn_{part}_exps.weight"] = np.stack([dense(getattr(expert, f"{part}_proj")) for expert in moe.experts])
    if moe.shared is not None:
        out.update(_ffn(moe.shared, "_shexp"))
    return out


def _ffn(ffn: FFNWeights, suffix: str) -> dict[str, np.ndarray]:
    return {f"ffn_{part}{suffix}.weight": dense(getattr(ffn, f"{part}_proj")) for part in ("gate", "up", "down")}


def _stored(name: str, array: np.ndarray, kind: str):
    """(data, raw ggml type or None) of one tensor in file type `kind`."""
    import gguf

    kept_f32 = array.ndim == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias"))
    if kind == "f32" or kept_f32:
        return array, None
    if kind == "f16":
        return array.astype(np.float16), None
    if kind == "q8_0" and array.shape[-1] % 32 == 0 and not name.endswith("attn_k_b.weight"):
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if kind in ("bf16", "q8_0"):
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    raise ValueError(f"GGUF type {kind!r}: expected one of {TYPES}")


def write(path: Path, config: ModelConfig, weights: ModelWeights, kind: str = "f32") -> Path:
    """Write the model to `path` as a GGUF file of type `kind`."""
    import gguf

    if weights.mtp:
        weights = weights.__class__(weights.embed, weights.layers, weights.norm, weights.head)
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_name(config.name or "dsv3-conformance model")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    _metadata(writer, config)
    for name, array in _tensors(config, weights).items():
        data, raw = _stored(name, array, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds (read back with the gguf package)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def read_weights(path: Path, config: ModelConfig, template: ModelWeights) -> ModelWeights:
    """The weights a GGUF file written from `template` holds, dequantized by the gguf package (float32): what a
    quantized file makes of the model, for the reference to run (the inverse of `_tensors`)."""
    import gguf

    values = {tensor.name: np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
              .reshape(tuple(int(n) for n in reversed(tensor.shape))) for tensor in gguf.GGUFReader(str(path)).tensors}

    def linear(name: str) -> LinearWeight:
        return LinearWeight(values[name])

    def ffn(prefix: str, suffix: str) -> FFNWeights:
        return FFNWeights(*(linear(f"{prefix}ffn_{part}{suffix}.weight") for part in ("gate", "up", "down")))

    layers = []
    for index, layer in enumerate(template.layers):
        at = f"blk.{index}."
        kv_b = np.concatenate([values[at + "attn_k_b.weight"].transpose(0, 2, 1), values[at + "attn_v_b.weight"]],
                              axis=1).reshape(-1, config.kv_lora_rank)
        attn = replace(layer.attn, kv_a_proj=linear(at + "attn_kv_a_mqa.weight"), kv_b_proj=LinearWeight(kv_b),
                       kv_a_norm=values[at + "attn_kv_a_norm.weight"], o_proj=linear(at + "attn_output.weight"))
        if layer.attn.q_proj is not None:
            attn = replace(attn, q_proj=linear(at + "attn_q.weight"))
        else:
            attn = replace(attn, q_a_proj=linear(at + "attn_q_a.weight"), q_a_norm=values[at + "attn_q_a_norm.weight"],
                           q_b_proj=linear(at + "attn_q_b.weight"))
        if isinstance(layer.ffn, FFNWeights):
            feed = ffn(at, "")
        else:
            experts = tuple(FFNWeights(*(LinearWeight(values[f"{at}ffn_{part}_exps.weight"][e])
                                         for part in ("gate", "up", "down"))) for e in range(config.n_routed_experts))
            gate = replace(layer.ffn.gate, weight=values[at + "ffn_gate_inp.weight"])
            feed = replace(layer.ffn, gate=gate, experts=experts,
                           shared=ffn(at, "_shexp") if layer.ffn.shared is not None else None)
        layers.append(replace(layer, attn_norm=values[at + "attn_norm.weight"], attn=attn,
                              ffn_norm=values[at + "ffn_norm.weight"], ffn=feed))
    return ModelWeights(values["token_embd.weight"], tuple(layers), values["output_norm.weight"],
                        values["output.weight"])
