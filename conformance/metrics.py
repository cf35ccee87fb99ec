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


def row_errors(out: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """rel_err of each row (last axis) of [..., width] tensors, flattened to [rows]; inf where a row is off a
    zero row."""
    out = np.asarray(out, np.float64).reshape(-1, np.shape(out)[-1])
    expected = np.asarray(expected, np.float64).reshape(-1, np.shape(expected)[-1])
    diff, norm = np.linalg.norm(out - expected, axis=1), np.linalg.norm(expected, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 0, diff / norm, np.where(diff == 0, 0.0, np.inf))


def max_abs(out: np.ndarray, expected: np.ndarray) -> float:
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    if out.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(out - expected))) if out.size else 0.0


@dataclass(frozen=True)
class Comparison:
    """One compared tensor: what, the observed error statistic, its tolerance, and the verdict.

    Most comparisons bound the whole tensor's rel_err. Row comparisons (`of_rows`, the fp8 activation path)
    bound the median row's rel_err and count the rows beyond it (`rows_off` of `rows`).
    """

    name: str
    rel_err: float
    max_abs: float
    tolerance: float
    passed: bool
    rows_off: int | None = None
    rows: int | None = None
    whole_rel_err: float | None = None  # a row comparison's whole-tensor rel_err, for the record

    @classmethod
    def of(cls, name: str, out: np.ndarray, expected: np.ndarray, tolerance: float) -> "Comparison":
        error = rel_err(out, expected)
        # NaN never passes: `error <= tolerance` is False for NaN.
        return cls(name, error, max_abs(out, expected), tolerance, bool(error <= tolerance))

    @classmethod
    def of_rows(cls, name: str, out: np.ndarray, expected: np.ndarray, tolerance: float) -> "Comparison":
        """Passes when at least half of the rows (tokens) are within `tolerance`: the lower median row is.

        On the fp8 activation path a correct evaluation differs from another on a minority of tokens, where
        an activation on an e4m3 rounding boundary went the other way (TOLERANCES.md section 8); a
        semantic difference moves every token.
        """
        errors = np.sort(row_errors(out, expected)) if np.shape(out) == np.shape(expected) else np.array([np.inf])
        median = float(errors[(errors.size - 1) // 2])
        return cls(name, median, max_abs(out, expected), tolerance, bool(median <= tolerance),
                   int(np.count_nonzero(~(errors <= tolerance))), int(errors.size), rel_err(out, expected))

    def to_json(self) -> dict:
        """The contract fields; a row comparison adds rows_off and rows."""
        fields = asdict(self)
        return fields if self.rows is not None else {k: v for k, v in fields.items()
                                                     if k not in ("rows_off", "rows", "whole_rel_err")}

    def table_row(self) -> dict:
        """The row of this comparison in the CLI's and the report's tables."""
        median = "" if self.rows is None else " (median row)"
        return {"tensor": self.name, "rel_err": f"{self.rel_err:.3e}{median}",
                "rows off": "" if self.rows is None else f"{self.rows_off}/{self.rows}",
                "max_abs": f"{self.max_abs:.3e}", "tolerance": f"{self.tolerance:.1e}",
                "status": "pass" if self.passed else "FAIL"}

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        statistic = "rel_err" if self.rows is None else "median-row rel_err"
        rows = "" if self.rows is None else f", {self.rows_off}/{self.rows} rows beyond it"
        return (f"{self.name}: {statistic} {self.rel_err:.3e} vs tolerance {self.tolerance:.1e} ({verdict}){rows}, "
                f"max_abs {self.max_abs:.3e}")
