"""torchtitan's DeepSeek-V3 model (the training framework's `DeepSeekV3Model`, with its MTP modules) on the CPU in
float32: `torchtitan` as it runs (its routed experts always compute in bfloat16), `torchtitan-exact` with those
products in float32, to tell its precision from its semantics. Installed by the `torchtitan` extra and found by entry
point (`dsv3_conformance.backends`)."""

from __future__ import annotations

from functools import partial

from dsv3_conformance.backends import Backend


def _runner(settings, config, weights, numerics, dtype, attention_form):
    from dsv3_conformance.adapters.torchtitan.runner import TorchTitanRunner

    return TorchTitanRunner(config, weights, settings)


def _backend(settings: str) -> Backend:
    return Backend("torchtitan" + ("" if settings == "default" else f"-{settings}"), partial(_runner, settings),
                   gemm_impls=("bf16",), attention_forms=("naive",),
                   description="torchtitan's DeepSeekV3Model (PyTorch, CPU, float32), loaded through its own Hugging "
                               "Face state-dict adapter; " + ("its routed experts in bfloat16, as it runs them"
                                                              if settings == "default" else
                                                              "its routed experts' products in float32"))


TORCHTITAN, TORCHTITAN_EXACT = _backend("default"), _backend("exact")
