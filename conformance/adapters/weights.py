"""What the adapters share: a checkpoint's weights as the float32 arrays an engine takes."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import LinearWeight, ModelWeights, named_tensors

BLOCK = 128  # fp8 weight scales cover 128x128 blocks


def dense(linear: LinearWeight) -> np.ndarray:
    """A linear weight [out, in] in float32: fp8 values times their block scales."""
    weight = np.asarray(linear.weight).astype(np.float32)
    if linear.scale_inv is None:
        return weight
    scales = np.repeat(np.repeat(np.asarray(linear.scale_inv, np.float32), BLOCK, 0), BLOCK, 1)
    return weight * scales[: weight.shape[0], : weight.shape[1]]


def _dequantized(tree):
    if isinstance(tree, LinearWeight):
        return LinearWeight(dense(tree))
    if isinstance(tree, tuple):
        return tuple(_dequantized(item) for item in tree)
    if tree is None or isinstance(tree, np.ndarray):
        return tree
    return type(tree)(**{name: _dequantized(getattr(tree, name)) for name in tree.__dataclass_fields__})


def float32_tensors(weights: ModelWeights, config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor under its Hugging Face checkpoint name in float32, fp8 weights dequantized (no scale tensors)."""
    return {name: np.ascontiguousarray(array, np.float32)
            for name, array in named_tensors(_dequantized(weights), config.replace(fp8_weights=False)).items()}
