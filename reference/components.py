"""The component functions every backend exposes to the suite, NumPy in and out (here: the reference's own).

route(x [T, dim], GateWeights, config) -> (weights [T, k], experts [T, k])
to_e4m3(x) -> x cast by the harness rule (saturate to +-448, keep NaN, round to nearest even)
quantize_activation(x [..., K], scale format None | 'ue8m0' | 'ue8m0-log2f') -> (e4m3 [..., K], float32 scales
    [..., K/128]); FP8Error on NaN or Inf
fp8_gemm(x_q, x_scale, w_q, w_scale) -> x @ w.T with 128-wide K promotion
"""

from .fp8 import fp8_gemm, quantize_activation, to_e4m3
from .moe import route

__all__ = ["fp8_gemm", "quantize_activation", "route", "to_e4m3"]
