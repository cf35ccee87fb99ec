"""The reference's weight quantizer, which makes the fp8 operands of the suite's checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv3_conformance.format.fp8 import FP8Error
from dsv3_conformance.reference.fp8 import dequantize_weight, quantize_weight


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_weight_blocks_round_trip_within_half_an_fp8_step(rows, cols, seed):
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    quantized, scale_inv = quantize_weight(weight)
    assert scale_inv.shape == (-(-rows // 128), -(-cols // 128)) and scale_inv.dtype == np.float32
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]  # only real entries: the padding rule
            assert scale_inv[i, j] == np.float32(np.abs(block).max() / np.float32(448))
    restored = dequantize_weight(quantized, scale_inv)
    scale = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[:rows, :cols].astype(np.float64)
    # Half a step of e4m3: 2^-4 relative for normals, 2^-10 of the scale for subnormals.
    bound = np.maximum(np.abs(weight) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
    assert np.all(np.abs(restored - weight) <= bound)


def test_dequantize_refuses_a_scale_of_the_wrong_shape():
    with pytest.raises(FP8Error, match=r"scale of shape \[1, 1\] does not match a weight of shape \[192, 256\]: "
                                       r"expected \[2, 2\]"):
        dequantize_weight(np.zeros((192, 256), ml_dtypes.float8_e4m3fn), np.ones((1, 1), np.float32))
