"""Assertions of the suite: each says what it compares, the metric, the tolerance and what it observed."""

from __future__ import annotations

import numpy as np

from .metrics import Comparison
from .tolerances import tolerance


def expect_close(what: str, out: np.ndarray, expected: np.ndarray, policy_key: str) -> Comparison:
    """Fail unless rel_err(out, expected) is within the policy entry `policy_key`."""
    entry = tolerance(policy_key)
    comparison = Comparison.of(what, out, expected, entry.value)
    assert comparison.passed, f"{comparison.describe()} [policy {entry.key}: {entry.basis}]"
    return comparison


def self_consistency_key(dtype: str, gemm_impl: str = "bf16") -> str:
    """Policy entry for two evaluations of the same function in `dtype` that differ only in rounding."""
    return f"self.fp8-path.{dtype}" if gemm_impl == "fp8" else f"self.{dtype}"
