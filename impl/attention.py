"""MLA in TensorFlow: projections, and attention over a latent cache in naive or absorbed form.

Prefill attends over its own keys; decode writes one token's latent and rope key into a preallocated
per-layer cache (`LatentCache`: kv latent [B, T, kv_lora_rank], rope key [B, T, rope_dim]) and attends
over all T slots with a mask, so its shapes never depend on the position.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from conformance.format.config import ModelConfig
from conformance.format.numerics import AttentionForm, Numerics
from conformance.format.weights import AttentionWeights

from .layers import dense_weight, linear, rms_norm


class LatentCache(NamedTuple):
    """One layer's preallocated cache: normalized kv latents and rotated rope keys, nothing else.

    A named tuple, so that compiled functions take it as a structure of variables.
    """

    kv_latent: tf.Variable  # [B, capacity, kv_lora_rank]
    rope_key: tf.Variable  # [B, capacity, qk_rope_head_dim]

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, dtype: tf.DType, capacity: int) -> "LatentCache":
        """A cache with room for `capacity` positions."""
        return cls(tf.Variable(tf.zeros([batch, capacity, config.kv_lora_rank], dtype), trainable=False),
                   tf.Variable(tf.zeros([batch, capacity, config.qk_rope_head_dim], dtype), trainable=False))

    def bytes_per_token(self) -> int:
        """Bytes this cache spends on one token, measured from its tensors."""
        slots = self.kv_latent.shape[0] * self.kv_latent.shape[1]
        total = sum(v.shape.num_elements() * v.dtype.size for v in (self.kv_latent, self.rope_key))
        return total // slots


def split_query_heads(q: tf.Tensor, config: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """[q_nope; q_rope] per head, the rope part last."""
    return q[..., : config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]


def project_queries(x: tf.Tensor, weights: AttentionWeights, config: ModelConfig,
                    numerics: Numerics) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-head q_nope [B,S,H,n] and unrotated q_rope [B,S,H,r]."""
    if config.q_lora_rank:
        query_latent = rms_norm(linear(x, weights.q_a_proj, numerics, "q_a_proj"), weights.q_a_norm, config.rms_norm_eps)
        q = linear(query_latent, weights.q_b_proj, numerics, "q_b_proj")
    else:
        q = linear(x, weights.q_proj, numerics, "q_proj")
    return split_query_heads(tf.reshape(q, [*x.shape[:2], config.n_heads, config.qk_head_dim]),
                             config)


def project_latent(x: tf.Tensor, weights: AttentionWeights, config: ModelConfig,
                   numerics: Numerics) -> tuple[tf.Tensor, tf.Tensor]:
    """The normalized kv latent [B,S,c] and the unrotated shared rope key [B,S,r]."""
    compressed = linear(x, weights.kv_a_proj, numerics, "kv_a_proj")
    kv_latent = rms_norm(compressed[..., : config.kv_lora_rank], weights.kv_a_norm, config.rms_norm_eps)
    return kv_latent, compressed[..., config.kv_lora_rank:]


def causal_mask(start_pos: tf.Tensor | int, queries: int, keys: int) -> tf.Tensor:
    """[queries, keys] True where the query at absolute position start_pos + i may see key slot j (j <= it)."""
    return tf.range(keys)[None, :] <= start_pos + tf.range(queries)[:, None]


def masked_softmax(scores: tf.Tensor, mask: tf.Tensor, scale: float, dtype: tf.DType) -> tf.Tensor:
    """Softmax over keys of scale * scores [B,S,H,T] in float32; mask [S,T] (True = visible)."""
    scores = tf.cast(scores, tf.float32) * scale
    scores = tf.where(mask[None, :, None, :], scores, tf.constant(float("-inf"), tf.float32))
    return tf.cast(tf.nn.softmax(scores, axis=-1), dtype)


def naive_attention(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                    weights: AttentionWeights, config: ModelConfig, numerics: Numerics, mask: tf.Tensor,
                    scale: float) -> tf.Tensor:
    """Latents expanded to per-head keys and values, then attention: [B,S,H,v]."""
    expanded = linear(kv_latent, weights.kv_b_proj, numerics, "kv_b_proj")
    expanded = tf.reshape(expanded, [*kv_latent.shape[:2], config.n_heads, -1])
    k_nope, values = expanded[..., : config.qk_nope_head_dim], expanded[..., config.qk_nope_head_dim:]
    scores = tf.einsum("bshd,bthd->bsht", q_nope, k_nope) + tf.einsum("bshr,btr->bsht", q_rope, rope_key)
    return tf.einsum("bsht,bthd->bshd", masked_softmax(scores, mask, scale, q_nope.dtype), values)


def absorbed_attention(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                       weights: AttentionWeights, config: ModelConfig, mask: tf.Tensor, scale: float) -> tf.Tensor:
    """Attention in latent space (W_UK folded into the queries, W_UV applied after): [B,S,H,v]."""
    dtype = q_nope.dtype
    up = tf.reshape(dense_weight(weights.kv_b_proj, dtype), [config.n_heads, -1, config.kv_lora_rank])
    key_up, value_up = up[:, : config.qk_nope_head_dim], up[:, config.qk_nope_head_dim:]
    q_latent = tf.einsum("bshd,hdc->bshc", q_nope, key_up)
    scores = tf.einsum("bshc,btc->bsht", q_latent, kv_latent) + tf.einsum("bshr,btr->bsht", q_rope, rope_key)
    latent_out = tf.einsum("bsht,btc->bshc", masked_softmax(scores, mask, scale, dtype), kv_latent)
    return tf.einsum("bshc,hdc->bshd", latent_out, value_up)


def attend(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
           weights: AttentionWeights, config: ModelConfig, numerics: Numerics, mask: tf.Tensor, scale: float,
           form: AttentionForm) -> tf.Tensor:
    """Per-head attention outputs [B,S,H,v] over keys given by latents [B,T,c] and rope keys [B,T,r]."""
    if form == "absorbed":
        return absorbed_attention(q_nope, q_rope, kv_latent, rope_key, weights, config, mask, scale)
    return naive_attention(q_nope, q_rope, kv_latent, rope_key, weights, config, numerics, mask, scale)


def output(heads: tf.Tensor, weights: AttentionWeights, numerics: Numerics) -> tf.Tensor:
    merged = tf.reshape(heads, [*heads.shape[:2], heads.shape[2] * heads.shape[3]])
    return linear(merged, weights.o_proj, numerics, "o_proj")
