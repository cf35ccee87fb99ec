"""Assertions of the suite: each says what it compares, the metric, the tolerance and what it observed.

Every comparison is also published to the registered listeners (the report plugin records them), so a
passing check still reports how close it came.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .metrics import Comparison
from .tolerances import tolerance

Listener = Callable[[Comparison, str], None]
LISTENERS: list[Listener] = []


def record(comparison: Comparison, policy_key: str) -> Comparison:
    for listener in LISTENERS:
        listener(comparison, policy_key)
    return comparison


def expect_close(what: str, out: np.ndarray, expected: np.ndarray, policy_key: str) -> Comparison:
    """Fail unless rel_err(out, expected) is within the policy entry `policy_key`."""
    entry = tolerance(policy_key)
    comparison = record(Comparison.of(what, out, expected, entry.value), policy_key)
    assert comparison.passed, f"{comparison.describe()} [policy {entry.key}: {entry.basis}]"
    return comparison


def self_consistency_key(dtype: str, gemm_impl: str = "bf16") -> str:
    """Policy entry for two evaluations of the same function in `dtype` that differ only in rounding."""
    return f"self.fp8-path.{dtype}" if gemm_impl == "fp8" else f"self.{dtype}"


def expect_same_run(what: str, candidate, expected, prompt: np.ndarray, following: np.ndarray,
                    policy_key: str) -> Comparison:
    """Prefill `prompt` then decode each column of `following` on both runners; compare all logits.

    `expected` (the reference or the oracle) is forced to the candidate's expert choices at every step, so
    that a near tie routed differently in another precision neither fails nor hides a numerics difference.
    """
    step = candidate.prefill(prompt)
    got, wanted = [step.logits], [expected.prefill(prompt, step.experts).logits]
    for column in following.T:
        step = candidate.decode(column)
        got.append(step.logits)
        wanted.append(expected.decode(column, step.experts).logits)
    return expect_close(f"{what}: logits of {prompt.shape[1]} prompt positions and {following.shape[1]} decode steps "
                        f"(batch {len(prompt)})", np.concatenate(got, axis=1), np.concatenate(wanted, axis=1),
                        policy_key)
