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


def kl_divergences(out: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """KL(expected || out) of the next-token distributions softmax(logits) of each row (last axis), in nats, in
    float64, flattened to [rows]; inf where a row of `out` holds a NaN or an infinity."""
    out = np.asarray(out, np.float64).reshape(-1, np.shape(out)[-1])
    expected = np.asarray(expected, np.float64).reshape(-1, np.shape(expected)[-1])
    finite = np.isfinite(out).all(axis=1)
    out = np.where(finite[:, None], out, 0.0)
    log_p = expected - expected.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = out - out.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    divergences = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=1), 0.0)
    return np.where(finite, divergences, np.inf)


def distribution_statistics(out: np.ndarray, expected: np.ndarray) -> tuple[tuple[float, float, float], float, int]:
    """The KL divergences of every row (kl_divergences) as (median, 99th percentile, max), the share of rows whose
    top-1 token agrees, and the number of rows; a NaN or a shape mismatch gives inf and no agreement."""
    if np.shape(out) != np.shape(expected):
        divergences, agree = np.array([np.inf]), np.array([False])
    else:
        divergences = kl_divergences(out, expected)
        width = np.shape(expected)[-1]
        agree = np.reshape(out, (-1, width)).argmax(axis=1) == np.reshape(expected, (-1, width)).argmax(axis=1)
    statistics = tuple(float(np.percentile(divergences, q)) if np.isfinite(divergences).all() else float("inf")
                       for q in (50, 99, 100))
    return statistics, float(agree.mean()), int(divergences.size)


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
    kl: tuple[float, float, float] | None = None  # a distribution comparison's KL median, p99, max (nats)
    top1: float | None = None  # ... and the share of rows whose top-1 token agrees
    top1_min: float | None = None

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

    @classmethod
    def of_distributions(cls, name: str, out: np.ndarray, expected: np.ndarray,
                         policy: "Tolerance") -> "Comparison":
        """Logits judged as next-token distributions under a quantization policy (TOLERANCES.md section 12): the
        KL divergence of every row (median, 99th percentile, max) and the share of rows whose top-1 token agrees.
        `rel_err` holds the largest KL, `tolerance` its bound; a NaN or a shape mismatch fails."""
        statistics, top1, rows = distribution_statistics(out, expected)
        passed = bool(all(s <= bound for s, bound in zip(statistics, policy.kl)) and top1 >= policy.top1)
        return cls(name, statistics[2], max_abs(out, expected), policy.kl[2], passed, rows=rows,
                   whole_rel_err=rel_err(out, expected), kl=statistics, top1=top1, top1_min=policy.top1)

    def to_json(self) -> dict:
        """The contract fields; a row comparison adds rows_off, rows, rows_allowed, row_bound, whole_rel_err, a
        distribution comparison rows, whole_rel_err, kl, top1, top1_min."""
        fields = asdict(self)
        kept = _ROW_FIELDS if self.rows_off is not None else _DISTRIBUTION_FIELDS if self.kl is not None else ()
        return {k: v for k, v in fields.items() if k not in _OPTIONAL_FIELDS or k in kept}

    def table_row(self) -> dict:
        """The row of this comparison in the CLI's and the report's tables."""
        if self.kl is not None:
            return {"tensor": self.name, "rel_err": f"KL {self.kl[2]:.2e} (max)",
                    "rows off": f"top-1 {self.top1:.0%} (>= {self.top1_min:.0%})", "max_abs": f"{self.max_abs:.3e}",
                    "tolerance": f"{self.tolerance:.1e}", "status": "pass" if self.passed else "FAIL"}
        worst = "" if self.rows is None else " (worst row)"
        return {"tensor": self.name, "rel_err": f"{self.rel_err:.3e}{worst}",
                "rows off": "" if self.rows is None else f"{self.rows_off}/{self.rows} (<= {self.rows_allowed})",
                "max_abs": f"{self.max_abs:.3e}", "tolerance": f"{self.tolerance:.1e}",
                "status": "pass" if self.passed else "FAIL"}

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        if self.kl is not None:
            return (f"{self.name}: next-token KL median/p99/max {self.kl[0]:.2e}/{self.kl[1]:.2e}/{self.kl[2]:.2e} vs "
                    f"max {self.tolerance:.1e}, top-1 agreement {self.top1:.1%} of {self.rows} rows (>= "
                    f"{self.top1_min:.0%}) ({verdict}), rel_err {self.whole_rel_err:.3e}")
        statistic = "rel_err" if self.rows is None else "worst-row rel_err"
        rows = "" if self.rows is None else (f", {self.rows_off}/{self.rows} rows beyond {self.row_bound:.0e} (at most "
                                             f"{self.rows_allowed} allowed)")
        return (f"{self.name}: {statistic} {self.rel_err:.3e} vs tolerance {self.tolerance:.1e} ({verdict}){rows}, "
                f"max_abs {self.max_abs:.3e}")


_ROW_FIELDS = ("rows_off", "rows", "whole_rel_err", "rows_allowed", "row_bound")
_DISTRIBUTION_FIELDS = ("rows", "whole_rel_err", "kl", "top1", "top1_min")
_OPTIONAL_FIELDS = _ROW_FIELDS + _DISTRIBUTION_FIELDS
