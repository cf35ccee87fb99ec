"""Multi-token prediction (report section 2.2; SEMANTICS.md section 4), one function per step.

Depth k at position i reads the main model's state at i after the final norm (depth 1) or depth k-1's
output after its shared_head.norm (k > 1), and the embedding of token t(i+k); it runs a full decoder
block with its own cache at RoPE position i, and its head predicts t(i+k+1).
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.weights import MTPWeights

from .linear import dense
from .norm import rms_norm


def mtp_source(hidden: np.ndarray, normed: np.ndarray) -> np.ndarray:
    """What depth 1 reads of the main model: its last block's output after the final norm."""
    return normed


def tokens_ahead(stream: np.ndarray, depth: int, count: int) -> np.ndarray:
    """t(i+depth) for `count` positions i, from a stream whose column 0 is the token at the first position."""
    return stream[:, depth: depth + count]


def mtp_embedding(embed: np.ndarray, tokens: np.ndarray, start_pos: int, options: MTPOptions) -> np.ndarray:
    """E[t]; zero at sequence position 0 only when the option asks for it."""
    embedding = embed[tokens]
    if options.zero_first_position and start_pos == 0:
        embedding = embedding.copy()
        embedding[:, 0] = 0
    return embedding


def mtp_input(embedding: np.ndarray, hidden: np.ndarray, weights: MTPWeights, config: ModelConfig,
              options: MTPOptions) -> np.ndarray:
    """eh_proj([enorm(embedding); hnorm(hidden)]) (report eq. 21 in the engines' order)."""
    normed_embedding = rms_norm(embedding, weights.enorm, config.rms_norm_eps)
    normed_hidden = rms_norm(hidden, weights.hnorm, config.rms_norm_eps)
    parts = [normed_embedding, normed_hidden] if options.concat == "embedding-first" else [normed_hidden,
                                                                                           normed_embedding]
    return np.concatenate(parts, axis=-1) @ dense(weights.eh_proj, embedding.dtype).T


def mtp_head(block_output: np.ndarray, weights: MTPWeights, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shared_head.norm(y), logits = shared_head.head(shared_head.norm(y)))."""
    normed = rms_norm(block_output, weights.head_norm, config.rms_norm_eps)
    return normed, normed @ weights.head.T


def chained(block_output: np.ndarray, normed: np.ndarray, options: MTPOptions) -> np.ndarray:
    """What depth k+1 reads of depth k: the output after shared_head.norm, or before it (an option)."""
    return normed if options.chain == "normed" else block_output


def accepted_prefix(drafts: np.ndarray, predicted: np.ndarray) -> int:
    """Drafted tokens [B, d] kept: the longest prefix every sequence's verification agrees with."""
    agree = np.cumprod(drafts == predicted, axis=1).sum(axis=1)
    return int(agree.min()) if agree.size else 0
