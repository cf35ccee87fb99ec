"""The SwiGLU feed-forward network of dense layers, routed experts and shared experts."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.numerics import LinearModule, Numerics
from dsv3_conformance.format.weights import FFNWeights

from .linear import linear


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def swiglu_ffn(x: np.ndarray, weights: FFNWeights, numerics: Numerics, module: LinearModule) -> np.ndarray:
    """down(silu(gate(x)) * up(x)); official names w2(silu(w1 x) * w3 x). `module`: which FFN this is."""
    hidden = silu(linear(x, weights.gate_proj, numerics, module)) * linear(x, weights.up_proj, numerics, module)
    return linear(hidden, weights.down_proj, numerics, module)
