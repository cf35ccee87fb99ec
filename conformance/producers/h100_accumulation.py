"""Accumulation inside real fp8 GEMMs, for the accumulation model. Run on a CUDA machine with torch and triton:

    python -m dsv3_conformance.producers.h100_accumulation --official PATH_TO_DeepSeek-V3_CHECKOUT --out DIR

Needs only torch, triton and numpy (no TensorFlow). The official `inference/kernel.py` is imported from the
checkout the user points to, never copied. For each data kind (non-negative operands, where truncation
errors add up, and signed ones) and each K, one pair of e4m3 operands x [M, K], w [N, K] is multiplied by:
- `torch._scaled_mm` in one call over all of K (unit scales), with `use_fast_accum` False and True;
- the official Triton `fp8_gemm` (unit block scales): per 128-wide K slice a `tl.dot`, promoted to float32.
Each product is computed twice to record the run-to-run spread. Writes accumulation.safetensors (operands as
e4m3 bit patterns, outputs in float32) and meta.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

M, N = 32, 64
KS = (128, 512, 2048, 8192)
KINDS = ("non-negative", "signed")
MODES = ("scaled_mm.slow", "scaled_mm.fast", "official_triton")


def operands(kind: str, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = rng.standard_normal((M, k)), rng.standard_normal((N, k))
    if kind == "non-negative":
        x, w = np.abs(x), np.abs(w)
    cast = lambda a: torch.from_numpy(a.astype(np.float32)).cuda().to(torch.float8_e4m3fn)  # noqa: E731
    return cast(x), cast(w)


def load_official_kernel(checkout: Path):
    path = checkout / "inference" / "kernel.py"
    if not path.is_file():
        sys.exit(f"{path}: not found; --official must point to a DeepSeek-V3 checkout")
    spec = importlib.util.spec_from_file_location("official_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def products(kernel, x_q: torch.Tensor, w_q: torch.Tensor) -> dict[str, torch.Tensor]:
    one = torch.ones((), device="cuda")
    k = x_q.shape[1]
    torch.set_default_dtype(torch.float32)  # the official fp8_gemm writes the default dtype
    return {
        "scaled_mm.slow": torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                           use_fast_accum=False),
        "scaled_mm.fast": torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                           use_fast_accum=True),
        "official_triton": kernel.fp8_gemm(x_q.contiguous(), torch.ones(M, k // 128, device="cuda"),
                                           w_q.contiguous(), torch.ones(N // 128 or 1, k // 128, device="cuda")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    kernel = load_official_kernel(args.official)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tensors, spread = {}, {}
    for kind in KINDS:
        for k in KS:
            x_q, w_q = operands(kind, k, rng)
            first, second = products(kernel, x_q, w_q), products(kernel, x_q, w_q)
            torch.cuda.synchronize()
            name = f"{kind}.k{k}"
            tensors[f"{name}.x_q"] = x_q.cpu().view(torch.uint8)
            tensors[f"{name}.w_q"] = w_q.cpu().view(torch.uint8)
            for mode in MODES:
                tensors[f"{name}.{mode}"] = first[mode].float().cpu()
                spread[f"{name}.{mode}"] = float((first[mode] - second[mode]).abs().max())
    save_file(tensors, str(args.out / "accumulation.safetensors"), metadata={"format": "pt"})
    meta = {"producer": "conformance/h100_accumulation.py", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "cuda": torch.version.cuda,
            "official_kernel": str(args.official / "inference" / "kernel.py"), "seed": args.seed, "M": M, "N": N,
            "K": list(KS), "kinds": list(KINDS), "modes": list(MODES),
            "run_to_run_max_abs": spread, "uint8 tensors": "e4m3fn bit patterns (x_q, w_q)"}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
