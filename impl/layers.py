"""TensorFlow building blocks: RMSNorm, linear layers in both numerics paths, SwiGLU."""

from __future__ import annotations

import tensorflow as tf

from dsv3_conformance.format.numerics import LinearModule, Numerics
from dsv3_conformance.format.weights import FFNWeights, LinearWeight

from . import matvec
from .fp8 import dequantize_weight, fp8_gemm, fp8_training_matmul, quantize_activation


def rms_norm(x: tf.Tensor, weight: tf.Tensor, eps: float) -> tf.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, the statistics in float32."""
    wide = tf.cast(x, tf.float32)
    normed = wide * tf.math.rsqrt(tf.reduce_mean(tf.square(wide), axis=-1, keepdims=True) + eps)
    return tf.cast(normed, x.dtype) * weight


# Up to this many rows (a decode step's tokens), x W^T is computed as (W x^T)^T: with the weight as the left
# operand XLA's CPU dot reads it in place, where x W^T has it fuse a copy into a slower loop.
MATVEC_ROWS = 8


def project(x: tf.Tensor, weight: tf.Tensor, stored: bool = False) -> tf.Tensor:
    """x [..., in] @ weight [out, in]^T (an einsum outside XLA: a 2-D matmul of the flattened rows was slower).
    `stored`: the weight is a stored float tensor, which a decode step's few rows multiply in place on every core
    (impl.matvec) rather than through XLA's one-core product; a computed weight (dequantized fp8) stays in XLA."""
    rows = x.shape[:-1].num_elements()
    if rows is not None and rows <= MATVEC_ROWS:
        flat = tf.reshape(x, [rows, x.shape[-1]])
        if stored and matvec.applies(x, weight.shape):
            out = matvec.matvec(flat, weight[None], 0)
        else:
            out = tf.transpose(tf.matmul(weight, flat, transpose_b=True))
        return tf.reshape(out, [*x.shape[:-1], weight.shape[0]])
    return tf.einsum("...k,nk->...n", x, weight)


def head_logits(x: tf.Tensor, head: tf.Tensor) -> tf.Tensor:
    """x [B, S, dim] @ head [V, dim]^T. In float32 through `project`: as an einsum, XLA transposes the whole
    head on every decode step. bfloat16 keeps the einsum, whose rounding the fp8-path bfloat16 cross check's
    bound was measured with (TOLERANCES.md section 6)."""
    if x.dtype == tf.float32:
        return project(x, head, stored=True)
    return tf.einsum("bsd,vd->bsv", x, head)


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
    return project(x, dense_weight(weight, x.dtype), stored=weight.scale_inv is None)


def silu(x: tf.Tensor) -> tf.Tensor:
    """x * sigmoid(x) in float32, rounded once to x's dtype; written as x / (1 + e^-x) since outside XLA
    TensorFlow fuses x * sigmoid(x) into a oneDNN kernel that is slower on the small expert groups of a prefill."""
    wide = tf.cast(x, tf.float32)
    return tf.cast(wide / (1 + tf.exp(-wide)), x.dtype)


def swiglu_ffn(x: tf.Tensor, weights: FFNWeights, numerics: Numerics, module: LinearModule) -> tf.Tensor:
    """down(silu(gate(x)) * up(x)) of the dense FFN or the shared experts (`module`); a decode step's few rows
    against stored float32 weights in one kernel call (impl.matvec.experts: one expert, every row a copy of weight
    1)."""
    rows = x.shape[:-1].num_elements()
    projections = (weights.gate_proj, weights.up_proj, weights.down_proj)
    stored = not numerics.fp8_training and all(p.scale_inv is None for p in projections)
    if stored and rows is not None and rows <= MATVEC_ROWS and matvec.applies(x, weights.gate_proj.weight.shape):
        flat = tf.reshape(x, [rows, x.shape[-1]])
        out = matvec.experts(flat, *(p.weight[None] for p in projections), tf.zeros([rows], tf.int32), tf.range(rows),
                             tf.ones([rows], tf.float32))
        return tf.reshape(out, x.shape)
    hidden = silu(linear(x, weights.gate_proj, numerics, module)) * linear(x, weights.up_proj, numerics, module)
    return linear(hidden, weights.down_proj, numerics, module)
