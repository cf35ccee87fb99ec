"""Verdicts: a check fails only by raising `CheckFailed` from one of these assertions on compared values.

Every comparison is also published to the registered listeners (the report plugin records them), so a
passing check still reports how close it came. Anything else a check raises (a crash, a bad input, a
harness bug) is an error, never a failure: the mutation runner counts only `CheckFailed` as a kill.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .metrics import Comparison
from .tolerances import tolerance

Listener = Callable[[Comparison, str], None]
LISTENERS: list[Listener] = []


class CheckFailed(AssertionError):
    """A check's own assertion on compared values; `detail` says what was measured."""

    def __init__(self, detail: str, comparison: Comparison | None = None):
        super().__init__(detail)
        self.detail = detail
        self.comparison = comparison


def record(comparison: Comparison, policy_key: str) -> Comparison:
    for listener in LISTENERS:
        listener(comparison, policy_key)
    return comparison


def expect(condition: bool, detail: str) -> None:
    """Fail with `detail` unless `condition` holds (an invariant on compared values)."""
    if not condition:
        raise CheckFailed(detail)


def expect_close(what: str, out: np.ndarray, expected: np.ndarray, policy_key: str) -> Comparison:
    """Fail unless rel_err(out, expected) is within the policy entry `policy_key`."""
    entry = tolerance(policy_key)
    comparison = record(Comparison.of(what, out, expected, entry.value), policy_key)
    if not comparison.passed:
        raise CheckFailed(f"{comparison.describe()} [policy {entry.key}: {entry.basis}]", comparison)
    return comparison


def expect_equal(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    """Fail unless `got` equals `expected` element for element (NaN equal to NaN), with the same shape."""
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {list(got.shape)}, expected {list(expected.shape)}")
    wide_got, wide_expected = got.astype(np.float64), expected.astype(np.float64)
    differ = ~((wide_got == wide_expected) | (np.isnan(wide_got) & np.isnan(wide_expected)))
    if differ.any():
        first = tuple(int(i) for i in np.argwhere(differ)[0])
        raise CheckFailed(f"{what}: {int(differ.sum())} of {differ.size} elements differ; first at {list(first)}: "
                          f"{float(wide_got[first]):.9g}, expected {float(wide_expected[first]):.9g}")


def self_consistency_key(dtype: str, gemm_impl: str = "bf16") -> str:
    """Policy entry for two evaluations of the same function in `dtype` that differ only in rounding."""
    return f"self.fp8-path.{dtype}" if gemm_impl == "fp8" else f"self.{dtype}"
