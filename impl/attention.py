"""MLA in TensorFlow: projections, and attention over a latent cache in naive or absorbed form.

Prefill attends over its own keys; decode writes one token's latent and rope key into a preallocated
per-layer cache (`LatentCache`: kv latent and rope key, a row per sequence and position) and attends over
the first slots of its sequence with a mask: a window holding every filled slot (impl.model.attention_window),
so its shapes change only when the window grows, twice per doubling of the sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import AttentionWeights

from . import matvec
from .layers import MATVEC_ROWS, dense_weight, linear, rms_norm


class LatentCache(NamedTuple):
    """One layer's preallocated cache: normalized kv latents and rotated rope keys, nothing else, one row per
    (sequence, position), row b * capacity + t.

    Flat, so that XLA updates it in place and the attention reads it where it lies: as [B, capacity, c] variables
    with B = 1, XLA dropped the unit batch dimension of the attention's dots by a reshape of the updated cache and
    materialized it twice, copying every layer's whole cache on every decode step (seen in the optimized HLO).
    A named tuple, so that compiled functions take it as a structure of variables.
    """

    kv_latent: tf.Variable  # [B * capacity, kv_lora_rank]
    rope_key: tf.Variable  # [B * capacity, qk_rope_head_dim]

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, dtype: tf.DType, capacity: int) -> "LatentCache":
        """A cache with room for `capacity` positions of `batch` sequences."""
        return cls(tf.Variable(tf.zeros([batch * capacity, config.kv_lora_rank], dtype), trainable=False),
                   tf.Variable(tf.zeros([batch * capacity, config.qk_rope_head_dim], dtype), trainable=False))

    def bytes_per_token(self) -> int:
        """Bytes this cache spends on one token, measured from its tensors."""
        total = sum(v.shape.num_elements() * v.dtype.size for v in (self.kv_latent, self.rope_key))
        return total // self.kv_latent.shape[0]

    def fill(self, kv_latent: tf.Tensor, rope_key: tf.Tensor) -> None:
        """The whole cache from entries [B, capacity, .] (a prompt's, padded)."""
        self.kv_latent.assign(tf.reshape(kv_latent, self.kv_latent.shape))
        self.rope_key.assign(tf.reshape(rope_key, self.rope_key.shape))

    def write(self, rows: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Entries [B, q, .] written at the flat `rows` [B * q]; returns every sequence's updated cache
        [B, capacity, .], the keys the new queries attend over."""
        def update(variable: tf.Variable, entries: tf.Tensor) -> tf.Tensor:
            updated = tf.tensor_scatter_nd_update(variable, rows[:, None], tf.reshape(entries, [-1, entries.shape[-1]]))
            variable.assign(updated)
            return tf.reshape(updated, [entries.shape[0], -1, entries.shape[-1]])
        return update(self.kv_latent, kv_latent), update(self.rope_key, rope_key)


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


def masked_softmax(scores: tf.Tensor, visible: tf.Tensor, scale: float, dtype: tf.DType) -> tf.Tensor:
    """Softmax over keys (the last axis) of scale * scores in float32; `visible` (True = visible) broadcasts
    against the scores."""
    scores = tf.cast(scores, tf.float32) * scale
    scores = tf.where(visible, scores, tf.constant(float("-inf"), tf.float32))
    return tf.cast(tf.nn.softmax(scores, axis=-1), dtype)


def naive_attention(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                    weights: AttentionWeights, config: ModelConfig, numerics: Numerics, mask: tf.Tensor,
                    scale: float, query_blocks: int = 1) -> tf.Tensor:
    """Latents expanded to per-head keys and values, then attention: [B,S,H,v].

    Per head, one product gives both score terms: the query [nope | rope] against the key [nope | shared rope
    key], laid out [B,H,S,.] so that both products are plain batched matmuls (einsums into [B,S,H,T] run slower
    outside XLA).
    `query_blocks` > 1 splits the queries into that many blocks, each scored against the keys up to its last
    query only: the queries are the last S of the T key positions and the mask is causal, so no key past a
    block's last query is visible to it. At 4 blocks a causal prompt needs 5/8 of the products."""
    batch, length = q_nope.shape[:2]
    keys_total = kv_latent.shape[1]
    expanded = linear(kv_latent, weights.kv_b_proj, numerics, "kv_b_proj")
    expanded = tf.reshape(expanded, [batch, keys_total, config.n_heads, -1])
    k_nope, values = expanded[..., : config.qk_nope_head_dim], expanded[..., config.qk_nope_head_dim:]
    shared_rope = tf.broadcast_to(rope_key[:, :, None, :], [batch, keys_total, config.n_heads, rope_key.shape[-1]])
    queries = tf.transpose(tf.concat([q_nope, q_rope], -1), [0, 2, 1, 3])
    keys = tf.transpose(tf.concat([k_nope, shared_rope], -1), [0, 2, 1, 3])
    values = tf.transpose(values, [0, 2, 1, 3])
    outputs, step = [], -(-length // query_blocks)
    for start in range(0, length, step):
        end = min(start + step, length)
        visible = keys_total - length + end  # keys up to this block's last query
        scores = tf.matmul(queries[:, :, start:end], keys[:, :, :visible], transpose_b=True)
        probabilities = masked_softmax(scores, mask[None, None, start:end, :visible], scale, q_nope.dtype)
        outputs.append(tf.matmul(probabilities, values[:, :, :visible]))
    return tf.transpose(tf.concat(outputs, 2), [0, 2, 1, 3])


def absorbed_attention(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                       weights: AttentionWeights, config: ModelConfig, mask: tf.Tensor, scale: float) -> tf.Tensor:
    """Attention in latent space (W_UK folded into the queries, W_UV applied after): [B,S,H,v], over the first
    mask.shape[-1] positions of the keys.

    Both foldings multiply wkv_b's whole per-head block [H, nope + v, c] where it lies: the queries padded with
    zeros over the value rows, and the value rows kept from the output. Slicing the key and value rows out of the
    block made XLA copy both halves of it on every decode step (seen in the optimized HLO)."""
    dtype, nope = q_nope.dtype, config.qk_nope_head_dim
    up = tf.reshape(dense_weight(weights.kv_b_proj, dtype), [config.n_heads, -1, config.kv_lora_rank])
    if (weights.kv_b_proj.scale_inv is None and matvec.applies(q_nope, up.shape)
            and q_nope.shape[0] * q_nope.shape[1] <= MATVEC_ROWS):
        return _absorbed_in_kernel(q_nope, q_rope, kv_latent, rope_key, up, config, mask, scale)
    window = mask.shape[-1]
    kv_latent, rope_key = kv_latent[:, :window], rope_key[:, :window]
    q_padded = tf.pad(q_nope, [[0, 0], [0, 0], [0, 0], [0, config.v_head_dim]])
    q_latent = tf.einsum("bshj,hjc->bshc", q_padded, up)
    # The cache is the left operand: XLA's CPU dot reads it where it lies (on the right, every layer's cache was
    # transposed, copied, every step).
    scores = tf.einsum("btc,bshc->bsht", kv_latent, q_latent) + tf.einsum("btr,bshr->bsht", rope_key, q_rope)
    latent_out = tf.einsum("bsht,btc->bshc", masked_softmax(scores, mask[None, :, None, :], scale, dtype), kv_latent)
    return tf.einsum("hjc,bshc->bshj", up, latent_out)[..., nope:]


def _absorbed_in_kernel(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                        up: tf.Tensor, config: ModelConfig, mask: tf.Tensor, scale: float) -> tf.Tensor:
    """absorbed_attention for a decode step's few queries in the matvec kernel (impl.matvec), wkv_b's per-head
    blocks and the caches read in place: each head's key rows of the block as x B, the core over the visible
    positions (XLA copies the cache's window out of each layer's cache), each head's value rows as x B^T (XLA's
    per-head products read the block slowly)."""
    batch, length, heads, nope = q_nope.shape
    q_latent = matvec.per_head(_to_heads(q_nope), up, 0, nope, transposed=True)
    latent_out = matvec.latent_attention(q_latent, tf.reshape(q_rope, [batch * length, heads, -1]), kv_latent,
                                         rope_key, mask, scale)
    return _from_heads(matvec.per_head(latent_out, up, nope, config.v_head_dim), q_nope.shape)


def _to_heads(x: tf.Tensor) -> tf.Tensor:
    """[B, S, H, d] -> [H, B*S, d]."""
    batch, length, heads, width = x.shape
    return tf.transpose(tf.reshape(x, [batch * length, heads, width]), [1, 0, 2])


def _from_heads(x: tf.Tensor, like: tf.TensorShape) -> tf.Tensor:
    """[H, B*S, d] -> [B, S, H, d] (B, S from `like`)."""
    return tf.reshape(tf.transpose(x, [1, 0, 2]), [like[0], like[1], x.shape[0], x.shape[2]])


def attend(q_nope: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
           weights: AttentionWeights, config: ModelConfig, numerics: Numerics, mask: tf.Tensor, scale: float,
           form: AttentionForm, query_blocks: int = 1) -> tf.Tensor:
    """Per-head attention outputs [B,S,H,v] over the keys given by latents [B,T,c] and rope keys [B,T,r], their
    first mask.shape[-1] positions (a decode step's window of the cache; `query_blocks`: see naive_attention)."""
    if form == "absorbed":
        return absorbed_attention(q_nope, q_rope, kv_latent, rope_key, weights, config, mask, scale)
    window = mask.shape[-1]
    return naive_attention(q_nope, q_rope, kv_latent[:, :window], rope_key[:, :window], weights, config, numerics,
                           mask, scale, query_blocks)


def output(heads: tf.Tensor, weights: AttentionWeights, numerics: Numerics) -> tf.Tensor:
    merged = tf.reshape(heads, [*heads.shape[:2], heads.shape[2] * heads.shape[3]])
    return linear(merged, weights.o_proj, numerics, "o_proj")
