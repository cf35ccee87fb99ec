"""The numerics settings a run is made with (they select a path, they compute nothing).

`gemm_impl` "bf16": fp8 weights are dequantized and multiplied in the compute dtype. "fp8": activations
are quantized per token per 128 channels and multiplied blockwise in fp8 (SEMANTICS.md section 5).
`scale_fmt` "ue8m0" rounds activation scales up to powers of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import BadInput

AttentionForm = Literal["naive", "absorbed"]
ATTENTION_FORMS = ("naive", "absorbed")


@dataclass(frozen=True)
class Numerics:
    """How fp8 weights are multiplied: dequantized ("bf16") or with quantized activations ("fp8")."""

    gemm_impl: Literal["bf16", "fp8"] = "bf16"
    scale_fmt: Literal["ue8m0"] | None = None

    def __post_init__(self) -> None:
        if self.gemm_impl not in ("bf16", "fp8"):
            raise BadInput(f"unknown gemm_impl {self.gemm_impl!r}: expected 'bf16' or 'fp8'")
        if self.scale_fmt not in (None, "ue8m0"):
            raise BadInput(f"unknown scale_fmt {self.scale_fmt!r}: expected 'ue8m0' or none")
