"""llama.cpp, through llama-cpp-python, as backends: `llamacpp-<type>` runs a GGUF file of that type (f32, f16, bf16,
q8_0) in llama.cpp's default settings, `llamacpp-<type>-exact` with a float32 KV cache. Installed by the `llamacpp`
extra and found by entry point (`dsv3_conformance.backends`)."""

from __future__ import annotations

from functools import partial

from dsv3_conformance.backends import Backend
from dsv3_conformance.adapters.llamacpp.gguf_file import TYPES


def _runner(kind: str, settings: str, config, weights, numerics, dtype, attention_form):
    from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner

    return LlamaCppRunner(config, weights, kind, settings)


def _backend(kind: str, settings: str) -> Backend:
    suffix = "" if settings == "default" else f"-{settings}"
    return Backend(f"llamacpp-{kind}{suffix}", partial(_runner, kind, settings), gemm_impls=("bf16",),
                   attention_forms=("absorbed",),
                   description=f"llama.cpp (llama-cpp-python) on a {kind} GGUF file, "
                               + ("its default settings (f16 KV cache)" if settings == "default"
                                  else "a float32 KV cache"))


BACKENDS = {backend.name: backend for backend in (_backend(kind, settings) for kind in TYPES
                                                   for settings in ("default", "exact"))}
F32, F16, BF16, Q8_0 = (BACKENDS[f"llamacpp-{kind}"] for kind in TYPES)
F32_EXACT, F16_EXACT, BF16_EXACT, Q8_0_EXACT = (BACKENDS[f"llamacpp-{kind}-exact"] for kind in TYPES)
