"""Error metrics used by every comparison of the harness."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def rel_err(out: np.ndarray, expected: np.ndarray) -> float:
    """||out - expected||_2 / ||expected||_2 in float64 (0 when both are zero; inf on shape mismatch)."""
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    if out.shape != expected.shape:
        return float("inf")
    diff = float(np.linalg.norm((out - expected).ravel()))
    norm = float(np.linalg.norm(expected.ravel()))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def max_abs(out: np.ndarray, expected: np.ndarray) -> float:
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    if out.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(out - expected))) if out.size else 0.0


@dataclass(frozen=True)
class Comparison:
    """One compared tensor: what, the observed errors, the tolerance on rel_err, and the verdict."""

    name: str
    rel_err: float
    max_abs: float
    tolerance: float
    passed: bool

    @classmethod
    def of(cls, name: str, out: np.ndarray, expected: np.ndarray, tolerance: float) -> "Comparison":
        error = rel_err(out, expected)
        # NaN never passes: `error <= tolerance` is False for NaN.
        return cls(name, error, max_abs(out, expected), tolerance, bool(error <= tolerance))

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: rel_err {self.rel_err:.3e} vs tolerance {self.tolerance:.1e} ({verdict}), max_abs {self.max_abs:.3e}"
