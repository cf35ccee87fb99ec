"""RoPE and YaRN in TensorFlow, written independently of the reference (SEMANTICS.md section 2).

Interleaved pairs (2i, 2i+1) rotate by position * freq_i. Angles are computed in float64 inside the
compiled step from the positions, so no table of max_position_embeddings rows is ever built, then
cos and sin are taken in float32.
"""

from __future__ import annotations

import math

import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig, YarnScaling


def base_frequencies(dim: int, theta: float) -> tf.Tensor:
    """theta^(-2i/dim), float64 [dim/2]."""
    exponents = tf.range(0, dim, 2, dtype=tf.float64) / dim
    return tf.pow(tf.constant(theta, tf.float64), -exponents)


def yarn_correction_dim(rotations: float, dim: int, theta: float, original_seq_len: int) -> float:
    """Pair index (fractional) whose wavelength fits `rotations` times in the original context."""
    wavelengths_fit = original_seq_len / (2 * math.pi * rotations)
    return dim * math.log(wavelengths_fit) / (2 * math.log(theta))


def yarn_ramp(yarn: YarnScaling, dim: int, theta: float) -> tf.Tensor:
    """0 for the fast pairs (original frequency kept) rising linearly to 1 (frequency / factor)."""
    low = max(math.floor(yarn_correction_dim(yarn.beta_fast, dim, theta, yarn.original_seq_len)), 0)
    high = min(math.ceil(yarn_correction_dim(yarn.beta_slow, dim, theta, yarn.original_seq_len)), dim - 1)
    width = high - low if high != low else 0.001
    return tf.clip_by_value((tf.range(dim // 2, dtype=tf.float64) - low) / width, 0.0, 1.0)


def yarn_active(config: ModelConfig) -> bool:
    """YaRN applies only to a run longer than the context the model was trained on."""
    return config.rope_scaling is not None and config.rope_scaling.original_seq_len < config.max_seq_len


def rope_frequencies(config: ModelConfig) -> tf.Tensor:
    freqs = base_frequencies(config.qk_rope_head_dim, config.rope_theta)
    if not yarn_active(config):
        return freqs
    ramp = yarn_ramp(config.rope_scaling, config.qk_rope_head_dim, config.rope_theta)
    return ramp * (freqs / config.rope_scaling.factor) + (1 - ramp) * freqs


def yarn_mscale(config: ModelConfig) -> float:
    if not yarn_active(config):
        return 1.0
    return 1.0 + 0.1 * config.rope_scaling.mscale * math.log(config.rope_scaling.factor)


def softmax_scale(config: ModelConfig) -> float:
    return yarn_mscale(config) ** 2 / math.sqrt(config.qk_nope_head_dim + config.qk_rope_head_dim)


def rotation_angles(config: ModelConfig, positions: tf.Tensor) -> tf.Tensor:
    """float64 angles [S, rope_dim/2] for integer positions [S]."""
    return tf.cast(positions, tf.float64)[:, None] * rope_frequencies(config)[None, :]


def apply_rope(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    """Rotate interleaved pairs of x[..., d] in float32; cos and sin broadcast to x[..., d/2]."""
    wide = tf.cast(x, tf.float32)
    pairs = tf.reshape(wide, [*x.shape[:-1], x.shape[-1] // 2, 2])
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = tf.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return tf.cast(tf.reshape(rotated, x.shape), x.dtype)
