"""The TensorFlow model: XLA-compiled prefill and decode step over a preallocated latent cache.

Weights become TensorFlow variables in the compute dtype (float32 or bfloat16); fp8 weights stay e4m3
with their float32 block scales and are dequantized inside the compiled step. The router and its bias
stay float32. A decode step takes its position as a tensor, so a whole generation runs one trace. The
cache holds as many positions as the caller asks for (at most max_position_embeddings), and its size is
checked against a memory budget before anything is allocated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from conformance.format.config import ModelConfig
from conformance.format.inputs import InputError, check_tokens
from conformance.format.numerics import AttentionForm, Numerics
from conformance.format.weights import FFNWeights, GateWeights, LinearWeight, ModelWeights, MoEWeights

from . import attention
from .attention import LatentCache
from .fp8 import E4M3
from .layers import rms_norm, swiglu_ffn
from .moe import StackedMoE, moe
from .rope import apply_rope, rotation_angles, softmax_scale

Store = Callable[[LatentCache, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
# Largest latent cache (all layers) a runner allocates; a bigger request is refused before allocation.
CACHE_BUDGET_BYTES = 8 << 30


def _variable(array: np.ndarray, dtype: tf.DType) -> tf.Variable:
    return tf.Variable(tf.cast(tf.constant(array), dtype), trainable=False)


def _linear(weight: LinearWeight, dtype: tf.DType) -> LinearWeight:
    if weight.quantized:
        return LinearWeight(_variable(weight.weight, E4M3), _variable(weight.scale_inv, tf.float32))
    return LinearWeight(_variable(weight.weight, dtype))


def _stack_experts(experts: tuple[FFNWeights, ...], dtype: tf.DType) -> FFNWeights:
    def stacked(projection: str) -> LinearWeight:
        parts = [getattr(expert, projection) for expert in experts]
        scales = np.stack([p.scale_inv for p in parts]) if parts[0].quantized else None
        return _linear(LinearWeight(np.stack([p.weight for p in parts]), scales), dtype)

    return FFNWeights(stacked("gate_proj"), stacked("up_proj"), stacked("down_proj"))


def to_tf(weights, dtype: tf.DType):
    """The weight tree as TensorFlow variables, routed experts stacked."""
    if weights is None:
        return None
    if isinstance(weights, np.ndarray):
        return _variable(weights, dtype)
    if isinstance(weights, tuple):
        return tuple(to_tf(item, dtype) for item in weights)
    if isinstance(weights, LinearWeight):
        return _linear(weights, dtype)
    if isinstance(weights, MoEWeights):
        gate = GateWeights(_variable(weights.gate.weight, tf.float32),
                           None if weights.gate.bias is None else _variable(weights.gate.bias, tf.float32))
        return StackedMoE(gate, _stack_experts(weights.experts, dtype), to_tf(weights.shared, dtype))
    return type(weights)(**{f.name: to_tf(getattr(weights, f.name), dtype) for f in dataclasses.fields(weights)})


class TFTransformer:
    """DeepSeek-V3 in TensorFlow. `prefill` starts a batch; `decode` feeds one token per sequence."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                 dtype: str = "float32", attention_form: AttentionForm = "absorbed"):
        if weights.mtp:
            weights = dataclasses.replace(weights, mtp=())
        self.config = config
        self.numerics = numerics
        self.dtype = tf.as_dtype(dtype)
        self.attention_form = attention_form
        self.weights = to_tf(weights, self.dtype)
        self.scale = softmax_scale(config)
        self.caches: tuple[LatentCache, ...] = ()
        self.length = 0
        self.prefill_step = tf.function(self._prefill, jit_compile=True)
        self.decode_step = tf.function(self._decode, jit_compile=True)

    def _forward(self, tokens: tf.Tensor, positions: tf.Tensor, mask: tf.Tensor, caches: tuple[LatentCache, ...],
                 store: Store):
        config, numerics = self.config, self.numerics
        angles = rotation_angles(config, positions)
        cos, sin = tf.cast(tf.cos(angles), tf.float32), tf.cast(tf.sin(angles), tf.float32)
        h = tf.gather(self.weights.embed, tokens)
        hidden, experts = [], []
        for layer, cache in zip(self.weights.layers, caches):
            x = rms_norm(h, layer.attn_norm, config.rms_norm_eps)
            q_nope, q_rope = attention.project_queries(x, layer.attn, config, numerics)
            q_rope = apply_rope(q_rope, cos[None, :, None], sin[None, :, None])
            kv_latent, rope_key = attention.project_latent(x, layer.attn, config, numerics)
            keys_latent, keys_rope = store(cache, kv_latent, apply_rope(rope_key, cos[None], sin[None]))
            heads = attention.attend(q_nope, q_rope, keys_latent, keys_rope, layer.attn, config, numerics, mask,
                                     self.scale, self.attention_form)
            h = h + attention.output(heads, layer.attn, numerics)
            x = rms_norm(h, layer.ffn_norm, config.rms_norm_eps)
            if isinstance(layer.ffn, StackedMoE):
                flat, chosen = moe(tf.reshape(x, [-1, config.dim]), layer.ffn, config, numerics)
                h = h + tf.reshape(flat, tf.shape(h))
                experts.append(chosen)
            else:
                h = h + swiglu_ffn(x, layer.ffn, numerics)
            hidden.append(h)
        logits = tf.einsum("bsd,vd->bsv", rms_norm(h, self.weights.norm, config.rms_norm_eps), self.weights.head)
        return tf.cast(logits, tf.float32), tf.stack(hidden), experts

    def _prefill(self, tokens: tf.Tensor, caches: tuple[LatentCache, ...]):
        length = tokens.shape[1]
        padding = [[0, 0], [0, caches[0].kv_latent.shape[1] - length], [0, 0]]

        def store(cache: LatentCache, kv_latent: tf.Tensor, rope_key: tf.Tensor):
            cache.kv_latent.assign(tf.pad(kv_latent, padding))
            cache.rope_key.assign(tf.pad(rope_key, padding))
            return kv_latent, rope_key

        return self._forward(tokens, tf.range(length), attention.causal_mask(0, length, length), caches, store)

    def _decode(self, tokens: tf.Tensor, position: tf.Tensor, caches: tuple[LatentCache, ...]):
        batch = tokens.shape[0]
        slots = tf.stack([tf.range(batch), tf.fill([batch], position)], axis=1)

        def store(cache: LatentCache, kv_latent: tf.Tensor, rope_key: tf.Tensor):
            cache.kv_latent.scatter_nd_update(slots, kv_latent[:, 0])
            cache.rope_key.scatter_nd_update(slots, rope_key[:, 0])
            return cache.kv_latent, cache.rope_key

        visible = attention.causal_mask(position, 1, caches[0].kv_latent.shape[1])
        return self._forward(tokens[:, None], position[None], visible, caches, store)

    @staticmethod
    def _numpy(result) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        logits, hidden, experts = result
        return logits.numpy(), tuple(tf.cast(hidden, tf.float32).numpy()), tuple(e.numpy() for e in experts)

    def _reserve(self, batch: int, capacity: int) -> None:
        """Caches for `batch` sequences of up to `capacity` positions (kept when they already fit exactly)."""
        if self.caches and tuple(self.caches[0].kv_latent.shape[:2]) == (batch, capacity):
            return
        per_position = (self.config.kv_lora_rank + self.config.qk_rope_head_dim) * self.dtype.size
        needed = len(self.weights.layers) * batch * capacity * per_position
        if needed > CACHE_BUDGET_BYTES:
            raise InputError(f"a latent cache for {batch} sequence(s) of {capacity} positions needs {needed:,} bytes, "
                             f"more than the budget of {CACHE_BUDGET_BYTES:,}: lower max_position_embeddings or the "
                             "positions asked for")
        self.caches = ()
        self.caches = tuple(LatentCache.allocate(self.config, batch, self.dtype, capacity) for _ in self.weights.layers)

    def prefill(self, tokens: np.ndarray, capacity: int | None = None):
        """Logits [B,S,V], block outputs, chosen experts per MoE block; the cache then holds the prompt.

        `capacity`: positions the cache must hold in all (prompt and later decode steps); default
        max_position_embeddings.
        """
        tokens = check_tokens(tokens, self.config)
        capacity = self.config.max_seq_len if capacity is None else capacity
        if not tokens.shape[1] <= capacity <= self.config.max_seq_len:
            raise InputError(f"cache capacity {capacity} must lie between the prompt length {tokens.shape[1]} and "
                             f"max_position_embeddings={self.config.max_seq_len}")
        self._reserve(tokens.shape[0], capacity)
        self.length = tokens.shape[1]
        return self._numpy(self.prefill_step(tf.constant(tokens, tf.int32), self.caches))

    def decode(self, tokens: np.ndarray):
        """Feed one token per sequence [B] at the next position."""
        if not self.caches:
            raise InputError("decode called before prefill")
        tokens = check_tokens(np.asarray(tokens).reshape(-1, 1), self.config, self.length)
        if self.length >= self.caches[0].kv_latent.shape[1]:
            raise InputError(f"the cache holds {self.length} positions, its capacity: prefill with a larger capacity")
        if tokens.shape[0] != self.caches[0].kv_latent.shape[0]:
            raise InputError(f"decode got {tokens.shape[0]} sequences, the cache holds "
                             f"{self.caches[0].kv_latent.shape[0]}")
        result = self.decode_step(tf.constant(tokens[:, 0], tf.int32), tf.constant(self.length, tf.int32),
                                  self.caches)
        self.length += 1
        return self._numpy(result)

    def cache_bytes_per_token_per_layer(self) -> int:
        """Measured from the allocated cache tensors of one layer."""
        if not self.caches:
            raise InputError("no cache allocated yet: run prefill first")
        return self.caches[0].bytes_per_token()
