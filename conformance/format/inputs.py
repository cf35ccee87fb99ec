"""Validation of the token batches a model is fed."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.errors import BadInput


class InputError(BadInput):
    """Tokens or positions the model cannot take."""


def check_tokens(tokens: np.ndarray, config: ModelConfig, start_pos: int = 0) -> np.ndarray:
    """Token ids [B, S] as int64, after checking their range and that they fit in max_seq_len."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise InputError(f"tokens must have shape [batch, seq] with batch, seq >= 1, got {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"token ids must be integers, got dtype {tokens.dtype}")
    bad = (tokens < 0) | (tokens >= config.vocab_size)
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"token id {int(tokens[position])} at {list(position)} is outside "
                         f"[0, vocab_size={config.vocab_size})")
    if start_pos + tokens.shape[1] > config.max_seq_len:
        raise InputError(f"positions up to {start_pos + tokens.shape[1] - 1} exceed "
                         f"max_position_embeddings={config.max_seq_len}")
    return tokens.astype(np.int64)
