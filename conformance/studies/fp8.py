"""The report's fp8 claims, reproduced (report section 3.3): limited-precision accumulation and the promotion
interval, the accumulation model against H100 tensor cores, and fine-grained against per-tensor scaling.

- Accumulation: e4m3 operands from golden/h100/accumulation (non-negative, so truncation errors add up),
  summed by reference/fp8_accumulation.py with a 14-bit accumulator, over all of K (no promotion) or 128 at
  a time promoted to float32; the error against the exact product for K from 128 to 8192.
- Model against the H100: for each GEMM mode measured there (torch._scaled_mm with and without fast
  accumulation, the official Triton kernel), the accumulator width in bits whose model error is nearest
  the H100's, and the model's error at that width beside the H100's.
- Granularity: activations with a few outlier channels (x 100 to x 10^4) quantized per token per 128
  channels with 128 x 128 weight blocks, against one scale per tensor; the GEMM error of each against the
  float64 product of the unquantized operands.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from dsv3_conformance.reference.fp8 import fp8_gemm, quantize_activation, quantize_weight, to_e4m3
from dsv3_conformance.reference.fp8_accumulation import accumulate

from dsv3_conformance.metrics import rel_err

KS = (128, 512, 2048, 8192)
MODES = ("scaled_mm.slow", "scaled_mm.fast", "official_triton")
OUTLIERS = (1.0, 1e1, 1e2, 1e3, 1e4, 1e5)


def _operands(data: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    return tuple(data[f"{name}.{part}"].view(ml_dtypes.float8_e4m3fn).astype(np.float64) for part in ("x_q", "w_q"))


def accumulation_curve(data: dict, bits: int = 14, rows: int = 8, cols: int = 16) -> list[dict]:
    """Error of `bits`-bit accumulation vs K, with and without promotion every 128 (non-negative operands)."""
    out = []
    for k in KS:
        x, w = _operands(data, f"non-negative.k{k}")
        products = x[:rows, None, :] * w[None, :cols, :]
        exact = products.sum(-1)
        unpromoted = rel_err(accumulate(products, bits, 4), exact)
        promoted = rel_err(sum(accumulate(products[..., i:i + 128], bits, 4) for i in range(0, k, 128)), exact)
        out.append({"K": k, "no promotion": unpromoted, "promotion every 128": promoted})
    return out


def _modelled(products: np.ndarray, bits: int, chunk: int, promote: int | None) -> np.ndarray:
    k = products.shape[-1]
    step = min(promote or k, k)
    return sum(accumulate(products[..., i:i + step], bits, chunk) for i in range(0, k, step))


def explain_h100(data: dict, rows: int = 8, cols: int = 16) -> list[dict]:
    """Per H100 mode: the accumulator (mantissa bits, products per truncation, promotion interval) of the model
    that explains its errors at every K best, and the worst ratio between model and measurement."""
    products, exact = {}, {}
    for k in KS:
        x, w = _operands(data, f"non-negative.k{k}")
        products[k] = x[:rows, None, :] * w[None, :cols, :]
        exact[k] = products[k].sum(-1)
    out = []
    for mode in MODES:
        measured = {k: rel_err(data[f"non-negative.k{k}.{mode}"][:rows, :cols], exact[k]) for k in KS}
        fits = []
        for bits, chunk, promote in MODEL_GRID:
            model = {k: rel_err(_modelled(products[k], bits, chunk, promote), exact[k]) for k in KS}
            worst = max(abs(np.log(max(model[k], 1e-12) / max(measured[k], 1e-12))) for k in KS)
            fits.append((worst, bits, chunk, promote, model))
        joint = min(fits, key=lambda fit: fit[0])
        for k in KS:
            # One accumulator for every K when it explains them all within a factor JOINT_FIT; else the best
            # model of each K (a kernel that picks its tiling by shape changes regime).
            if np.exp(joint[0]) <= JOINT_FIT:
                worst, bits, chunk, promote, model = joint
                ratio = float(np.exp(worst))
            else:
                bits, chunk, promote, model = min(
                    ((b, c, p, m) for _, b, c, p, m in fits),
                    key=lambda fit: abs(np.log(max(fit[3][k], 1e-12) / max(measured[k], 1e-12))))
                ratio = float(max(model[k], measured[k]) / max(min(model[k], measured[k]), 1e-30))
            out.append({"mode": mode, "K": k, "H100 rel_err": measured[k], "model rel_err": model[k],
                        "model": f"{bits} bits, truncated every {chunk} product(s), promoted every "
                                 f"{promote or 'never'}" + ("" if np.exp(joint[0]) <= JOINT_FIT else " (this K)"),
                        "worst ratio": ratio})
    return out


JOINT_FIT = 2.0


# Accumulator models tried against each H100 mode: mantissa bits, products summed exactly before each
# truncation, and the promotion interval (float32 flush; None: never).
MODEL_GRID = [(bits, chunk, promote) for bits in (12, 13, 14, 15, 16, 23) for chunk in (1, 4)
              for promote in (128, 2048, None)]


def granularity(seed: int = 0, tokens: int = 64, k: int = 1024, n: int = 256) -> list[dict]:
    """GEMM error of fine-grained (1x128, 128x128) vs per-tensor scaling when a few activation channels carry
    outliers. The weight rows of those channels are zero, so the product depends on the ordinary channels
    only, while the outliers still set a per-tensor scale: what is measured is how much of the ordinary
    channels survives quantization."""
    rng = np.random.default_rng(seed)
    outliers = rng.choice(k, 4, replace=False)
    w = rng.standard_normal((n, k)) / np.sqrt(k)
    w[:, outliers] = 0.0
    w_q, w_scale = quantize_weight(w)
    out = []
    for magnitude in OUTLIERS:
        x = rng.standard_normal((tokens, k))
        x[:, outliers] *= magnitude
        exact = x @ w.T
        x_q, x_scale = quantize_activation(x.astype(np.float32), None)
        fine = fp8_gemm(x_q, x_scale, w_q, w_scale, np.float64)
        xs, ws = np.abs(x).max() / 448.0, np.abs(w).max() / 448.0  # one scale per tensor: amax / 448
        coarse = (to_e4m3(x / xs).astype(np.float64) * xs) @ (to_e4m3(w / ws).astype(np.float64) * ws).T
        out.append({"outlier magnitude": magnitude, "fine-grained": rel_err(fine, exact),
                    "per-tensor": rel_err(coarse, exact)})
    return out


def plot(curve: list[dict], grain: list[dict], explained: list[dict], path: Path) -> Path:
    from dsv3_conformance.report.plots import plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    ks = [row["K"] for row in curve]
    left.plot(ks, [row["no promotion"] for row in curve], "o-", label="14-bit model, no promotion")
    left.plot(ks, [row["promotion every 128"] for row in curve], "s-", label="14-bit model, promotion every 128")
    for mode, marker in zip(MODES, "^vD"):
        points = [(row["K"], row["H100 rel_err"]) for row in explained if row["mode"] == mode]
        left.plot(*zip(*points), marker, linestyle=":", label=f"H100 {mode}")
    left.axhline(2e-2, color="grey", linewidth=0.8, linestyle="--", label="report: ~2% at K=4096")
    left.set(xscale="log", yscale="log", xlabel="K", ylabel="relative error", title="Accumulation precision")
    left.legend(fontsize=7)
    magnitudes = [row["outlier magnitude"] for row in grain]
    right.plot(magnitudes, [row["fine-grained"] for row in grain], "o-", label="1x128 activations, 128x128 weights")
    right.plot(magnitudes, [row["per-tensor"] for row in grain], "s-", label="one scale per tensor")
    right.set(xscale="log", yscale="log", xlabel="outlier channel magnitude (x)", ylabel="GEMM relative error",
              title="Scaling granularity")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
