"""FP8 in TensorFlow: the harness cast rule, block dequantization, activation quantization, blockwise GEMM.

Semantics: SEMANTICS.md section 5 (written here independently of the reference). TensorFlow's own cast to e4m3fn gives NaN beyond the range
(measured with TF 2.21: 500 -> NaN, where torch saturates to 448), so every cast here clips first: the
harness rule is saturate to +-448, keep NaN, round to nearest even.
"""

from __future__ import annotations

import math

import tensorflow as tf

from conformance.format.fp8 import BLOCK, E4M3_MAX, FP8Error
from conformance.format.numerics import ScaleFormat

E4M3 = tf.as_dtype("float8_e4m3fn")
# The official activation quantizer never divides by less than this amax (zero rows get a finite scale).
ACT_AMAX_FLOOR = 1e-4


def to_e4m3(x: tf.Tensor) -> tf.Tensor:
    """Cast to e4m3fn under the harness rule (clip to +-448 first; NaN passes through the clip)."""
    return tf.cast(tf.clip_by_value(tf.cast(x, tf.float32), -E4M3_MAX, E4M3_MAX), E4M3)


def expand_block_scales(scale_inv: tf.Tensor, rows: int, cols: int) -> tf.Tensor:
    """Block scales [..., ceil(rows/128), ceil(cols/128)] broadcast to every element [..., rows, cols]."""
    repeated = tf.repeat(tf.repeat(scale_inv, BLOCK, axis=-2), BLOCK, axis=-1)
    return repeated[..., :rows, :cols]


def dequantize_weight(weight: tf.Tensor, scale_inv: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """q * scale_inv in float32, then `dtype`; works on stacked weights [..., out, in] too."""
    rows, cols = weight.shape[-2], weight.shape[-1]
    return tf.cast(tf.cast(weight, tf.float32) * expand_block_scales(scale_inv, rows, cols), dtype)


def round_up_to_power_of_two(scales: tf.Tensor) -> tf.Tensor:
    """The smallest power of two >= each positive float32 scale, from its bits (exact; ue8m0 "all")."""
    bits = tf.bitcast(scales, tf.int32)
    exponent = tf.bitwise.right_shift(bits, 23)
    has_fraction = tf.bitwise.bitwise_and(bits, 0x7FFFFF) != 0
    exponent = exponent + tf.cast(has_fraction, tf.int32)
    return tf.bitcast(tf.bitwise.left_shift(exponent, 23), tf.float32)


def round_up_as_official(scales: tf.Tensor) -> tf.Tensor:
    """2^ceil(log2 s) with log2 s first rounded to float32, as the official kernel computes it.

    log2 comes from a float64 natural log, then float32; the power of two is built from its bits (scales
    here are normal floats: at least 1e-4/448).
    """
    log2 = tf.cast(tf.math.log(tf.cast(scales, tf.float64)) / math.log(2.0), tf.float32)
    biased = tf.cast(tf.math.ceil(log2), tf.int32) + 127
    return tf.bitcast(tf.bitwise.left_shift(biased, 23), tf.float32)


def activation_scales(x: tf.Tensor, scale_fmt: ScaleFormat) -> tf.Tensor:
    """Float32 scales [..., K/128]: max(amax, 1e-4)/448 per token per 128 channels, rounded by `scale_fmt`."""
    width = x.shape[-1]
    if width % BLOCK:
        raise FP8Error(f"activation width {width} is not a multiple of {BLOCK}, as the fp8 path needs")
    grouped = tf.reshape(tf.abs(tf.cast(x, tf.float32)), [*x.shape[:-1], width // BLOCK, BLOCK])
    scales = tf.maximum(tf.reduce_max(grouped, axis=-1), ACT_AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        return round_up_to_power_of_two(scales)
    if scale_fmt == "ue8m0-log2f":
        return round_up_as_official(scales)
    if scale_fmt is not None:
        raise FP8Error(f"unknown scale format {scale_fmt!r}: expected 'ue8m0', 'ue8m0-log2f' or none")
    return scales


def quantize_activation(x: tf.Tensor, scale_fmt: ScaleFormat) -> tuple[tf.Tensor, tf.Tensor]:
    """e4m3 activations [..., K] and their float32 scales [..., K/128]."""
    scales = activation_scales(x, scale_fmt)
    grouped = tf.reshape(tf.cast(x, tf.float32), [*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK])
    return tf.reshape(to_e4m3(grouped / scales[..., None]), x.shape), scales


def fp8_gemm(x_q: tf.Tensor, x_scale: tf.Tensor, w_q: tf.Tensor, w_scale: tf.Tensor) -> tf.Tensor:
    """Float32 x @ w^T from e4m3 operands with 128-wide K promotion.

    x_q [M, K] with w_q [N, K], or per-group x_q [G, M, K] with w_q [G, N, K]; scales [.., K/128] and
    [.., ceil(N/128), K/128]. Each K block's product accumulates in float32, is scaled by both scales, and
    the blocks are summed in float32.
    """
    k = x_q.shape[-1]
    if k % BLOCK or w_q.shape[-1] != k:
        raise FP8Error(f"the fp8 GEMM needs equal K divisible by {BLOCK}, got {k} and {w_q.shape[-1]}")
    blocks = k // BLOCK
    x_blocks = tf.reshape(tf.cast(x_q, tf.float32), [*x_q.shape[:-1], blocks, BLOCK])
    w_blocks = tf.reshape(tf.cast(w_q, tf.float32), [*w_q.shape[:-1], blocks, BLOCK])
    grouped = len(w_q.shape) == 3
    partial = tf.einsum("gmbk,gnbk->gmnb" if grouped else "mbk,nbk->mnb", x_blocks, w_blocks)
    column_scale = tf.repeat(w_scale, BLOCK, axis=-2)[..., : w_q.shape[-2], :]
    return tf.reduce_sum(partial * x_scale[..., :, None, :] * column_scale[..., None, :, :], axis=-1)
