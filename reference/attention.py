"""Multi-head Latent Attention (report section 2.1.1, equations 1-11).

Keys and values are rebuilt from one compressed latent per token (eq. 1-5); queries from their own
latent (eq. 6-9). Two forms of the same function are given: `naive` expands the cached latents into
per-head keys and values; `absorbed` folds the key up-projection into the queries and the value
up-projection after the attention, so the cache holds only the normalized latent and the rotated
rope key (kv_lora_rank + qk_rope_head_dim numbers per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import AttentionWeights

from .linear import dense, linear
from .norm import rms_norm
from .rope import apply_rope, rotation_angles, softmax_scale


@dataclass(frozen=True)
class LatentCache:
    """Per layer: normalized kv latents [B, T, kv_lora_rank] and rotated rope keys [B, T, rope_dim]."""

    kv_latent: np.ndarray
    rope_key: np.ndarray

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, dtype: np.dtype) -> "LatentCache":
        """An empty cache; it grows by `append`."""
        return cls(np.zeros((batch, 0, config.kv_lora_rank), dtype), np.zeros((batch, 0, config.qk_rope_head_dim), dtype))

    @property
    def length(self) -> int:
        return self.kv_latent.shape[1]

    def truncate(self, length: int) -> "LatentCache":
        """The cache of the first `length` positions."""
        return LatentCache(self.kv_latent[:, :length], self.rope_key[:, :length])

    def append(self, kv_latent: np.ndarray, rope_key: np.ndarray) -> "LatentCache":
        return LatentCache(np.concatenate([self.kv_latent, kv_latent], axis=1),
                           np.concatenate([self.rope_key, rope_key], axis=1))


def split_query_heads(q: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each head of q [B,S,H,nope+rope] is [q_nope; q_rope], the rope part last (eq. 8)."""
    return q[..., : config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]


def project_queries(x: np.ndarray, weights: AttentionWeights, config: ModelConfig,
                    numerics: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """Per-head query parts (eq. 6-8): q_nope [B,S,H,nope] and the unrotated q_rope [B,S,H,rope]."""
    if config.q_lora_rank:
        query_latent = rms_norm(linear(x, weights.q_a_proj, numerics, "q_a_proj"), weights.q_a_norm, config.rms_norm_eps)
        q = linear(query_latent, weights.q_b_proj, numerics, "q_b_proj")
    else:
        q = linear(x, weights.q_proj, numerics, "q_proj")
    return split_query_heads(q.reshape(*x.shape[:2], config.n_heads, config.qk_head_dim), config)


def project_latent(x: np.ndarray, weights: AttentionWeights, config: ModelConfig,
                   numerics: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """The normalized kv latent c_kv [B,S,r] (eq. 1) and the unrotated shared rope key [B,S,rope] (eq. 3)."""
    compressed = linear(x, weights.kv_a_proj, numerics, "kv_a_proj")
    kv_latent = rms_norm(compressed[..., : config.kv_lora_rank], weights.kv_a_norm, config.rms_norm_eps)
    return kv_latent, compressed[..., config.kv_lora_rank:]


def causal_mask(start_pos: int, queries: int, keys: int) -> np.ndarray:
    """[queries, keys] True where the query at absolute position start_pos + i may see key j (j <= it)."""
    return np.arange(keys)[None, :] <= start_pos + np.arange(queries)[:, None]


def masked_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of scores [B,S,H,T] with mask [S,T] (eq. 10)."""
    scores = np.where(mask[None, :, None, :], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def naive_attention(q_nope: np.ndarray, q_rope: np.ndarray, cache: LatentCache, weights: AttentionWeights,
                    config: ModelConfig, numerics: Numerics, mask: np.ndarray) -> np.ndarray:
    """Expand latents to per-head keys and values (eq. 2, 4, 5), then attend: [B,S,H,v_head_dim]."""
    batch, keys = cache.kv_latent.shape[:2]
    expanded = linear(cache.kv_latent, weights.kv_b_proj, numerics, "kv_b_proj")
    expanded = expanded.reshape(batch, keys, config.n_heads, config.qk_nope_head_dim + config.v_head_dim)
    k_nope, values = expanded[..., : config.qk_nope_head_dim], expanded[..., config.qk_nope_head_dim:]
    scores = (np.einsum("bshd,bthd->bsht", q_nope, k_nope)
              + np.einsum("bshr,btr->bsht", q_rope, cache.rope_key)) * softmax_scale(config)
    return np.einsum("bsht,bthd->bshd", masked_softmax(scores, mask), values)


def absorbed_attention(q_nope: np.ndarray, q_rope: np.ndarray, cache: LatentCache, weights: AttentionWeights,
                       config: ModelConfig, mask: np.ndarray) -> np.ndarray:
    """Attend in latent space: W_UK folded into the queries, W_UV applied after: [B,S,H,v_head_dim]."""
    up = dense(weights.kv_b_proj, q_nope.dtype).reshape(config.n_heads, -1, config.kv_lora_rank)
    key_up, value_up = up[:, : config.qk_nope_head_dim], up[:, config.qk_nope_head_dim:]
    q_latent = np.einsum("bshd,hdc->bshc", q_nope, key_up)
    scores = (np.einsum("bshc,btc->bsht", q_latent, cache.kv_latent)
              + np.einsum("bshr,btr->bsht", q_rope, cache.rope_key)) * softmax_scale(config)
    latent_out = np.einsum("bsht,btc->bshc", masked_softmax(scores, mask), cache.kv_latent)
    return np.einsum("bshc,hdc->bshd", latent_out, value_up)


def mla(x: np.ndarray, weights: AttentionWeights, config: ModelConfig, numerics: Numerics, cache: LatentCache,
        start_pos: int, form: AttentionForm = "absorbed") -> tuple[np.ndarray, LatentCache]:
    """Attention output [B,S,dim] for tokens at positions start_pos.., and the cache extended by them."""
    if start_pos != cache.length:
        raise ValueError(f"start_pos={start_pos} does not follow the {cache.length} cached tokens")
    queries = x.shape[1]
    angles = rotation_angles(config, np.arange(start_pos, start_pos + queries))
    cos, sin = np.cos(angles), np.sin(angles)
    q_nope, q_rope = project_queries(x, weights, config, numerics)
    q_rope = apply_rope(q_rope, cos[None, :, None], sin[None, :, None])
    kv_latent, rope_key = project_latent(x, weights, config, numerics)
    cache = cache.append(kv_latent, apply_rope(rope_key, cos[None], sin[None]))
    mask = causal_mask(start_pos, queries, cache.length)
    if form == "naive":
        heads = naive_attention(q_nope, q_rope, cache, weights, config, numerics, mask)
    elif form == "absorbed":
        heads = absorbed_attention(q_nope, q_rope, cache, weights, config, mask)
    else:
        raise ValueError(f"unknown attention form {form!r}: expected 'naive' or 'absorbed'")
    return linear(heads.reshape(*x.shape[:2], -1), weights.o_proj, numerics, "o_proj"), cache
