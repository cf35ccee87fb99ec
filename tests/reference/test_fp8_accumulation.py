"""The accumulation model against the report's claim and against H100 tensor cores (golden/h100/accumulation)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsv3_conformance.format.safetensors_io import read_all
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.reference.fp8_accumulation import accumulate

DATA = read_all(GOLDEN_DIR / "h100" / "accumulation" / "accumulation.safetensors")


def _operands(name: str) -> tuple[np.ndarray, np.ndarray]:
    return tuple(DATA[f"{name}.{part}"].view(ml_dtypes.float8_e4m3fn).astype(np.float64) for part in ("x_q", "w_q"))


def test_fourteen_bit_accumulation_reproduces_the_reports_two_percent():
    """Report section 3.3: ~14-bit accumulation over K = 4096 without promotion errs near 2%; promoting every
    128 products to float32 bounds it whatever K is."""
    x, w = _operands("non-negative.k8192")
    x, w = x[:8, :4096], w[:16, :4096]
    products = x[:, None, :] * w[None]
    exact = products.sum(-1)
    unpromoted = rel_err(accumulate(products, 14, 4), exact)
    promoted = rel_err(sum(accumulate(products[..., k:k + 128], 14, 4) for k in range(0, 4096, 128)), exact)
    assert 1e-2 <= unpromoted <= 4e-2
    assert promoted <= 1e-3 and promoted < unpromoted / 20


def test_h100_fast_accumulation_grows_with_k_and_the_default_does_not():
    """On the H100, use_fast_accum=True loses precision as K grows (no promotion); the default and the
    official Triton kernel stay at the level of one 128-wide slice."""
    errors = {}
    for k in (128, 512, 2048, 8192):
        x, w = _operands(f"non-negative.k{k}")
        exact = x @ w.T
        errors[k] = {mode: rel_err(DATA[f"non-negative.k{k}.{mode}"], exact)
                     for mode in ("scaled_mm.slow", "scaled_mm.fast", "official_triton")}
    fast = [errors[k]["scaled_mm.fast"] for k in sorted(errors)]
    assert fast == sorted(fast) and fast[-1] > 1e-2
    assert all(errors[k]["scaled_mm.slow"] <= 1e-3 and errors[k]["official_triton"] <= 1e-3 for k in errors)


def test_the_model_at_14_bits_explains_h100_fast_accumulation_at_large_k():
    """At K = 8192 the 14-bit model (truncation every 4 products) lands within 10% of the H100's error; 13
    and 16 bits do not."""
    x, w = _operands("non-negative.k8192")
    x, w = x[:8], w[:16]
    products = x[:, None, :] * w[None]
    exact = products.sum(-1)
    h100 = rel_err(DATA["non-negative.k8192.scaled_mm.fast"][:8, :16], exact)
    modelled = {bits: rel_err(accumulate(products, bits, 4), exact) for bits in (13, 14, 16)}
    assert abs(modelled[14] - h100) <= 0.1 * h100
    assert abs(modelled[13] - h100) > 0.1 * h100 and abs(modelled[16] - h100) > 0.1 * h100


def test_the_model_explains_each_h100_mode():
    """Default cuBLAS accumulation: 14 bits promoted every 128, within 1.5x at every K; fast accumulation: 14
    bits truncated at every product and flushed every 2048, within 1.5x (conformance/studies/fp8.py)."""
    from dsv3_conformance.studies.fp8 import explain_h100

    rows = explain_h100(DATA)
    for mode, model in (("scaled_mm.slow", "14 bits, truncated every 4 product(s), promoted every 128"),
                        ("scaled_mm.fast", "14 bits, truncated every 1 product(s), promoted every 2048")):
        picked = [row for row in rows if row["mode"] == mode]
        assert all(row["model"] == model and row["worst ratio"] <= 1.5 for row in picked), picked


def test_fine_grained_scaling_survives_outliers_that_per_tensor_scaling_does_not():
    from dsv3_conformance.studies.fp8 import granularity

    rows = {row["outlier magnitude"]: row for row in granularity()}
    assert rows[1.0]["per-tensor"] < 1.1 * rows[1.0]["fine-grained"]  # no outlier: the same
    assert rows[1e5]["per-tensor"] > 3 * rows[1e5]["fine-grained"]
    assert all(row["fine-grained"] < 0.1 for row in rows.values())
