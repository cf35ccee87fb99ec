"""The whole model: embedding, blocks, final norm and output head; the MTP modules; a stateful session.

`forward` and `mtp_forward` are pure functions of their caches. `Transformer` keeps one batch's state
(caches, the tokens fed, the main model's normed outputs) for prefill, decode, the MTP modules, and the
verification of drafted tokens with rollback (greedy speculative decoding, SEMANTICS.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.inputs import InputError, check_tokens
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import FFNWeights, LayerWeights, ModelWeights, map_arrays

from .attention import LatentCache, mla
from .ffn import swiglu_ffn
from .moe import moe
from .mtp import accepted_prefix, chained, mtp_embedding, mtp_head, mtp_input, mtp_source, tokens_ahead
from .norm import rms_norm

Routing = Sequence[np.ndarray] | None


def block(x: np.ndarray, weights: LayerWeights, config: ModelConfig, numerics: Numerics, cache: LatentCache,
          start_pos: int, form: AttentionForm, forced_experts: np.ndarray | None = None,
          gate_inputs: list | None = None) -> tuple[np.ndarray, LatentCache, np.ndarray | None]:
    """h = x + attn(attn_norm(x)); out = h + ffn(ffn_norm(h)). Also returns the chosen experts (MoE blocks);
    `gate_inputs`, when given, receives a MoE block's router input [T, dim] (for the balance loss)."""
    attended, cache = mla(rms_norm(x, weights.attn_norm, config.rms_norm_eps), weights.attn, config, numerics,
                          cache, start_pos, form)
    h = x + attended
    normed = rms_norm(h, weights.ffn_norm, config.rms_norm_eps)
    if isinstance(weights.ffn, FFNWeights):
        return h + swiglu_ffn(normed, weights.ffn, numerics, "dense_ffn"), cache, None
    if gate_inputs is not None:
        gate_inputs.append(normed.reshape(-1, config.dim))
    routed, experts = moe(normed.reshape(-1, config.dim), weights.ffn, config, numerics, forced_experts)
    return h + routed.reshape(h.shape), cache, experts


@dataclass(frozen=True)
class ForwardResult:
    """Logits for every fed position [B,S,V], each block's output [B,S,dim], the chosen experts of each MoE
    block [B*S, k], the last block's output after the final norm [B,S,dim], and the extended caches."""

    logits: np.ndarray
    hidden: tuple[np.ndarray, ...]
    experts: tuple[np.ndarray, ...]
    normed: np.ndarray
    caches: tuple[LatentCache, ...]

    @property
    def logits_last(self) -> np.ndarray:
        return self.logits[:, -1]


@dataclass(frozen=True)
class MTPResult:
    """Per depth: block outputs before shared_head.norm [B,n,dim], logits [B,n,V], chosen experts [B*n, k];
    the drafts [B, D] (each depth's greedy token at the last position), and the extended caches."""

    hidden: tuple[np.ndarray, ...]
    logits: tuple[np.ndarray, ...]
    experts: tuple[np.ndarray, ...]
    drafts: np.ndarray
    caches: tuple[LatentCache, ...]


def moe_block(config: ModelConfig, layer: int) -> int | None:
    """Which MoE block layer `layer` is (0 for the first), None for a dense layer: the first
    first_k_dense_replace layers are dense."""
    return layer - config.n_dense_layers if layer >= config.n_dense_layers else None


def forward(weights: ModelWeights, config: ModelConfig, numerics: Numerics, form: AttentionForm, tokens: np.ndarray,
            start_pos: int, caches: tuple[LatentCache, ...], forced_experts: Routing = None) -> ForwardResult:
    """Feed tokens [B, S] at positions start_pos.. on top of `caches`.

    `forced_experts` (one [B*S, k] array per MoE block) replaces the routing choice of each MoE block.
    """
    h = weights.embed[tokens]
    hidden, experts, new_caches = [], [], []
    for index, (layer, cache) in enumerate(zip(weights.layers, caches)):
        ordinal = moe_block(config, index)
        choice = forced_experts[ordinal] if forced_experts is not None and ordinal is not None else None
        h, cache, chosen = block(h, layer, config, numerics, cache, start_pos, form, choice)
        hidden.append(h)
        new_caches.append(cache)
        if chosen is not None:
            experts.append(chosen)
    normed = rms_norm(h, weights.norm, config.rms_norm_eps)
    return ForwardResult(normed @ weights.head.T, tuple(hidden), tuple(experts), mtp_source(h, normed),
                         tuple(new_caches))


def mtp_forward(weights: ModelWeights, config: ModelConfig, numerics: Numerics, form: AttentionForm,
                source: np.ndarray, stream: np.ndarray, start_pos: int, caches: tuple[LatentCache, ...],
                options: MTPOptions, forced_experts: Routing = None) -> MTPResult:
    """Every MTP depth over n positions start_pos.. given the main model's state there, source [B,n,dim].

    `stream` holds the tokens from position start_pos on, t(start_pos), t(start_pos+1), ..., as far as they
    are known (the last ones may be missing: depth k then takes the drafts of the depths before it).
    """
    count = source.shape[1]
    hidden_out, logits_out, experts_out, drafts, new_caches = [], [], [], [], []
    h = source
    for depth, (module, cache) in enumerate(zip(weights.mtp, caches), start=1):
        known = tokens_ahead(stream, depth, count)
        tokens = np.concatenate([known, np.stack(drafts, axis=1)[:, : count - known.shape[1]]], axis=1) \
            if known.shape[1] < count else known
        x = mtp_input(mtp_embedding(module.embed, tokens, start_pos, options), h, module, config, options)
        choice = forced_experts[depth - 1] if forced_experts is not None else None
        y, cache, chosen = block(x, module.block, config, numerics, cache, start_pos, form, choice)
        normed, logits = mtp_head(y, module, config)
        hidden_out.append(y)
        logits_out.append(logits)
        experts_out.append(chosen)
        new_caches.append(cache)
        drafts.append(np.argmax(logits[:, -1], axis=-1))
        h = chained(y, normed, options)
    return MTPResult(tuple(hidden_out), tuple(logits_out), tuple(experts_out), np.stack(drafts, axis=1),
                     tuple(new_caches))


class Transformer:
    """The NumPy reference model (float64 by default, float32 selectable), holding one batch's state."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                 dtype: np.dtype = np.float64, attention_form: AttentionForm = "absorbed"):
        self.config = config
        self.numerics = numerics
        self.dtype = np.dtype(dtype)
        self.attention_form = attention_form
        # fp8 weights stay as stored; everything else (scales included, losslessly) takes the compute dtype.
        self.weights = map_arrays(weights, lambda a: a if a.dtype.itemsize == 1 else a.astype(self.dtype))
        self.caches: tuple[LatentCache, ...] = ()
        self.mtp_caches: tuple[LatentCache, ...] = ()
        self.tokens = np.zeros((0, 0), np.int64)  # every token fed to the main model [B, length]
        self.normed = np.zeros((0, 0, config.dim), self.dtype)  # its outputs after the final norm

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def _empty(self, batch: int, count: int) -> tuple[LatentCache, ...]:
        return tuple(LatentCache.allocate(self.config, batch, self.dtype) for _ in range(count))

    def _feed(self, tokens: np.ndarray, forced_experts: Routing) -> ForwardResult:
        tokens = check_tokens(tokens, self.config, self.length)
        result = forward(self.weights, self.config, self.numerics, self.attention_form, tokens, self.length, self.caches,
                         forced_experts)
        self.caches = result.caches
        self.tokens = np.concatenate([self.tokens, tokens], axis=1)
        self.normed = np.concatenate([self.normed, result.normed], axis=1)
        return result

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None) -> ForwardResult:
        """Start a new batch with prompt tokens [B, S]."""
        batch = np.asarray(tokens).shape[0] if np.asarray(tokens).ndim == 2 else 0
        self.caches = self._empty(batch, len(self.weights.layers))
        self.mtp_caches = self._empty(batch, len(self.weights.mtp))
        self.tokens = np.zeros((batch, 0), np.int64)
        self.normed = np.zeros((batch, 0, self.config.dim), self.dtype)
        return self._feed(tokens, forced_experts)

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> ForwardResult:
        """Feed one token per sequence [B] (or a few, [B, q]) after the cached ones."""
        if not self.caches:
            raise InputError("decode called before prefill")
        tokens = np.asarray(tokens)
        return self._feed(tokens.reshape(len(tokens), -1), forced_experts)

    def mtp(self, following: np.ndarray, options: MTPOptions = MTPOptions(), forced_experts: Routing = None) -> MTPResult:
        """Run the MTP depths over the main positions they have not seen, given the tokens that follow the
        last fed one, following [B, j] (t(length), ...; j >= 1, deeper depths use drafts beyond them)."""
        if not self.weights.mtp:
            raise InputError("this config has no MTP module (num_nextn_predict_layers is 0)")
        start = self.mtp_caches[0].length
        if start == self.length:
            raise InputError("the MTP modules have seen every position: feed the main model first")
        following = check_tokens(np.asarray(following).reshape(len(self.tokens), -1), self.config, self.length)
        stream = np.concatenate([self.tokens[:, start:], following], axis=1)
        result = mtp_forward(self.weights, self.config, self.numerics, self.attention_form, self.normed[:, start:], stream,
                             start, self.mtp_caches, options, forced_experts)
        # An entry computed from a draft token is dropped: the last position is recomputed once it is known.
        keep = self.length if following.shape[1] >= len(self.weights.mtp) else self.length - 1
        self.mtp_caches = tuple(cache.truncate(keep) for cache in result.caches)
        return result

    def verify(self, following: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, int]:
        """Feed the next token and the drafts after it in one forward step; keep the drafts the main model
        itself predicts. Returns the new tokens [B, a+1] (the a accepted drafts and the main model's next
        token) and a; the cache keeps only the fed tokens that were accepted."""
        length = self.length
        fed = np.concatenate([np.asarray(following).reshape(-1, 1), drafts], axis=1)
        predicted = np.argmax(self._feed(fed, None).logits, axis=-1)
        accepted = accepted_prefix(drafts, predicted[:, :-1])
        self.truncate(length + accepted + 1)
        return np.concatenate([drafts[:, :accepted], predicted[:, accepted:accepted + 1]], axis=1), accepted

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (main model and MTP)."""
        self.caches = tuple(cache.truncate(length) for cache in self.caches)
        self.mtp_caches = tuple(cache.truncate(min(length, cache.length)) for cache in self.mtp_caches)
        self.tokens, self.normed = self.tokens[:, :length], self.normed[:, :length]
