"""The numerics settings a run is made with (they select a path, they compute nothing).

`gemm_impl` "bf16": fp8 weights are dequantized and multiplied in the compute dtype. "fp8": activations
are quantized per token per 128 channels and multiplied blockwise in fp8 (SEMANTICS.md section 5).
`scale_fmt` "ue8m0" rounds activation scales up to powers of two; `ue8m0_scope` says in which linear
modules: "official" as the official inference code does (only the modules it builds as its plain `Linear`,
with the scale rounded as float32 `2^ceil(log2 s)`), "all" in every fp8 linear with exact rounding (as
DeepGEMM-based serving does). SEMANTICS.md section 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv3_conformance.format.errors import BadInput

AttentionForm = Literal["naive", "absorbed"]
ATTENTION_FORMS = ("naive", "absorbed")

# Every linear module a backend runs, one name per role (the experts' three projections share one role).
LinearModule = Literal["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj", "dense_ffn",
                       "shared_expert", "expert"]
# The modules the official inference code (9b4e978) builds as its plain `Linear`, the only class that
# passes `scale_fmt` on: wq_a, wkv_a and the routed experts. Its column- and row-parallel subclasses
# (wq, wq_b, wkv_b, wo, the dense FFN and the shared experts) quantize with unrounded scales.
OFFICIAL_UE8M0_MODULES = frozenset({"q_a_proj", "kv_a_proj", "expert"})
UE8M0_SCOPES = ("official", "all")
# How one linear's activation scales are formatted: unrounded, rounded up to 2^k exactly, or rounded as
# the official kernel does, 2^ceil(log2 s) with log2 in float32 (it rounds down for s within about one
# float32 ulp of log2 above a power of two).
ScaleFormat = Literal["ue8m0", "ue8m0-log2f"] | None


@dataclass(frozen=True)
class Numerics:
    """How fp8 weights are multiplied: dequantized ("bf16") or with quantized activations ("fp8")."""

    gemm_impl: Literal["bf16", "fp8"] = "bf16"
    scale_fmt: Literal["ue8m0"] | None = None
    ue8m0_scope: Literal["official", "all"] = "official"
    # Training: the Fprop, Dgrad and Wgrad GEMMs of every linear layer (attention projections, FFNs, experts)
    # in fp8, from float master weights quantized in 128x128 blocks at each step (report section 3.3).
    fp8_training: bool = False

    def __post_init__(self) -> None:
        if self.gemm_impl not in ("bf16", "fp8"):
            raise BadInput(f"unknown gemm_impl {self.gemm_impl!r}: expected 'bf16' or 'fp8'")
        if self.scale_fmt not in (None, "ue8m0"):
            raise BadInput(f"unknown scale_fmt {self.scale_fmt!r}: expected 'ue8m0' or none")
        if self.ue8m0_scope not in UE8M0_SCOPES:
            raise BadInput(f"unknown ue8m0_scope {self.ue8m0_scope!r}: expected one of {', '.join(UE8M0_SCOPES)}")

    def scale_format(self, module: LinearModule) -> ScaleFormat:
        """The activation scale format of one linear module on the fp8 path."""
        if self.scale_fmt is None:
            return None
        if self.ue8m0_scope == "all":
            return "ue8m0"
        return "ue8m0-log2f" if module in OFFICIAL_UE8M0_MODULES else None
