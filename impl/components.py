"""The TensorFlow backend's component functions, NumPy in and out (the interface of `reference.components`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.fp8 import FP8Error
from dsv3_conformance.format.numerics import ScaleFormat
from dsv3_conformance.format.weights import GateWeights

from . import fp8, moe


def route(x: np.ndarray, gate: GateWeights, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    weights = GateWeights(tf.constant(gate.weight, tf.float32),
                          None if gate.bias is None else tf.constant(gate.bias, tf.float32))
    gating, experts = moe.route(tf.constant(x, tf.float32), weights, config)
    return gating.numpy(), experts.numpy()


def to_e4m3(x: np.ndarray) -> np.ndarray:
    return fp8.to_e4m3(tf.constant(x)).numpy()


def quantize_activation(x: np.ndarray, scale_fmt: ScaleFormat) -> tuple[np.ndarray, np.ndarray]:
    # Inside the compiled model a NaN reaches the output and the runner refuses it; here it is refused at once.
    if not np.isfinite(x).all():
        raise FP8Error(f"non-finite activation ({np.count_nonzero(~np.isfinite(x))} NaN or Inf values) cannot be "
                       "quantized")
    quantized, scales = fp8.quantize_activation(tf.constant(x, tf.float32), scale_fmt)
    return quantized.numpy(), scales.numpy()


def fp8_gemm(x_q: np.ndarray, x_scale: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    return fp8.fp8_gemm(tf.constant(x_q), tf.constant(x_scale), tf.constant(w_q), tf.constant(w_scale)).numpy()
