"""A synthetic checkpoint in the released layout, at any width, written shard by shard.

The layout is that of the Hugging Face release: `config.json` with its `quantization_config`, shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, every linear weight of attention,
dense FFN and experts in e4m3 with float32 `weight_scale_inv` blocks of 128 x 128, the other tensors in
bfloat16 (the correction bias in float32), and the MTP module stored as layer `num_hidden_layers` with its
own copies of the embedding and the output head. Tensors are assigned to shards in name order under a
byte budget; each shard is written one tensor at a time (conformance.format.safetensors_io
.write_safetensors_streamed), so generation never holds more than one tensor in memory.

Values are random but well-scaled and deterministic per (seed, tensor name): e4m3 codes with random sign,
mantissa and one of four exponents (magnitudes 4 to 60) times block scales around 1/(30 sqrt(in)), so a
weight has a standard deviation near 1/sqrt(in); norms near 1; the embedding and head at 0.02.

`full_scale_config()` is the released 671B config with fewer layers (3 dense, 1 MoE, the MTP module);
`ci_scale_config()` the same layout at small widths and with fewer experts.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.format.checkpoint import HF_INDEX
from dsv3_conformance.format.config import ModelConfig, deepseek_v3_671b, to_hf_dict
from dsv3_conformance.format.fp8 import BLOCK
from dsv3_conformance.format.safetensors_io import write_safetensors_streamed
from dsv3_conformance.format.weights import TensorSpec, expected_tensors

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.dtype(np.float32)


def full_scale_config(moe_layers: int = 1) -> ModelConfig:
    """The released widths (hidden 7168, 128 heads, 256 experts, vocabulary 129280): 3 dense layers, then
    `moe_layers` MoE layers, then the MTP module."""
    return deepseek_v3_671b().replace(n_layers=3 + moe_layers, name=f"synthetic-671b-{3 + moe_layers}-layers")


def ci_scale_config() -> ModelConfig:
    """The same layout small enough for CI: widths that keep 128 x 128 blocks (partial blocks included),
    16 experts in 8 groups, top-4 of 8 groups, k = 8."""
    return deepseek_v3_671b().replace(
        vocab_size=1000, dim=512, inter_dim=1024, moe_inter_dim=192, n_layers=4, n_dense_layers=3, n_heads=4,
        n_routed_experts=16, n_expert_groups=8, n_limited_groups=4, n_activated_experts=8, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256,
        rope_scaling=None, name="synthetic-ci")


def dtype_of(spec: TensorSpec) -> np.dtype:
    if spec.role == "fp8":
        return E4M3
    if spec.role == "scale" or spec.name.endswith("e_score_correction_bias"):
        return F32
    return BF16


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def make_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """The tensor of `spec`, deterministic in (seed, name)."""
    rng = _rng(seed, spec.name)
    if spec.role == "fp8":
        sign = rng.integers(0, 2, spec.shape, np.uint8) << 7
        exponent = (rng.integers(9, 13, spec.shape, np.uint8)) << 3  # 2^(e-7): 4 .. 60 with the mantissa
        return (sign | exponent | rng.integers(0, 8, spec.shape, np.uint8)).view(E4M3)
    if spec.role == "scale":
        fan_in = spec.shape[1] * BLOCK
        return (rng.uniform(0.5, 1.5, spec.shape) / (30.0 * np.sqrt(fan_in))).astype(F32)
    name = spec.name
    if name.endswith("e_score_correction_bias"):
        return rng.normal(-0.2, 0.5, spec.shape).astype(F32)
    if name.endswith(("norm.weight", "layernorm.weight", "enorm.weight", "hnorm.weight")):
        return (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(BF16)
    if name.endswith(("embed_tokens.weight", "head.weight")) and len(spec.shape) == 2 and "eh_proj" not in name:
        return (0.02 * rng.standard_normal(spec.shape, np.float32)).astype(BF16)
    return (rng.standard_normal(spec.shape, np.float32) / np.sqrt(spec.shape[-1])).astype(BF16)


def _shared_copy(name: str, config: ModelConfig) -> str | None:
    """The main-model tensor an MTP copy must equal (embedding, output head)."""
    if name.startswith(f"model.layers.{config.n_layers}."):
        if name.endswith(".embed_tokens.weight"):
            return "model.embed_tokens.weight"
        if name.endswith(".shared_head.head.weight"):
            return "lm_head.weight"
    return None


def shard_plan(specs: dict[str, TensorSpec], budget_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in name order, each shard at most `budget_bytes` (a larger tensor alone)."""
    shards, current, used = [], [], 0
    for name in sorted(specs):
        spec = specs[name]
        size = int(np.prod(spec.shape, dtype=np.int64)) * dtype_of(spec).itemsize
        if current and used + size > budget_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + ([current] if current else [])


def write_synthetic(folder: str | Path, config: ModelConfig, seed: int = 0, shard_bytes: int = 1 << 30) -> Path:
    """Write the synthetic checkpoint of `config` into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_hf_dict(config), indent=2))
    specs = expected_tensors(config)
    plan = shard_plan(specs, shard_bytes)
    weight_map, total = {}, 0

    def produce(name: str) -> np.ndarray:
        return make_tensor(specs[_shared_copy(name, config) or name], seed)

    for index, names in enumerate(tqdm(plan, desc=f"writing {folder.name}", unit="shard")):
        file = f"model-{index + 1:05d}-of-{len(plan):05d}.safetensors"
        layout = {name: (dtype_of(specs[name]), specs[name].shape) for name in names}
        total += write_safetensors_streamed(folder / file, layout, produce, {"format": "pt"})
        weight_map.update({name: file for name in names})
    (folder / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder
