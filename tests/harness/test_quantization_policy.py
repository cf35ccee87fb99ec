"""The quantization policy (TOLERANCES.md section 12): next-token distributions judged by KL divergence and top-1
agreement, on values whose answer is known in closed form, and on deliberately broken backends that declare
quantized weights (broken_backends.py): garbage, NaN, sharpened logits and a missing group limit all fail, the
faithful wrapper passes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.metrics import Comparison, kl_divergences
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.tolerances import Tolerance

POLICY = Tolerance("quant.test", 0.1, "test", kl=(0.01, 0.05, 0.1), top1=0.75)


def test_kl_divergence_in_closed_form():
    expected = np.array([[0.0, 0.0], [5.0, 5.0]])  # uniform over two tokens (the offset changes nothing)
    out = np.array([[math.log(3.0), 0.0], [5.0, 5.0]])  # (3/4, 1/4), then uniform
    assert np.allclose(kl_divergences(out, expected), [0.5 * math.log(4 / 3), 0.0], rtol=1e-12, atol=1e-15)
    assert kl_divergences(np.array([[np.nan, 0.0]]), np.array([[0.0, 0.0]]))[0] == math.inf


def test_distribution_comparison_judges_median_p99_max_and_top1():
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((100, 32)) * 3
    assert Comparison.of_distributions("same", expected + 7.0, expected, POLICY).passed  # a shift is no change
    one_row = expected.copy()
    one_row[3] = rng.standard_normal(32) * 3  # one distribution wrong: the max sees it
    result = Comparison.of_distributions("one row", one_row, expected, POLICY)
    assert not result.passed and result.kl[0] < 1e-12 < POLICY.kl[2] < result.kl[2] and result.top1 >= 0.98
    flipped = expected.copy()
    top = flipped.argmax(axis=1)
    flipped[np.arange(30), top[:30]] -= 1e-3 + (np.sort(flipped[:30], axis=1)[:, -1] - np.sort(flipped[:30], axis=1)[:, -2])
    result = Comparison.of_distributions("top-1 of 30 rows", flipped, expected, POLICY)
    assert result.top1 == pytest.approx(0.70) and not result.passed
    for broken in (np.where(np.arange(32) == 0, np.nan, expected), expected[:, :16]):
        assert not Comparison.of_distributions("broken", broken, expected, POLICY).passed


QUANTIZED = [("QUANTIZED_FAITHFUL", "official/v3-tiny", "PASSED"),
             ("QUANTIZED_FAITHFUL", "official/v3-tiny-bf16", "PASSED"),
             ("QUANTIZED_GARBAGE", "official/v3-tiny", "FAILED"),
             ("QUANTIZED_NAN", "official/v3-tiny", "FAILED"),
             ("QUANTIZED_SHARPENED", "official/v3-tiny", "FAILED"),
             ("QUANTIZED_NO_GROUP_LIMIT", "oracle/moe-groups", "FAILED")]


@pytest.mark.parametrize("backend, case, verdict", QUANTIZED, ids=[f"{b}-{c}" for b, c, _ in QUANTIZED])
def test_check_golden_under_the_quantization_policy(backend, case, verdict, capsys):
    status = main(["check-golden", str(GOLDEN_DIR / case), "--backend", f"broken_backends:{backend}"])
    printed = capsys.readouterr().out
    assert (status, printed.strip().splitlines()[-1].split(":")[0]) == (0 if verdict == "PASSED" else 1, verdict), \
        printed[-3000:]
    assert "next-token KL" in printed or "KL" in printed
