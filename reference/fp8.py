"""FP8 (e4m3fn) numerics: weight blocks, online activation quantization, the blockwise GEMM.

Report section 3.3 and SEMANTICS.md section 5. Weights: 128x128 blocks with a float32 `scale_inv` = block amax / 448.
Activations: per token per 128 channels, s = max(amax, 1e-4) / 448, optionally rounded up to a power of two
(ue8m0). GEMM: an exact fp8 x fp8 product per 128-wide slice of K, scaled by both scales and summed.

Cast rule of this harness (frameworks differ: torch saturates, TensorFlow and ml_dtypes give NaN): values
beyond +-448 saturate to +-448, NaN stays NaN, everything else rounds to nearest even.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.fp8 import BLOCK, E4M3, E4M3_MAX, FP8Error, scale_shape
from dsv3_conformance.format.numerics import ScaleFormat

# Smallest activation amax used for a scale (official act_quant); avoids a zero scale for zero rows.
ACT_AMAX_FLOOR = 1e-4


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """Cast to e4m3fn under the harness rule: saturate to +-448, keep NaN, round to nearest even."""
    x = np.asarray(x)
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _blocked(x: np.ndarray) -> np.ndarray:
    """[out, in] zero-padded to whole blocks and viewed as [out_blocks, 128, in_blocks, 128]."""
    rows, cols = scale_shape(x.shape)
    padded = np.zeros((rows * BLOCK, cols * BLOCK), dtype=x.dtype)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(rows, BLOCK, cols, BLOCK)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a [out, in] weight into e4m3 blocks and their float32 `scale_inv` (README_WEIGHTS.md)."""
    weight = np.asarray(weight, dtype=np.float32)
    blocks = _blocked(weight)
    # Padding is zero, so it never raises a block's amax (the padding rule).
    scale_inv = (np.abs(blocks).max(axis=(1, 3)) / np.float32(E4M3_MAX)).astype(np.float32)
    safe = np.where(scale_inv > 0, scale_inv, np.float32(1))[:, None, :, None]
    quantized = to_e4m3(blocks / safe).reshape(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)
    return quantized[: weight.shape[0], : weight.shape[1]], scale_inv


def dequantize_weight(quantized: np.ndarray, scale_inv: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The dense weight q * scale_inv, each scale broadcast over its block."""
    expected = scale_shape(quantized.shape)
    if tuple(scale_inv.shape) != expected:
        raise FP8Error(f"scale of shape {list(scale_inv.shape)} does not match a weight of shape "
                       f"{list(quantized.shape)}: expected {list(expected)} for {BLOCK}x{BLOCK} blocks")
    # One block row at a time, in place: a 940 MB float64 weight takes no second, expanded copy of its scales.
    dense = quantized.astype(dtype)
    columns = np.repeat(scale_inv.astype(dtype), BLOCK, axis=1)[:, : quantized.shape[1]]
    for row_block, scales in enumerate(columns):
        dense[row_block * BLOCK:(row_block + 1) * BLOCK] *= scales
    return dense


def round_up_to_power_of_two(scales: np.ndarray) -> np.ndarray:
    """The smallest power of two >= each positive scale (ue8m0 "all"), exactly, from the binary exponent."""
    mantissa, exponent = np.frexp(scales)
    return np.where(mantissa == 0.5, scales, np.ldexp(np.ones_like(scales), exponent)).astype(scales.dtype)


def round_up_as_official(scales: np.ndarray) -> np.ndarray:
    """The official kernel's ue8m0: 2^ceil(log2 s) with log2 rounded to float32 ("ue8m0-log2f").

    For s just above a power of two 2^e, log2 s = e + (tiny) rounds to exactly e in float32, so the scale
    becomes 2^e < s and the block's amax quantizes beyond 448 (it saturates). Modelled here as a correctly
    rounded float32 log2 (float64 log2, then float32).
    """
    exponent = np.ceil(np.log2(scales.astype(np.float64)).astype(np.float32))
    return np.exp2(exponent.astype(np.float64)).astype(scales.dtype)


def activation_scales(x: np.ndarray, scale_fmt: ScaleFormat = None) -> np.ndarray:
    """Float32 scales per token per 128 channels: max(amax, 1e-4)/448, rounded by `scale_fmt`."""
    if x.shape[-1] % BLOCK:
        raise FP8Error(f"activation width {x.shape[-1]} is not a multiple of {BLOCK}, as the fp8 path needs")
    if scale_fmt not in (None, "ue8m0", "ue8m0-log2f"):
        raise FP8Error(f"unknown scale format {scale_fmt!r}: expected 'ue8m0', 'ue8m0-log2f' or none")
    if not np.all(np.isfinite(x)):
        raise FP8Error(f"non-finite activation ({np.count_nonzero(~np.isfinite(x))} NaN or Inf values) cannot be "
                       "quantized: its block scale would be NaN or Inf")
    grouped = np.abs(x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)).astype(np.float32)
    scales = np.maximum(grouped.max(axis=-1), np.float32(ACT_AMAX_FLOOR)) / np.float32(E4M3_MAX)
    if scale_fmt == "ue8m0":
        scales = round_up_to_power_of_two(scales)
    elif scale_fmt == "ue8m0-log2f":
        scales = round_up_as_official(scales)
    return scales.astype(np.float32)


def quantize_activation(x: np.ndarray, scale_fmt: ScaleFormat = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize activations [..., K] to e4m3 with per-token per-128 scales [..., K/128]."""
    scales = activation_scales(x, scale_fmt)
    grouped = x.reshape(*x.shape[:-1], -1, BLOCK) / scales[..., None].astype(x.dtype)
    return to_e4m3(grouped).reshape(x.shape), scales


def fp8_gemm(x_q: np.ndarray, x_scale: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray,
             dtype=np.float64) -> np.ndarray:
    """y = x @ w.T from e4m3 operands, promoted to `dtype` after every 128-wide slice of K.

    Each slice's fp8 product is exact in float64 (at most 42 significant bits), then scaled by the
    token's activation scale and the weight block's scale and accumulated.
    """
    out_features, k = w_q.shape
    if x_q.shape[-1] != k:
        raise FP8Error(f"activation width {x_q.shape[-1]} does not match weight input width {k}")
    if k % BLOCK:
        raise FP8Error(f"the fp8 GEMM needs K % {BLOCK} == 0, got K = {k}")
    rows = x_q.reshape(-1, k).astype(np.float64)
    row_scales = x_scale.reshape(-1, k // BLOCK).astype(dtype)
    weight = w_q.astype(np.float64)
    column_block = np.arange(out_features) // BLOCK
    out = np.zeros((rows.shape[0], out_features), dtype=dtype)
    for kb in range(k // BLOCK):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = (rows[:, cols] @ weight[:, cols].T).astype(dtype)
        out += partial * row_scales[:, kb, None] * w_scale[column_block, kb].astype(dtype)[None, :]
    return out.reshape(*x_q.shape[:-1], out_features)
