"""Error metrics used by every comparison of the harness."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dsv3_conformance.tolerances import Tolerance


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


def row_errors(out: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """rel_err of each row (last axis) of [..., width] tensors, flattened to [rows]; inf where a row is off a
    zero row, or holds a NaN or an infinity."""
    out = np.asarray(out, np.float64).reshape(-1, np.shape(out)[-1])
    expected = np.asarray(expected, np.float64).reshape(-1, np.shape(expected)[-1])
    with np.errstate(invalid="ignore", over="ignore"):
        diff, norm = np.linalg.norm(out - expected, axis=1), np.linalg.norm(expected, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        errors = np.where(norm > 0, diff / norm, np.where(diff == 0, 0.0, np.inf))
    return np.where(np.isfinite(out).all(axis=1), errors, np.inf)


def max_abs(out: np.ndarray, expected: np.ndarray) -> float:
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    if out.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(out - expected))) if out.size else 0.0


@dataclass(frozen=True)
class Comparison:
    """One compared tensor: what, the observed error statistic, its tolerance, and the verdict.

    Most comparisons bound the whole tensor's rel_err. Row comparisons (`of_rows`: the fp8 activation path and
    bfloat16 goldens) judge every row: `rel_err` is then the worst row's, bounded by `tolerance`, and at most
    `rows_allowed` of the `rows` may lie beyond the policy's row bound (`rows_off` do).
    """

    name: str
    rel_err: float
    max_abs: float
    tolerance: float
    passed: bool
    rows_off: int | None = None
    rows: int | None = None
    whole_rel_err: float | None = None  # a row comparison's whole-tensor rel_err, for the record
    rows_allowed: int | None = None
    row_bound: float | None = None

    @classmethod
    def of(cls, name: str, out: np.ndarray, expected: np.ndarray, tolerance: float) -> "Comparison":
        error = rel_err(out, expected)
        # NaN never passes: `error <= tolerance` is False for NaN.
        return cls(name, error, max_abs(out, expected), tolerance, bool(error <= tolerance))

    @classmethod
    def of_rows(cls, name: str, out: np.ndarray, expected: np.ndarray, policy: "Tolerance") -> "Comparison":
        """Every row (one token's block output, or one sequence's logits) judged: none beyond the policy's
        `worst_row`, none holding a NaN or an infinity, and at most a share `share_off` of them (rounded up)
        beyond its row bound `value` (TOLERANCES.md sections 2, 8 and 10)."""
        if np.shape(out) != np.shape(expected):
            errors = np.array([np.inf])
        else:
            errors = row_errors(out, expected)
        worst = float(errors.max()) if errors.size else 0.0
        off = int(np.count_nonzero(errors > policy.value))
        allowed = math.ceil(policy.share_off * errors.size - 1e-9)
        passed = bool(np.isfinite(errors).all() and worst <= policy.worst_row and off <= allowed)
        return cls(name, worst, max_abs(out, expected), policy.worst_row, passed, off, int(errors.size),
                   rel_err(out, expected), allowed, policy.value)

    def to_json(self) -> dict:
        """The contract fields; a row comparison adds rows_off, rows, rows_allowed, row_bound, whole_rel_err."""
        fields = asdict(self)
        return fields if self.rows is not None else {k: v for k, v in fields.items() if k not in _ROW_FIELDS}

    def table_row(self) -> dict:
        """The row of this comparison in the CLI's and the report's tables."""
        worst = "" if self.rows is None else " (worst row)"
        return {"tensor": self.name, "rel_err": f"{self.rel_err:.3e}{worst}",
                "rows off": "" if self.rows is None else f"{self.rows_off}/{self.rows} (<= {self.rows_allowed})",
                "max_abs": f"{self.max_abs:.3e}", "tolerance": f"{self.tolerance:.1e}",
                "status": "pass" if self.passed else "FAIL"}

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        statistic = "rel_err" if self.rows is None else "worst-row rel_err"
        rows = "" if self.rows is None else (f", {self.rows_off}/{self.rows} rows beyond {self.row_bound:.0e} (at most "
                                             f"{self.rows_allowed} allowed)")
        return (f"{self.name}: {statistic} {self.rel_err:.3e} vs tolerance {self.tolerance:.1e} ({verdict}){rows}, "
                f"max_abs {self.max_abs:.3e}")


_ROW_FIELDS = ("rows_off", "rows", "whole_rel_err", "rows_allowed", "row_bound")
