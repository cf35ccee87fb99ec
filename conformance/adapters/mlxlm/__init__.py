"""mlx-lm's `deepseek_v3` model on MLX's CPU build, as the backend `mlxlm` (float32, or bfloat16 as its users run
it). Installed by the `mlxlm` extra and found by entry point (`dsv3_conformance.backends`)."""

from __future__ import annotations

from dsv3_conformance.backends import Backend


def _runner(config, weights, numerics, dtype, attention_form):
    from dsv3_conformance.adapters.mlxlm.runner import MLXRunner

    return MLXRunner(config, weights, dtype)


MLXLM = Backend("mlxlm", _runner, dtypes=("float32",), gemm_impls=("bf16",),
                attention_forms=("absorbed",),
                description="mlx-lm's deepseek_v3 model (MLX, CPU), loaded through its own sanitize()")
