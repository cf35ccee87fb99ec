"""Linear layers in the two official numerics paths (SPEC section 5).

`gemm_impl` "bf16": fp8 weights are dequantized and the product is computed in the compute dtype.
`gemm_impl` "fp8": activations are quantized per token per 128 channels and multiplied in fp8 with
128-wide K promotion. Weights stored in a float dtype always take the plain product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .fp8 import dequantize_weight, fp8_gemm, quantize_activation
from .weights import LinearWeight


@dataclass(frozen=True)
class Numerics:
    """How fp8 weights are multiplied: dequantized ("bf16") or with quantized activations ("fp8")."""

    gemm_impl: Literal["bf16", "fp8"] = "bf16"
    scale_fmt: Literal["ue8m0"] | None = None

    def __post_init__(self) -> None:
        if self.gemm_impl not in ("bf16", "fp8"):
            raise ValueError(f"unknown gemm_impl {self.gemm_impl!r}: expected 'bf16' or 'fp8'")
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"unknown scale_fmt {self.scale_fmt!r}: expected 'ue8m0' or none")


def dense(weight: LinearWeight, dtype: np.dtype) -> np.ndarray:
    """The weight as a [out, in] array of `dtype` (dequantized when stored in fp8)."""
    if weight.quantized:
        return dequantize_weight(weight.weight, weight.scale_inv, dtype)
    return weight.weight.astype(dtype, copy=False)


def linear(x: np.ndarray, weight: LinearWeight, numerics: Numerics) -> np.ndarray:
    """y = x W^T in x's dtype, through the numerics path for fp8 weights."""
    if weight.quantized and numerics.gemm_impl == "fp8":
        x_q, x_scale = quantize_activation(x, numerics.scale_fmt)
        return fp8_gemm(x_q, x_scale, weight.weight, weight.scale_inv, x.dtype)
    return x @ dense(weight, x.dtype).T
