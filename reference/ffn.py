"""The SwiGLU feed-forward network of dense layers, routed experts and shared experts."""

from __future__ import annotations

import numpy as np

from conformance.format.numerics import Numerics
from conformance.format.weights import FFNWeights

from .linear import linear


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def swiglu_ffn(x: np.ndarray, weights: FFNWeights, numerics: Numerics) -> np.ndarray:
    """down(silu(gate(x)) * up(x)); official names w2(silu(w1 x) * w3 x)."""
    hidden = silu(linear(x, weights.gate_proj, numerics)) * linear(x, weights.up_proj, numerics)
    return linear(hidden, weights.down_proj, numerics)
