"""Seeded random checkpoints for any config, shaped like the official golden cases.

Projections ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.1^2), correction biases
~ N(bias_mean, bias_std^2) with a negative mean by default, so that masking with 0 instead of -inf
changes the routing. fp8 configs get e4m3 weights with their block scales. MTP modules hold copies of
the main embedding and head, as the released checkpoint does.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import TensorSpec, expected_tensors

from .fp8 import quantize_weight


def _draw(spec: TensorSpec, rng: np.random.Generator, bias_mean: float, bias_std: float) -> np.ndarray:
    name = spec.name
    if name.endswith("e_score_correction_bias"):
        return rng.normal(bias_mean, bias_std, spec.shape)
    if len(spec.shape) == 1:
        return 1.0 + 0.1 * rng.standard_normal(spec.shape)
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(spec.shape)
    return rng.standard_normal(spec.shape) / np.sqrt(spec.shape[1])


def random_tensors(config: ModelConfig, seed: int, bias_mean: float = -1.0, bias_std: float = 0.5,
                   include_mtp: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint of `config` (HF names), drawn from a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for spec in expected_tensors(config, include_mtp).values():
        if spec.role == "scale":
            continue  # made together with its weight
        values = _draw(spec, rng, bias_mean, bias_std).astype(np.float32)
        if spec.role == "fp8":
            tensors[spec.name], tensors[f"{spec.name}_scale_inv"] = quantize_weight(values)
        else:
            tensors[spec.name] = values
    # The MTP modules' embedding and head are stored copies of the main model's (SEMANTICS.md section 4).
    for depth in range(config.n_mtp_layers if include_mtp else 0):
        prefix = f"model.layers.{config.n_layers + depth}"
        tensors[f"{prefix}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        tensors[f"{prefix}.shared_head.head.weight"] = tensors["lm_head.weight"]
    return tensors
