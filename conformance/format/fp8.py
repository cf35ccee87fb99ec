"""Format constants of DeepSeek-V3's fp8 checkpoints (README_WEIGHTS.md of the release).

Weights are stored as e4m3fn (largest finite value 448, no infinity, NaN = all bits but the sign) in
128x128 blocks, each with a float32 `weight_scale_inv`; a block cut by the matrix edge counts as a whole
block. How values are quantized and multiplied is math, written by each backend.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsv3_conformance.format.errors import BadInput

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
BLOCK = 128


class FP8Error(BadInput):
    """Shapes or values the fp8 path cannot take."""


def scale_shape(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
    """Shape of the block-scale grid of a [out, in] weight: partial blocks count as whole ones."""
    return (-(-shape[0] // block), -(-shape[1] // block))
