"""Rotary position embedding with interleaved pairs and YaRN extension (report sections 2.1.1, 4.3).

Elements (2i, 2i+1) of the rope part form one complex number rotated by position * freq_i
(SEMANTICS.md section 2). Angles are computed in float64.
"""

from __future__ import annotations

import math

import numpy as np

from dsv3_conformance.format.config import ModelConfig, YarnScaling


def base_frequencies(dim: int, theta: float) -> np.ndarray:
    """freq_i = theta^(-2i/dim) for i in [0, dim/2)."""
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def yarn_correction_dim(rotations: float, dim: int, theta: float, original_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits `rotations` times into the original context."""
    return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(yarn: YarnScaling, dim: int, theta: float) -> np.ndarray:
    """Per pair: 0 keeps the original frequency (fast pairs, beta_fast side), 1 divides it by the factor."""
    low = math.floor(yarn_correction_dim(yarn.beta_fast, dim, theta, yarn.original_seq_len))
    high = math.ceil(yarn_correction_dim(yarn.beta_slow, dim, theta, yarn.original_seq_len))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the official guard against a zero-width ramp
    return np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def yarn_active(config: ModelConfig) -> bool:
    """The official code extends rope only when the run is longer than the trained context (original_seq_len)."""
    return config.rope_scaling is not None and config.max_seq_len > config.rope_scaling.original_seq_len


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Frequencies of the rope pairs, blended towards freq/factor by YaRN when it is active."""
    freqs = base_frequencies(config.qk_rope_head_dim, config.rope_theta)
    if not yarn_active(config):
        return freqs
    ramp = yarn_ramp(config.rope_scaling, config.qk_rope_head_dim, config.rope_theta)
    return freqs / config.rope_scaling.factor * ramp + freqs * (1 - ramp)


def yarn_mscale(config: ModelConfig) -> float:
    """m = 0.1 * mscale * ln(factor) + 1 when YaRN is active, else 1."""
    if not yarn_active(config):
        return 1.0
    return 0.1 * config.rope_scaling.mscale * math.log(config.rope_scaling.factor) + 1.0


def softmax_scale(config: ModelConfig) -> float:
    """Attention logit scale: (nope + rope)^-0.5, times m^2 under YaRN."""
    return config.qk_head_dim ** -0.5 * yarn_mscale(config) ** 2


def rotation_angles(config: ModelConfig, positions: np.ndarray) -> np.ndarray:
    """Angles [len(positions), rope_dim/2] = position * freq."""
    return np.outer(np.asarray(positions, dtype=np.float64), rope_frequencies(config))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs of x[..., rope_dim]; cos and sin broadcast to x[..., rope_dim/2]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rotated = np.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape)
