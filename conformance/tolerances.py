"""The tolerance policy: every bound a check uses, with what it rests on.

The numbers and their justification are written out in TOLERANCES.md beside this file; a check names
the entry it uses so that a failure points at its policy. No check may use a literal tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    key: str
    rel_err: float
    basis: str


_ENTRIES = [
    Tolerance("golden.float32-path", 1e-5,
              "official float32 CPU run vs a float32/float64 backend: measured <= 1.0e-6 (TOLERANCES.md section 1)"),
    Tolerance("golden.fp8-path", 1e-1,
              "fp8 activation path end to end, two layers: H100 vs exact emulation measured 4-7e-2 "
              "(SPEC section 5; TOLERANCES.md section 2)"),
    Tolerance("tokens.exact", 0.0, "greedy tokens are discrete: any difference is a failure"),
    Tolerance("self.float64", 1e-12,
              "two float64 evaluations differing only in rounding order: measured <= 1.3e-15 (TOLERANCES.md section 3)"),
    Tolerance("fp8.gemm.float64", 1e-12, "blockwise fp8 GEMM vs float64 product of the same fp8 operands (section 4)"),
    Tolerance("routing.float64", 1e-12, "gate weights in float64 vs the definition: rounding only (section 3)"),
]
POLICY = {entry.key: entry for entry in _ENTRIES}


def tolerance(key: str) -> Tolerance:
    if key not in POLICY:
        raise KeyError(f"no tolerance {key!r} in the policy (conformance/TOLERANCES.md)")
    return POLICY[key]
