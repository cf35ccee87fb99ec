"""FP8 in TensorFlow: the harness cast rule, block dequantization, activation quantization, blockwise GEMM.

Semantics: SEMANTICS.md section 5 (written here independently of the reference). TensorFlow's own cast to e4m3fn gives NaN beyond the range
(measured with TF 2.21: 500 -> NaN, where torch saturates to 448), so every cast here clips first: the
harness rule is saturate to +-448, keep NaN, round to nearest even.
"""

from __future__ import annotations

import math

import tensorflow as tf

from dsv3_conformance.format.fp8 import BLOCK, E4M3_MAX, FP8Error
from dsv3_conformance.format.numerics import ScaleFormat

E4M3 = tf.as_dtype("float8_e4m3fn")
# The official activation quantizer never divides by less than this amax (zero rows get a finite scale).
ACT_AMAX_FLOOR = 1e-4


E4M3_MIN_NORMAL = 2.0 ** -6  # below it e4m3 is subnormal, spaced 2^-9
E4M3_DROPPED_BITS = 20  # float32 keeps 23 mantissa bits, e4m3 3


def round_to_e4m3_grid(x: tf.Tensor) -> tf.Tensor:
    """Float32 x (within +-448) rounded to the nearest e4m3 value, ties to even, still in float32.

    Inside some fusions XLA on the CPU converts float32 to e4m3 through float16, rounding twice: an expert's
    hidden value -123.995 became -124 (float16), a tie, then -128, where the nearest e4m3 is -120 (measured in
    a decode step of golden/official/v3-tiny-fp8-act: 2% off in that expert's output, 3e-2 in the logits).
    So the rounding is done here, once and exactly, and the cast that follows is exact on any route: normal
    numbers drop 20 mantissa bits to nearest-even on their bits, subnormals round x * 2^9 to an integer
    (tf.round: ties to even). NaN stays NaN."""
    bits = tf.bitcast(x, tf.int32)
    odd = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, E4M3_DROPPED_BITS), 1)
    half = (1 << (E4M3_DROPPED_BITS - 1)) - 1
    kept = ~((1 << E4M3_DROPPED_BITS) - 1)
    normal = tf.bitcast(tf.bitwise.bitwise_and(bits + half + odd, kept), tf.float32)
    subnormal = tf.round(x * 2.0 ** 9) * 2.0 ** -9
    rounded = tf.where(tf.abs(x) < E4M3_MIN_NORMAL, subnormal, normal)
    return tf.where(tf.math.is_nan(x), x, rounded)


def e4m3_grid(x: tf.Tensor) -> tf.Tensor:
    """The values to_e4m3 gives, still in float32 (for what cannot carry float8, such as DTensor): clipped to
    +-448 first (NaN passes through the clip), then rounded to nearest-even by `round_to_e4m3_grid`."""
    return round_to_e4m3_grid(tf.clip_by_value(tf.cast(x, tf.float32), -E4M3_MAX, E4M3_MAX))


def to_e4m3(x: tf.Tensor) -> tf.Tensor:
    """Cast to e4m3fn under the harness rule, exact whatever XLA fuses the cast with (`e4m3_grid`)."""
    return tf.cast(e4m3_grid(x), E4M3)


def e4m3_values(weight: tf.Tensor) -> tf.Tensor:
    """Float32 values of e4m3 weights, held as e4m3 or as their bytes (uint8: the routed expert stacks, which
    impl.model keeps as bytes since XLA on the CPU widens an fp8 operand of anything but a convert to f16 whole:
    gathering one expert from an fp8 stack widened every expert, every step).

    From the bits s eeee mmm: a normal number 2^(e-7) (1 + m/8) is the float32 with exponent e + 120 and those
    three mantissa bits on top; exponent 0 is m 2^-9; s 1111 111 is NaN (e4m3fn has no infinity)."""
    if weight.dtype != tf.uint8:
        return tf.cast(weight, tf.float32)
    bits = tf.cast(weight, tf.int32)
    magnitude = tf.bitwise.bitwise_and(bits, 0x7F)
    normal = tf.bitcast(tf.bitwise.left_shift(magnitude + (120 << 3), 20), tf.float32)
    value = tf.where(magnitude < 8, tf.cast(magnitude, tf.float32) * 2.0 ** -9, normal)
    value = tf.where(magnitude == 0x7F, tf.constant(float("nan")), value)
    return tf.where(bits >= 0x80, -value, value)


def expand_block_scales(scale_inv: tf.Tensor, rows: int, cols: int) -> tf.Tensor:
    """Block scales [..., ceil(rows/128), ceil(cols/128)] broadcast to every element [..., rows, cols]."""
    repeated = tf.repeat(tf.repeat(scale_inv, BLOCK, axis=-2), BLOCK, axis=-1)
    return repeated[..., :rows, :cols]


def dequantize_weight(weight: tf.Tensor, scale_inv: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """q * scale_inv in float32, then `dtype`; works on stacked weights [..., out, in] too."""
    rows, cols = weight.shape[-2], weight.shape[-1]
    return tf.cast(e4m3_values(weight) * expand_block_scales(scale_inv, rows, cols), dtype)


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


def in_blocks(x: tf.Tensor) -> tf.Tensor:
    """[..., K] as [..., K/128, 128]; the leading dimensions may be unknown until run time (a prefill's expert
    groups outside XLA)."""
    return tf.reshape(x, tf.concat([tf.shape(x)[:-1], [x.shape[-1] // BLOCK, BLOCK]], axis=0))


def activation_scales(x: tf.Tensor, scale_fmt: ScaleFormat) -> tf.Tensor:
    """Float32 scales [..., K/128]: max(amax, 1e-4)/448 per token per 128 channels, rounded by `scale_fmt`."""
    width = x.shape[-1]
    if width % BLOCK:
        raise FP8Error(f"activation width {width} is not a multiple of {BLOCK}, as the fp8 path needs")
    grouped = in_blocks(tf.abs(tf.cast(x, tf.float32)))
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
    grouped = in_blocks(tf.cast(x, tf.float32))
    return tf.reshape(to_e4m3(grouped / scales[..., None]), tf.shape(x)), scales


def fp8_gemm(x_q: tf.Tensor, x_scale: tf.Tensor, w_q: tf.Tensor, w_scale: tf.Tensor) -> tf.Tensor:
    """Float32 x @ w^T from e4m3 operands with 128-wide K promotion.

    x_q [M, K] with w_q [N, K], or per-group x_q [G, M, K] with w_q [G, N, K]; scales [.., K/128] and
    [.., ceil(N/128), K/128]. Each K block's product is exact, then float32, scaled by both scales, and
    the blocks are summed in float32.
    """
    k = x_q.shape[-1]
    if k % BLOCK or w_q.shape[-1] != k:
        raise FP8Error(f"the fp8 GEMM needs equal K divisible by {BLOCK}, got {k} and {w_q.shape[-1]}")
    row_scale = tf.repeat(w_scale, BLOCK, axis=-2)[..., : w_q.shape[-2], :]  # each weight row's block scales
    return _row_scaled_gemm(x_q, x_scale, w_q, row_scale)


def quantize_weight(weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """e4m3 weights [..., out, in] and float32 scales [..., ceil(out/128), ceil(in/128)]: amax / 448 per 128 x 128
    block, a block cut by the edge zero-padded before its amax (an all-zero block gets scale 1)."""
    *lead, rows, cols = weight.shape
    row_blocks, col_blocks = -(-rows // BLOCK), -(-cols // BLOCK)
    wide = tf.cast(weight, tf.float32)
    padded = tf.pad(wide, [[0, 0]] * len(lead) + [[0, row_blocks * BLOCK - rows], [0, col_blocks * BLOCK - cols]])
    blocks = tf.reshape(padded, [*lead, row_blocks, BLOCK, col_blocks, BLOCK])
    amax = tf.reduce_max(tf.abs(blocks), axis=[-3, -1])
    scales = tf.where(amax > 0, amax / E4M3_MAX, tf.ones_like(amax))
    return to_e4m3(wide / expand_block_scales(scales, rows, cols)), scales


def _row_scaled_gemm(a_q: tf.Tensor, a_scale: tf.Tensor, b_q: tf.Tensor, b_scale: tf.Tensor) -> tf.Tensor:
    """a [..., M, K] @ b [..., N, K]^T where both operands carry a scale per row and 128-wide slice of K (the
    weight's block scales repeated over its rows in `fp8_gemm`; the Wgrad GEMM's two 128x1-tiled activation
    operands as they are): each slice's product exact, rounded to float32 once, scaled by both, summed in float32.

    A slice's 128 e4m3 products are multiples of 2^-18 below 2^18, so their sum has at most 43 significant bits:
    float64 holds it exactly in any order. Summed in float32, the order XLA picks depends on the shape (one row
    or several: sums an ulp apart, measured), and an ulp can flip a later e4m3 rounding."""
    a, b = (in_blocks(tf.cast(e4m3_values(operand), tf.float64)) for operand in (a_q, b_q))
    partial = tf.cast(tf.einsum("...mbk,...nbk->...mnb", a, b), tf.float32)
    return tf.reduce_sum(partial * tf.expand_dims(a_scale, -2) * tf.expand_dims(b_scale, -3), axis=-1)


def _pad_rows(x: tf.Tensor, multiple: int) -> tf.Tensor:
    extra = -x.shape[-2] % multiple
    return tf.pad(x, [[0, 0]] * (len(x.shape) - 2) + [[0, extra], [0, 0]]) if extra else x


def fp8_training_matmul(x: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """x [..., K] @ weight [N, K]^T, or per group x [G, M, K] @ weight [G, N, K]^T, with the three GEMMs of
    training in fp8 (`_fp8_training_gemm`)."""
    if len(weight.shape) == 2:
        flat = tf.reshape(x, [-1, x.shape[-1]])
        return tf.reshape(_fp8_training_gemm(flat, weight), [*x.shape[:-1], weight.shape[0]])
    return _fp8_training_gemm(x, weight)


@tf.custom_gradient
def _fp8_training_gemm(x: tf.Tensor, weight: tf.Tensor):
    """x [M, K] @ weight [N, K]^T (or both with a leading group dimension), all three GEMMs in fp8.

    Fprop: x quantized per row and 128 channels (1x128), the weight in 128x128 blocks. Dgrad (dx = dy W): dy
    1x128 along N, W^T in 128x128 blocks. Wgrad (dW = dy^T x): both operands quantized along the token
    dimension in 128x1 tiles (rows of dy^T and x^T), tokens zero-padded to a multiple of 128. Every GEMM
    promotes each 128-wide slice to float32; a contraction not a multiple of 128 is zero-padded (the 576-wide
    kv_a output of the released model, in Dgrad).
    """
    def transpose(t: tf.Tensor) -> tf.Tensor:
        return tf.linalg.matrix_transpose(t)

    def pad_last(t: tf.Tensor) -> tf.Tensor:  # zeros to a multiple of 128 columns (they add nothing)
        extra = -t.shape[-1] % BLOCK
        return tf.pad(t, [[0, 0]] * (len(t.shape) - 1) + [[0, extra]]) if extra else t

    x_q, x_scale = quantize_activation(pad_last(x), None)
    w_q, w_scale = quantize_weight(pad_last(weight))
    out = tf.cast(fp8_gemm(x_q, x_scale, w_q, w_scale), x.dtype)

    def grad(dy: tf.Tensor):
        dy_q, dy_scale = quantize_activation(pad_last(dy), None)
        wt_q, wt_scale = quantize_weight(pad_last(transpose(weight)))
        dx = tf.cast(fp8_gemm(dy_q, dy_scale, wt_q, wt_scale), x.dtype)
        dy_t_q, dy_t_scale = quantize_activation(transpose(_pad_rows(dy, BLOCK)), None)
        x_t_q, x_t_scale = quantize_activation(transpose(_pad_rows(x, BLOCK)), None)
        dw = tf.cast(_row_scaled_gemm(dy_t_q, dy_t_scale, x_t_q, x_t_scale), weight.dtype)
        return dx, dw

    return out, grad
