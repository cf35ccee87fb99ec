"""The whole model: embedding, blocks, final norm and output head; prefill and incremental decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from conformance.format.config import ModelConfig
from conformance.format.inputs import check_tokens
from conformance.format.numerics import AttentionForm, Numerics
from conformance.format.weights import FFNWeights, LayerWeights, ModelWeights, MoEWeights, map_arrays

from .attention import LatentCache, mla
from .ffn import swiglu_ffn
from .moe import moe
from .norm import rms_norm


def block(x: np.ndarray, weights: LayerWeights, config: ModelConfig, numerics: Numerics, cache: LatentCache,
          start_pos: int, form: AttentionForm,
          forced_experts: np.ndarray | None = None) -> tuple[np.ndarray, LatentCache, np.ndarray | None]:
    """h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h)). Also returns the chosen experts (MoE blocks)."""
    attended, cache = mla(rms_norm(x, weights.attn_norm, config.rms_norm_eps), weights.attn, config, numerics,
                          cache, start_pos, form)
    h = x + attended
    normed = rms_norm(h, weights.ffn_norm, config.rms_norm_eps)
    if isinstance(weights.ffn, FFNWeights):
        return h + swiglu_ffn(normed, weights.ffn, numerics), cache, None
    routed, experts = moe(normed.reshape(-1, config.dim), weights.ffn, config, numerics, forced_experts)
    return h + routed.reshape(h.shape), cache, experts


@dataclass(frozen=True)
class ForwardResult:
    """Logits for every fed position [B,S,V], each block's output [B,S,dim], the chosen experts of each MoE
    block [B*S, k], and the extended caches."""

    logits: np.ndarray
    hidden: tuple[np.ndarray, ...]
    experts: tuple[np.ndarray, ...]
    caches: tuple[LatentCache, ...]

    @property
    def logits_last(self) -> np.ndarray:
        return self.logits[:, -1]


class Transformer:
    """The NumPy reference model: float64 by default, float32 selectable."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                 dtype: np.dtype = np.float64, attention: AttentionForm = "absorbed"):
        self.config = config
        self.numerics = numerics
        self.dtype = np.dtype(dtype)
        self.attention = attention
        # fp8 weights stay as stored; everything else (scales included, losslessly) takes the compute dtype.
        self.weights = map_arrays(weights, lambda a: a if a.dtype.itemsize == 1 else a.astype(self.dtype))

    def empty_caches(self, batch: int) -> tuple[LatentCache, ...]:
        return tuple(LatentCache.allocate(self.config, batch, self.dtype) for _ in self.weights.layers)

    def forward(self, tokens: np.ndarray, start_pos: int = 0, caches: tuple[LatentCache, ...] | None = None,
                forced_experts: Sequence[np.ndarray] | None = None) -> ForwardResult:
        """Feed tokens [B, S] at positions start_pos.. on top of `caches` (empty for a prefill).

        `forced_experts` (one [B*S, k] array per MoE block) replaces the routing choice of each MoE block.
        """
        tokens = check_tokens(tokens, self.config, start_pos)
        caches = self.empty_caches(tokens.shape[0]) if caches is None else caches
        forced = iter(forced_experts) if forced_experts is not None else None
        h = self.weights.embed[tokens]
        hidden, experts, new_caches = [], [], []
        for layer, cache in zip(self.weights.layers, caches):
            choice = next(forced) if forced is not None and isinstance(layer.ffn, MoEWeights) else None
            h, cache, chosen = block(h, layer, self.config, self.numerics, cache, start_pos, self.attention, choice)
            hidden.append(h)
            new_caches.append(cache)
            if chosen is not None:
                experts.append(chosen)
        logits = rms_norm(h, self.weights.norm, self.config.rms_norm_eps) @ self.weights.head.T
        return ForwardResult(logits, tuple(hidden), tuple(experts), tuple(new_caches))

    def prefill(self, tokens: np.ndarray, forced_experts: Sequence[np.ndarray] | None = None) -> ForwardResult:
        return self.forward(tokens, forced_experts=forced_experts)

    def decode(self, token: np.ndarray, caches: tuple[LatentCache, ...],
               forced_experts: Sequence[np.ndarray] | None = None) -> ForwardResult:
        """Feed one token per sequence [B] after the cached ones."""
        token = np.asarray(token)
        return self.forward(token.reshape(-1, 1), caches[0].length, caches, forced_experts)
