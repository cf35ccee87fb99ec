"""Limited-precision accumulation inside an fp8 GEMM (report section 3.3), as a NumPy model.

Hopper's fp8 tensor cores add each small block of exact fp8 x fp8 products to an accumulator that keeps
only about 14 bits of mantissa. The official recipe therefore promotes: after every 128-wide slice of K
the partial sum is scaled and added in float32 on the CUDA cores, so the short accumulation error never
builds up. This module models the accumulator: products are exact (an e4m3 x e4m3 product has at most 8
significant bits), each `chunk` of them is summed exactly and added to an accumulator rounded to
`mantissa_bits` bits after every addition (toward zero, as the hardware truncates, or to nearest).
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.fp8 import BLOCK


def round_mantissa(x: np.ndarray, bits: int, mode: str = "truncate") -> np.ndarray:
    """x kept to `bits` significant bits (the leading one included), toward zero or to nearest."""
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    scaled = np.ldexp(mantissa, bits)
    kept = np.trunc(scaled) if mode == "truncate" else np.round(scaled)
    return np.ldexp(kept, exponent - bits)


def accumulate(products: np.ndarray, bits: int | None, chunk: int, mode: str = "truncate") -> np.ndarray:
    """Sum products [..., K] chunk by chunk into an accumulator of `bits` mantissa bits (None: exact)."""
    k = products.shape[-1]
    total = np.zeros(products.shape[:-1], np.float64)
    for start in range(0, k, chunk):
        total = total + products[..., start:start + chunk].sum(axis=-1)
        if bits is not None:
            total = round_mantissa(total, bits, mode)
    return total


def modelled_gemm(x_q: np.ndarray, x_scale: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray,
                  bits: int | None, promote_every: int | None = BLOCK, chunk: int = 32,
                  mode: str = "truncate") -> np.ndarray:
    """y = x @ w.T from e4m3 operands with scales, accumulated as the model says.

    promote_every=128: each 128-wide slice of K accumulates in the limited accumulator, is then scaled and
    added in float32 (the official recipe). None: all of K accumulates in the limited accumulator and the
    scales (per-tensor ones: x_scale [M, 1], w_scale [1, 1]) apply once at the end.
    """
    a = np.asarray(x_q).astype(np.float64)
    b = np.asarray(w_q).astype(np.float64)
    products = a[:, None, :] * b[None, :, :]  # [M, N, K], exact in float64
    if promote_every is None:
        return accumulate(products, bits, chunk, mode) * np.asarray(x_scale, np.float64)[:, :1] * \
            np.asarray(w_scale, np.float64).reshape(-1)[0]
    out = np.zeros(products.shape[:2], np.float32)
    column_block = np.arange(b.shape[0]) // BLOCK
    for kb in range(a.shape[1] // promote_every):
        part = accumulate(products[..., kb * promote_every:(kb + 1) * promote_every], bits, chunk, mode)
        scale = np.asarray(x_scale, np.float64)[:, kb, None] * np.asarray(w_scale, np.float64)[column_block, kb][None]
        out = (out + (part * scale).astype(np.float32)).astype(np.float32)
    return out
