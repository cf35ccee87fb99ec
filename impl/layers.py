"""TensorFlow building blocks: RMSNorm, linear layers in both numerics paths, SwiGLU."""

from __future__ import annotations

import tensorflow as tf

from conformance.format.numerics import LinearModule, Numerics
from conformance.format.weights import FFNWeights, LinearWeight

from .fp8 import dequantize_weight, fp8_gemm, fp8_training_matmul, quantize_activation


def rms_norm(x: tf.Tensor, weight: tf.Tensor, eps: float) -> tf.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, the statistics in float32."""
    wide = tf.cast(x, tf.float32)
    normed = wide * tf.math.rsqrt(tf.reduce_mean(tf.square(wide), axis=-1, keepdims=True) + eps)
    return tf.cast(normed, x.dtype) * weight


def dense_weight(weight: LinearWeight, dtype: tf.DType) -> tf.Tensor:
    """The weight in `dtype`; fp8 weights are dequantized here, inside the compiled step."""
    if weight.scale_inv is None:
        return tf.convert_to_tensor(weight.weight)
    return dequantize_weight(weight.weight, weight.scale_inv, dtype)


def linear(x: tf.Tensor, weight: LinearWeight, numerics: Numerics, module: LinearModule) -> tf.Tensor:
    """x W^T for x [..., in] in x's dtype, through the numerics path for fp8 weights (`module`: scale format),
    or, training in fp8, with float master weights quantized for every GEMM."""
    if numerics.fp8_training and weight.scale_inv is None:
        return fp8_training_matmul(x, tf.cast(weight.weight, x.dtype))
    if weight.scale_inv is not None and numerics.gemm_impl == "fp8":
        rows = tf.reshape(x, [-1, x.shape[-1]])
        x_q, x_scale = quantize_activation(rows, numerics.scale_format(module))
        out = fp8_gemm(x_q, x_scale, weight.weight, weight.scale_inv)
        return tf.cast(tf.reshape(out, [*x.shape[:-1], weight.weight.shape[0]]), x.dtype)
    return tf.einsum("...k,nk->...n", x, dense_weight(weight, x.dtype))


def swiglu_ffn(x: tf.Tensor, weights: FFNWeights, numerics: Numerics, module: LinearModule) -> tf.Tensor:
    """down(silu(gate(x)) * up(x)) of the dense FFN or the shared experts (`module`)."""
    hidden = tf.nn.silu(linear(x, weights.gate_proj, numerics, module)) * linear(x, weights.up_proj, numerics, module)
    return linear(hidden, weights.down_proj, numerics, module)
