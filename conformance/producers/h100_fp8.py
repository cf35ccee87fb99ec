"""FP8 golden data from real tensor cores. Run on a CUDA machine with torch: python -m dsv3_conformance.producers.h100_fp8 --out DIR

It needs only torch and numpy, so that it runs where TensorFlow is not installed. For every case:
- activations (seeded, float32, rows of very different magnitudes, a zero row and a row below the
  1e-4 amax floor) are quantized on the GPU per token per 128 channels: s = max(amax, 1e-4)/448 by IEEE
  float32 division (ue8m0: the next power of two), q = cast(x / s) to e4m3fn; how many scales and values
  change when the division is torch's multiplication by a reciprocal is recorded too;
- weights are seeded e4m3 blocks with float32 scales (128x128, amax/448, quantized with torch);
- y = x @ w^T is computed as the DeepSeek-V3 recipe does it: for each 128-wide slice of K one
  torch._scaled_mm call on the tensor cores (e4m3 x e4m3 with a float32 result), scaled by the
  token's and the block's scales, and accumulated in float32 on the CUDA cores (promotion).
One case also multiplies unscaled e4m3 operands over all of K in a single call, to measure the tensor
cores' accumulation without promotion. Writes fp8-gemm.safetensors and meta.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

BLOCK = 128
E4M3_MAX = 448.0
CASES = [  # name, M, N, K, scale_fmt
    ("k4096", 64, 256, 4096, None),
    ("skinny", 48, 512, 256, None),
    ("ue8m0", 64, 256, 1024, "ue8m0"),
]


def activations(rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-3, 2, (rows, 1))
    x[0] = 0.0
    x[1] *= 1e-5 / np.abs(x[1]).max()  # amax below the 1e-4 floor
    return x.astype(np.float32)


def quantize_activations(x: torch.Tensor, scale_fmt: str | None,
                         reciprocal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales by IEEE float32 division (a tensor divisor), or, with `reciprocal`, as torch divides by a Python
    scalar on CUDA: a multiplication by 1/448, which can differ by one ulp."""
    grouped = x.view(x.shape[0], -1, BLOCK)
    amax = grouped.abs().amax(dim=-1).clamp(min=1e-4)
    scales = amax / E4M3_MAX if reciprocal else amax / torch.full_like(amax, E4M3_MAX)
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(scales)
        scales = torch.where(mantissa == 0.5, scales, torch.ldexp(torch.ones_like(scales), exponent))
    return (grouped / scales[..., None]).to(torch.float8_e4m3fn).view(x.shape), scales


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    blocks = w.view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
    return (blocks / scales[:, None, :, None]).to(torch.float8_e4m3fn).view(rows, cols), scales


def blockwise_gemm(x_q, x_scale, w_q, w_scale) -> torch.Tensor:
    one = torch.ones((), device=x_q.device)
    out = torch.zeros(x_q.shape[0], w_q.shape[0], device=x_q.device)
    column_scale = w_scale.repeat_interleave(BLOCK, dim=0)
    for kb in range(x_q.shape[1] // BLOCK):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = torch._scaled_mm(x_q[:, cols].contiguous(), w_q[:, cols].contiguous().t(), scale_a=one,
                                   scale_b=one, out_dtype=torch.float32)
        out += partial * x_scale[:, kb, None] * column_scale[None, :, kb]
    return out


def exact(x_q, x_scale, w_q, w_scale) -> np.ndarray:
    """The float64 product of the dequantized operands (each slice of an e4m3 product is exact in float64)."""
    xq = x_q.float().cpu().double().numpy().reshape(x_q.shape[0], -1, BLOCK) * x_scale.cpu().double().numpy()[..., None]
    wq = w_q.float().cpu().double().numpy()
    ws = np.repeat(np.repeat(w_scale.cpu().double().numpy(), BLOCK, 0), BLOCK, 1)
    return xq.reshape(x_q.shape[0], -1) @ (wq * ws).T


def rel_err(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=20241226)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    rng = np.random.default_rng(args.seed)
    tensors, measured = {}, {}
    for name, m, n, k, scale_fmt in CASES:
        x = torch.from_numpy(activations(m, k, rng)).to(device)
        w = torch.from_numpy((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).to(device)
        w_q, w_scale = quantize_weight(w)
        x_q, x_scale = quantize_activations(x, scale_fmt)
        y = blockwise_gemm(x_q, x_scale, w_q, w_scale)
        x_q_reciprocal, x_scale_reciprocal = quantize_activations(x, scale_fmt, reciprocal=True)
        torch.cuda.synchronize()
        tensors.update({f"{name}.x": x.cpu(), f"{name}.x_q": x_q.cpu().view(torch.uint8),
                        f"{name}.x_scale": x_scale.cpu(), f"{name}.w_q": w_q.cpu().view(torch.uint8),
                        f"{name}.w_scale": w_scale.cpu(), f"{name}.y": y.cpu()})
        measured[name] = {"M": m, "N": n, "K": k, "scale_fmt": scale_fmt,
                          "rel_err_vs_float64": rel_err(y.cpu().double().numpy(), exact(x_q, x_scale, w_q, w_scale)),
                          "reciprocal_division": {
                              "scales_differing": int((x_scale_reciprocal != x_scale).sum()),
                              "e4m3_values_differing": int((x_q_reciprocal.view(torch.uint8)
                                                            != x_q.view(torch.uint8)).sum()),
                              "of_values": x_q.numel()}}
    # Accumulation over all of K in one tensor-core call, without promotion, on unscaled e4m3 operands.
    x_q = torch.from_numpy(rng.standard_normal((64, 4096)).astype(np.float32)).to(device).to(torch.float8_e4m3fn)
    w_q = torch.from_numpy(rng.standard_normal((256, 4096)).astype(np.float32)).to(device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    single = torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    ones_x, ones_w = torch.ones(64, 32, device=device), torch.ones(2, 32, device=device)
    promoted = blockwise_gemm(x_q, ones_x, w_q, ones_w)
    reference = exact(x_q, ones_x, w_q, ones_w)
    measured["no-promotion-k4096"] = {"single_call_rel_err": rel_err(single.cpu().double().numpy(), reference),
                                      "promoted_rel_err": rel_err(promoted.cpu().double().numpy(), reference)}
    start = time.perf_counter()
    save_file(tensors, str(out / "fp8-gemm.safetensors"), metadata={"format": "pt"})
    meta = {"producer": "conformance/h100_fp8.py: torch._scaled_mm per 128-wide K slice, float32 promotion",
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "seed": args.seed, "cases": measured, "uint8 tensors": "e4m3fn bit patterns (x_q, w_q)",
            "written_in_s": round(time.perf_counter() - start, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
