"""Settings of the multi-token-prediction modules (SEMANTICS.md section 4): they select, they compute nothing.

The defaults are the canonical semantics of the engines that run the released weights; every other
value is a deviation some implementation has shipped, kept as an option so that it can be tested and
named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv3_conformance.format.errors import BadInput


@dataclass(frozen=True)
class MTPOptions:
    # eh_proj input: [enorm(embedding); hnorm(hidden)] (engines, Megatron) or hidden first (the report's eq. 21)
    concat: Literal["embedding-first", "hidden-first"] = "embedding-first"
    # one engine zeroes the embedding at sequence position 0 (it contradicts training)
    zero_first_position: bool = False
    # depth k > 1 takes depth k-1's output after shared_head.norm ("normed") or before it ("unnormed")
    chain: Literal["normed", "unnormed"] = "normed"
    # the loss over a depth: averaged over the positions that have a target ("valid", Megatron) or over
    # every position, 1/T (the report)
    loss_normalization: Literal["valid", "all"] = "valid"

    def __post_init__(self) -> None:
        for name, allowed in (("concat", ("embedding-first", "hidden-first")), ("chain", ("normed", "unnormed")),
                              ("loss_normalization", ("valid", "all"))):
            if getattr(self, name) not in allowed:
                raise BadInput(f"MTP option {name}={getattr(self, name)!r}: expected one of {list(allowed)}")
        if not isinstance(self.zero_first_position, bool):
            raise BadInput(f"MTP option zero_first_position must be true or false, found {self.zero_first_position!r}")
