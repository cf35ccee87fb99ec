"""Linear layers in the two official numerics paths (SEMANTICS.md section 5).

`gemm_impl` "bf16": fp8 weights are dequantized and the product is computed in the compute dtype.
`gemm_impl` "fp8": activations are quantized per token per 128 channels and multiplied in fp8 with
128-wide K promotion. Weights stored in a float dtype always take the plain product.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.numerics import LinearModule, Numerics
from dsv3_conformance.format.weights import LinearWeight

from .fp8 import dequantize_weight, fp8_gemm, quantize_activation


def dense(weight: LinearWeight, dtype: np.dtype) -> np.ndarray:
    """The weight as a [out, in] array of `dtype` (dequantized when stored in fp8)."""
    if weight.quantized:
        return dequantize_weight(weight.weight, weight.scale_inv, dtype)
    return weight.weight.astype(dtype, copy=False)


def linear(x: np.ndarray, weight: LinearWeight, numerics: Numerics, module: LinearModule) -> np.ndarray:
    """y = x W^T in x's dtype, through the numerics path for fp8 weights (`module` picks the scale format)."""
    if weight.quantized and numerics.gemm_impl == "fp8":
        x_q, x_scale = quantize_activation(x, numerics.scale_format(module))
        return fp8_gemm(x_q, x_scale, weight.weight, weight.scale_inv, x.dtype)
    return x @ dense(weight, x.dtype).T
