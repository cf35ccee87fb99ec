"""The measurements behind the quantization policy (TOLERANCES.md section 12): llama.cpp on each weight type and
setting, its next-token distributions against the expected ones, on the golden cases (every float32 case of the
dequantized path, the rows the policy pools: every logits tensor of the case) and on the longer prompt set of
`quantization:long-prompts` (against the float64 reference; its seed and two more), each split into what the
weight type loses and what llama.cpp's arithmetic adds (`decomposed`).

    python -m dsv3_conformance.studies.quantization [--json OUT]

Needs the llamacpp extra.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from tabulate import tabulate

from dsv3_conformance.adapters.llamacpp.gguf_file import read_weights, tensor_types
from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner
from dsv3_conformance.backends import resolve_backend
from dsv3_conformance.golden.cases import GoldenCase, check_case
from dsv3_conformance.golden.manifest import case_dirs
from dsv3_conformance.verdict import PARTS
from dsv3_conformance.metrics import distribution_statistics
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.checks.quantization import BATCH, DECODE, PROMPT, SEED, logits_of, rows_of_256
from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.backends import REFERENCE

KINDS = ("f16", "bf16", "q8_0", "q4_k_m", "iq4_nl")
SETTINGS = ("default", "exact")
SEEDS = (SEED, 11, 12)  # the check's own model and prompts, and two more of the same shape


def statistics(got: np.ndarray, expected: np.ndarray) -> dict:
    (median, p99, largest), top1, rows = distribution_statistics(got, expected)
    return {"rows": rows, "kl_median": median, "kl_p99": p99, "kl_max": largest, "top1": top1}


def decomposed(kind: str, setting: str, config, weights, prompt, following, expected) -> dict:
    """llama.cpp on the type's file against `expected` (the total), and split in two: the float64 reference on
    the file's own weights (dequantized by the gguf package) against `expected` (what the type loses, no
    llama.cpp kernel involved), and llama.cpp against that (what llama.cpp's arithmetic adds: its activation
    quantization in quantized dot products, an f16 KV cache)."""
    runner = LlamaCppRunner(config, weights, kind, setting)
    first = prompt.shape[1] + following.shape[1] - expected.shape[1]  # the golden holds the last prompt position on
    got = logits_of(runner, prompt, following)[:, first:]
    on_file = logits_of(REFERENCE.make_runner(config, read_weights(runner.path, config, weights), dtype="float64"),
                        prompt, following)[:, first:]
    typed, arithmetic = statistics(on_file, expected), statistics(got, on_file)
    return {**statistics(got, expected), "type_kl_max": typed["kl_max"], "type_top1": typed["top1"],
            "arithmetic_kl_p99": arithmetic["kl_p99"], "arithmetic_kl_max": arithmetic["kl_max"],
            "file": ", ".join(f"{name} {count}" for name, count in tensor_types(runner.path).items())}


def golden_cases() -> list[GoldenCase]:
    """The shipped cases a quantized backend is judged on by its policy: those of the dequantized path computed
    in float32 (bfloat16 expectations loosen the policy, fp8-path ones are not run)."""
    cases = [GoldenCase.load(path) for path in case_dirs(GOLDEN_DIR)]
    return [case for case in cases if case.meta.get("compute_dtype", "float32") == "float32"
            and any(file.gemm_impl == "bf16" for file in case.files)]


def pooled(case: GoldenCase, backend) -> dict | None:
    """The statistics of the comparison the quantization policy judges on `case`: every logits row, pooled."""
    result = check_case(case, backend, allow=tuple(PARTS))
    found = [c for c in result.results if c.kl is not None]
    if not found:
        return None
    c = found[0]
    return {"rows": c.rows, "kl_median": c.kl[0], "kl_p99": c.kl[1], "kl_max": c.kl[2], "top1": c.top1}


def measure() -> list[dict]:
    sets = {}
    config = rows_of_256()
    for seed in SEEDS:
        weights = build_weights(config, seed)
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, config.vocab_size, (BATCH, PROMPT))
        following = rng.integers(0, config.vocab_size, (BATCH, DECODE))
        sets[f"long, seed {seed}"] = (config, weights, prompt, following,
                                      logits_of(REFERENCE.make_runner(config, weights, dtype="float64"), prompt,
                                                following))
    cases = golden_cases()
    rows = []
    for kind in KINDS:
        for setting in SETTINGS:
            name = f"llamacpp-{kind}" + ("" if setting == "default" else "-exact")
            for case in cases:
                statistics_ = pooled(case, resolve_backend(name))
                if statistics_ is not None:
                    rows.append({"backend": name, "prompts": f"golden {case.name}", **statistics_})
            for prompts, data in sets.items():
                rows.append({"backend": name, "prompts": prompts, **decomposed(kind, setting, *data)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = measure()
    print(tabulate(rows, headers="keys", floatfmt=".2e"))
    if args.json:
        from importlib import metadata

        from dsv3_conformance.report.runs import provenance

        versions = {name: metadata.version(name) for name in ("llama_cpp_python", "gguf", "numpy")}
        with open(args.json, "w") as handle:
            json.dump({"provenance": {**provenance(), **versions}, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
