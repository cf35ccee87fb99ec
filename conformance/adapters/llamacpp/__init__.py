"""llama.cpp, through llama-cpp-python, as backends: `llamacpp-<type>` runs a GGUF file of that type (f32, f16, bf16,
q8_0 written by the adapter; q4_k_m, iq4_nl made by llama.cpp's quantizer) in llama.cpp's default settings,
`llamacpp-<type>-exact` with a float32 KV cache. Every type but f32 is judged by its quantization policy
(TOLERANCES.md section 12). Installed by the `llamacpp` extra and found by entry point (`dsv3_conformance.backends`)."""

from __future__ import annotations

from functools import partial

from dsv3_conformance.backends import Backend
from dsv3_conformance.adapters.llamacpp.gguf_file import QUANTIZER_TYPES, TYPES


def _runner(kind: str, settings: str, config, weights, numerics, dtype, attention_form):
    from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner

    return LlamaCppRunner(config, weights, kind, settings)


def _backend(kind: str, settings: str) -> Backend:
    suffix = "" if settings == "default" else f"-{settings}"
    return Backend(f"llamacpp-{kind}{suffix}", partial(_runner, kind, settings), gemm_impls=("bf16",),
                   attention_forms=("absorbed",), quantization=None if kind == "f32" else kind,
                   description=f"llama.cpp (llama-cpp-python) on a {kind} GGUF file, "
                               + ("its default settings (f16 KV cache)" if settings == "default"
                                  else "a float32 KV cache"))


KINDS = TYPES + tuple(QUANTIZER_TYPES)
BACKENDS = {backend.name: backend for backend in (_backend(kind, settings) for kind in KINDS
                                                   for settings in ("default", "exact"))}
F32, F16, BF16, Q8_0, Q4_K_M, IQ4_NL = (BACKENDS[f"llamacpp-{kind}"] for kind in KINDS)
F32_EXACT, F16_EXACT, BF16_EXACT, Q8_0_EXACT, Q4_K_M_EXACT, IQ4_NL_EXACT = (BACKENDS[f"llamacpp-{kind}-exact"]
                                                                            for kind in KINDS)
