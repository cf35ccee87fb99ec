"""Verdicts: a check fails only by raising `CheckFailed` from one of these assertions on compared values.

Every comparison is also published to the registered listeners (the report plugin records them), so a
passing check still reports how close it came. Anything else a check raises (a crash, a bad input, a
harness bug) is an error, never a failure: the mutation runner counts only `CheckFailed` as a kill.

Every command ends in one of three outcomes (`outcome`): PASSED (everything expected was compared and is
within tolerance), FAILED, or INCOMPLETE (something expected was not compared). INCOMPLETE is not a pass:
it is allowed only for parts the user names (`--allow-missing mtp,naive`), and then still listed. What
was not compared is a `Missing`: what, the part it belongs to (the name an allow-list takes), and why.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from dsv3_conformance.metrics import Comparison
from dsv3_conformance.tolerances import tolerance

Listener = Callable[[Comparison, str], None]
LISTENERS: list[Listener] = []


class CheckFailed(AssertionError):
    """A check's own assertion on compared values; `detail` says what was measured."""

    def __init__(self, detail: str, comparison: Comparison | None = None):
        super().__init__(detail)
        self.detail = detail
        self.comparison = comparison


_FIRST_FAILURE_ENDS = contextvars.ContextVar("first_failure_ends", default=False)


@contextlib.contextmanager
def first_failure_ends_checks() -> Iterator[None]:
    """Inside, a check that compares in parts may stop at the part where a comparison first failed: its verdict is
    FAILED either way. The mutation runner wants only that verdict (a kill), not every failing tensor."""
    token = _FIRST_FAILURE_ENDS.set(True)
    try:
        yield
    finally:
        _FIRST_FAILURE_ENDS.reset(token)


def first_failure_ends() -> bool:
    return _FIRST_FAILURE_ENDS.get()


def record(comparison: Comparison, policy_key: str) -> Comparison:
    for listener in LISTENERS:
        listener(comparison, policy_key)
    return comparison


def expect(condition: bool, detail: str) -> None:
    """Fail with `detail` unless `condition` holds (an invariant on compared values)."""
    if not condition:
        raise CheckFailed(detail)


def expect_close(what: str, out: np.ndarray, expected: np.ndarray, policy_key: str) -> Comparison:
    """Fail unless rel_err(out, expected) is within the policy entry `policy_key` (logits under a quantization
    policy: their next-token distributions within its KL and top-1 bounds)."""
    entry = tolerance(policy_key)
    comparison = record(Comparison.of_distributions(what, out, expected, entry) if entry.per_distribution
                        else Comparison.of(what, out, expected, entry.value), policy_key)
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


PASSED, FAILED, INCOMPLETE = "PASSED", "FAILED", "INCOMPLETE"

# The parts a user may allow to be missing, besides check families ("routing", "mtp", ...) and check keys.
PARTS = {
    "main": "the main model's outputs: block outputs, logits, decode steps, greedy tokens",
    "hidden": "the block outputs, where a runner gives none (StepOutput.hidden None)",
    "config": "a model configuration the backend cannot load",
    "experts": "the chosen experts a runner reports (StepOutput.experts), forced on the reference by the cross checks",
    "naive": "the naive attention form",
    "mtp": "the multi-token-prediction modules (Runner.mtp)",
    "speculative": "verification of drafted tokens (Runner.verify)",
    "fp8": "the fp8 activation path (gemm_impl fp8)",
    "dequantized": "the dequantized-weight path for fp8 weights (gemm_impl bf16)",
    "float32": "computing in float32", "float64": "computing in float64", "bfloat16": "computing in bfloat16",
    "forced-routing": "expert choices forced by the harness (Runner.prefill's forced_experts)",
    "components": "the component functions route, to_e4m3, quantize_activation, fp8_gemm",
    "oracle": "the transformers oracle (the oracle extra)",
    "training": "the training step (Backend.trainer)",
    "pipeline": "a pipelined training step over devices (Backend.capabilities)",
    "expert-parallel": "an expert-parallel MoE layer (Backend.capabilities)",
    "layers": "layers of a checkpoint (verify-checkpoint)",
    "mutation": "mutants of the catalogue (Backend.mutation_targets)",
    "unknown": "expected tensors this harness does not know",
}


@dataclass(frozen=True)
class Missing:
    """Something expected that was not compared: what, the part it belongs to, and why."""

    what: str
    part: str
    reason: str
    check: str = ""  # the suite's check that did not compare it, if any

    def describe(self) -> str:
        return f"{self.what} [{self.part}]: {self.reason}"


class NotApplicable(Exception):
    """A check or a mutant that does not apply to a backend by its definition (not something the backend lacks)."""


class Incomplete(Exception):
    """Raised by a check that compared what it could without a failure while expected parts were not compared;
    `compared`: whether it compared anything at all."""

    def __init__(self, missing: list[Missing], compared: bool = True):
        super().__init__("; ".join(item.describe() for item in missing[:5]) +
                         (f"; and {len(missing) - 5} more" if len(missing) > 5 else ""))
        self.missing = missing
        self.compared = compared


def parse_allow(text: str | None, known: Iterable[str] = ()) -> tuple[str, ...]:
    """The parts of `--allow-missing a,b,c`: each a part of PARTS or one of `known` (check families and keys,
    mutants); anything else is bad input (a misspelled part would silently allow nothing)."""
    from dsv3_conformance.format.errors import BadInput

    names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
    unknown = sorted(set(names) - set(PARTS) - set(known))
    if unknown:
        raise BadInput(f"--allow-missing: unknown part(s) {unknown}: expected parts of {', '.join(sorted(PARTS))}, "
                       "or check families and keys")
    return names


def allowed(missing: Missing, allow: Iterable[str]) -> bool:
    """Whether the user allowed `missing` to be missing: by its part, its name, or its check's key or family (the
    key's prefix up to the colon: "mtp" allows every "mtp:..." check)."""
    names = set(allow)
    keys = {missing.what, missing.check, missing.what.split(":")[0], missing.check.split(":")[0]} - {""}
    return missing.part in names or bool(keys & names)


def outcome(failed: bool, compared: int, missing: Iterable[Missing], allow: Iterable[str] = ()) -> str:
    """FAILED when a comparison failed; INCOMPLETE when nothing was compared at all, or when something expected
    was not compared and the user did not allow it; PASSED otherwise."""
    if failed:
        return FAILED
    if compared == 0 or any(not allowed(item, allow) for item in missing):
        return INCOMPLETE
    return PASSED


def summary_line(verdict: str, compared: int, failed: int, what: str, missing: list[Missing],
                 allow: Iterable[str] = ()) -> str:
    """One line that says what the verdict means: "FAILED: 2 of 9 tensors out of tolerance", "INCOMPLETE: 9
    tensors within tolerance, 2 not compared (mtp)", "PASSED: 9 tensors within tolerance (allowed missing: ...)"."""
    parts = sorted({item.part for item in missing})
    what = what[:-1] if compared == 1 and what.endswith("s") else what
    if verdict == FAILED:
        text = f"{failed} of {compared} {what} out of tolerance"
    elif compared == 0:
        text = f"nothing compared: {len(missing)} {what} expected, none run"
    else:
        text = f"{compared} {what} within tolerance"
    if missing:
        kind = "allowed missing" if verdict == PASSED else "not compared"
        text += f"; {len(missing)} {kind} ({', '.join(parts)})"
        unallowed = sorted({item.part for item in missing if not allowed(item, allow)})
        if verdict == INCOMPLETE and unallowed and compared:
            text += f": allow them with --allow-missing {','.join(unallowed)}"
    return f"{verdict}: {text}"


def self_consistency_key(dtype: str, gemm_impl: str = "bf16") -> str:
    """Policy entry for two evaluations of the same function in `dtype` that differ only in rounding."""
    return f"self.fp8-path.{dtype}" if gemm_impl == "fp8" else f"self.{dtype}"
