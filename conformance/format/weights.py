"""The model's tensors: their Hugging Face names and shapes, and the typed tree the forward pass reads.

`assemble` is the single description of which tensors a config needs. It builds the tree by asking a
`fetch` function for each `TensorSpec`; `expected_tensors` runs it with a recorder to list them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Literal, Sequence

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.fp8 import scale_shape

Role = Literal["float", "fp8", "scale"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a config needs: HF name, shape, and role (float, e4m3 weight, or its float32 scale)."""

    name: str
    shape: tuple[int, ...]
    role: Role = "float"


Fetch = Callable[[TensorSpec], np.ndarray]


@dataclass(frozen=True)
class LinearWeight:
    """A [out, in] projection; e4m3 `weight` with its block `scale_inv` when quantized."""

    weight: np.ndarray
    scale_inv: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.scale_inv is not None


@dataclass(frozen=True)
class AttentionWeights:
    q_proj: LinearWeight | None  # only without query compression (q_lora_rank 0)
    q_a_proj: LinearWeight | None
    q_a_norm: np.ndarray | None
    q_b_proj: LinearWeight | None
    kv_a_proj: LinearWeight
    kv_a_norm: np.ndarray
    kv_b_proj: LinearWeight
    o_proj: LinearWeight


@dataclass(frozen=True)
class FFNWeights:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); official names w1, w3, w2."""

    gate_proj: LinearWeight
    up_proj: LinearWeight
    down_proj: LinearWeight


@dataclass(frozen=True)
class GateWeights:
    weight: np.ndarray  # [n_routed_experts, dim]
    bias: np.ndarray | None  # e_score_correction_bias, used for choosing only


class ExpertNotResident(RuntimeError):
    """A token routed to a routed expert whose weights were not loaded (a partially resident layer)."""


@dataclass(frozen=True)
class MoEWeights:
    gate: GateWeights
    # One entry per routed expert; None for an expert not loaded (only the experts a batch routes to are
    # resident when a layer of a real checkpoint is verified): routing a token to one is an error.
    experts: tuple[FFNWeights | None, ...]
    shared: FFNWeights | None


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray
    attn: AttentionWeights
    ffn_norm: np.ndarray
    ffn: FFNWeights | MoEWeights


@dataclass(frozen=True)
class MTPWeights:
    """One multi-token-prediction module (SEMANTICS.md section 4): stored as layer n_layers + k."""

    enorm: np.ndarray
    hnorm: np.ndarray
    eh_proj: LinearWeight
    block: LayerWeights
    head_norm: np.ndarray
    embed: np.ndarray
    head: np.ndarray


@dataclass(frozen=True)
class ModelWeights:
    embed: np.ndarray
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray
    head: np.ndarray
    mtp: tuple[MTPWeights, ...] = ()


def _linear(fetch: Fetch, config: ModelConfig, name: str, out_features: int, in_features: int,
            quantizable: bool = True) -> LinearWeight:
    if quantizable and config.fp8_weights:
        shape = (out_features, in_features)
        return LinearWeight(fetch(TensorSpec(f"{name}.weight", shape, "fp8")),
                            fetch(TensorSpec(f"{name}.weight_scale_inv", scale_shape(shape), "scale")))
    return LinearWeight(fetch(TensorSpec(f"{name}.weight", (out_features, in_features))))


def _vector(fetch: Fetch, name: str, size: int) -> np.ndarray:
    return fetch(TensorSpec(name, (size,)))


def _attention(fetch: Fetch, config: ModelConfig, prefix: str) -> AttentionWeights:
    c = config
    q_out = c.n_heads * c.qk_head_dim
    compressed = c.q_lora_rank > 0
    return AttentionWeights(
        q_proj=None if compressed else _linear(fetch, c, f"{prefix}.q_proj", q_out, c.dim),
        q_a_proj=_linear(fetch, c, f"{prefix}.q_a_proj", c.q_lora_rank, c.dim) if compressed else None,
        q_a_norm=_vector(fetch, f"{prefix}.q_a_layernorm.weight", c.q_lora_rank) if compressed else None,
        q_b_proj=_linear(fetch, c, f"{prefix}.q_b_proj", q_out, c.q_lora_rank) if compressed else None,
        kv_a_proj=_linear(fetch, c, f"{prefix}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.dim),
        kv_a_norm=_vector(fetch, f"{prefix}.kv_a_layernorm.weight", c.kv_lora_rank),
        kv_b_proj=_linear(fetch, c, f"{prefix}.kv_b_proj", c.n_heads * (c.qk_nope_head_dim + c.v_head_dim),
                          c.kv_lora_rank),
        o_proj=_linear(fetch, c, f"{prefix}.o_proj", c.dim, c.n_heads * c.v_head_dim),
    )


def _ffn(fetch: Fetch, config: ModelConfig, prefix: str, width: int) -> FFNWeights:
    return FFNWeights(gate_proj=_linear(fetch, config, f"{prefix}.gate_proj", width, config.dim),
                      up_proj=_linear(fetch, config, f"{prefix}.up_proj", width, config.dim),
                      down_proj=_linear(fetch, config, f"{prefix}.down_proj", config.dim, width))


def _moe(fetch: Fetch, config: ModelConfig, prefix: str, resident: Collection[int] | None = None) -> MoEWeights:
    c = config
    gate = GateWeights(
        weight=fetch(TensorSpec(f"{prefix}.gate.weight", (c.n_routed_experts, c.dim))),
        bias=_vector(fetch, f"{prefix}.gate.e_score_correction_bias", c.n_routed_experts) if c.gate_bias else None)
    experts = tuple(_ffn(fetch, c, f"{prefix}.experts.{e}", c.moe_inter_dim) if resident is None or e in resident
                    else None for e in range(c.n_routed_experts))
    shared = (_ffn(fetch, c, f"{prefix}.shared_experts", c.n_shared_experts * c.moe_inter_dim)
              if c.n_shared_experts else None)
    return MoEWeights(gate, experts, shared)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def assemble_layer(fetch: Fetch, config: ModelConfig, layer: int,
                   resident: Collection[int] | None = None) -> LayerWeights:
    """Block `layer` (MTP blocks have layer >= n_layers and are MoE like the layers before them); `resident`:
    the routed experts to fetch (default all)."""
    prefix = layer_prefix(layer)
    ffn = (_moe(fetch, config, f"{prefix}.mlp", resident) if layer >= config.n_dense_layers
           else _ffn(fetch, config, f"{prefix}.mlp", config.inter_dim))
    return LayerWeights(attn_norm=_vector(fetch, f"{prefix}.input_layernorm.weight", config.dim),
                        attn=_attention(fetch, config, f"{prefix}.self_attn"),
                        ffn_norm=_vector(fetch, f"{prefix}.post_attention_layernorm.weight", config.dim),
                        ffn=ffn)


def assemble_mtp(fetch: Fetch, config: ModelConfig, depth: int,
                 resident: Collection[int] | None = None) -> MTPWeights:
    """MTP module `depth` (stored as layer n_layers + depth); `resident`: its block's routed experts to fetch."""
    layer = config.n_layers + depth
    prefix = layer_prefix(layer)
    c = config
    return MTPWeights(enorm=_vector(fetch, f"{prefix}.enorm.weight", c.dim),
                      hnorm=_vector(fetch, f"{prefix}.hnorm.weight", c.dim),
                      eh_proj=_linear(fetch, c, f"{prefix}.eh_proj", c.dim, 2 * c.dim, quantizable=False),
                      block=assemble_layer(fetch, c, layer, resident),
                      head_norm=_vector(fetch, f"{prefix}.shared_head.norm.weight", c.dim),
                      embed=fetch(TensorSpec(f"{prefix}.embed_tokens.weight", (c.vocab_size, c.dim))),
                      head=fetch(TensorSpec(f"{prefix}.shared_head.head.weight", (c.vocab_size, c.dim))))


def assemble(fetch: Fetch, config: ModelConfig, layers: Sequence[int] | None = None,
             include_mtp: bool = True) -> ModelWeights:
    """The weight tree of `config`, each tensor obtained from `fetch` (all layers unless `layers` is given)."""
    c = config
    chosen = range(c.n_layers) if layers is None else layers
    return ModelWeights(
        embed=fetch(TensorSpec("model.embed_tokens.weight", (c.vocab_size, c.dim))),
        layers=tuple(assemble_layer(fetch, c, layer) for layer in chosen),
        norm=_vector(fetch, "model.norm.weight", c.dim),
        head=fetch(TensorSpec("lm_head.weight", (c.vocab_size, c.dim))),
        mtp=tuple(assemble_mtp(fetch, c, depth) for depth in range(c.n_mtp_layers)) if include_mtp else ())


def expected_tensors(config: ModelConfig, include_mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of `config` holds, by HF name."""
    specs: dict[str, TensorSpec] = {}

    def record(spec: TensorSpec) -> None:
        specs[spec.name] = spec

    assemble(record, config, include_mtp=include_mtp)
    return specs


def map_arrays(weights, function: Callable[[np.ndarray], np.ndarray]):
    """A copy of a weight tree (or any dataclass/tuple of arrays) with `function` applied to every array."""
    if isinstance(weights, np.ndarray):
        return function(weights)
    if isinstance(weights, tuple):
        return tuple(map_arrays(item, function) for item in weights)
    if weights is None:
        return None
    fields = {name: map_arrays(getattr(weights, name), function) for name in weights.__dataclass_fields__}
    return type(weights)(**fields)


def _tree_leaves(tree) -> list:
    if tree is None:
        return []
    if isinstance(tree, (np.ndarray, str)):
        return [tree]
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in _tree_leaves(item)]
    return [leaf for name in tree.__dataclass_fields__ for leaf in _tree_leaves(getattr(tree, name))]


def tree_nbytes(tree) -> int:
    """Bytes of a weight tree's arrays (or of any dataclass/tuple of them) as stored: fp8 at one byte each."""
    return sum(int(leaf.nbytes) for leaf in _tree_leaves(tree) if isinstance(leaf, np.ndarray))


def named_tensors(weights: ModelWeights, config: ModelConfig) -> dict[str, np.ndarray]:
    """The tree's arrays by Hugging Face name (the inverse of `assemble`)."""
    names = assemble(lambda spec: spec.name, config, layers=None, include_mtp=bool(weights.mtp))
    return dict(zip(_tree_leaves(names), _tree_leaves(weights)))

