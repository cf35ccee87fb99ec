"""How often the fp8 activation path flips, and how far one flip carries: the basis of the row policy
`golden.fp8-path.row` (TOLERANCES.md section 8).

On the fp8 path every activation is rounded to e4m3 (3 mantissa bits). Two correct evaluations whose
activations differ in the last bits of float32 quantize one element to neighbouring e4m3 values when it
lies on a rounding boundary; a float32 producer lands *exactly* on a tie at a rate near 2^-19 per
element and rounds it to even, which a float64 evaluation cannot see. The flipped element then changes
that token's later activations, its scales, and (through the cache) later tokens of its sequence.

Measured here: the float64 reference against the float32 TensorFlow backend and against itself in float32,
on the weights of golden/official/v3-tiny-fp8-act (the official fp8-act case) with random prompts and six
decode steps, both attention forms and both ue8m0 scopes. Per compared tensor (each block's output, the last
logits, each decode step's logits), per row (one token of one sequence): the row's rel_err. Reported per
setting: the largest share of a tensor's rows beyond the policy's row bound (hidden tensors, and the two-row
logits), the worst row, and whether the policy passes every tensor.

Run: python -m dsv3_conformance.benchmarks.fp8_flips [--prompts N]
(CI runs a shortened version in tests/harness/test_fp8_scope.py)
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from dsv3_conformance.backends import resolve_backend
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.golden.cases import GoldenCase
from dsv3_conformance.metrics import Comparison, row_errors
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.tolerances import tolerance

from .timing import gate, publish

CASE = GOLDEN_DIR / "official" / "v3-tiny-fp8-act"
POLICY = tolerance("golden.fp8-path.row")
PAIRS = (("reference", "float64", "tf", "float32"), ("reference", "float64", "reference", "float32"))
DECODE_STEPS = 6


def _outputs(runner, tokens: np.ndarray, following: np.ndarray) -> dict[str, np.ndarray]:
    out = runner.prefill(tokens, capacity=tokens.shape[1] + following.shape[1])
    found = {f"prefill.layer.{k}.hidden": hidden for k, hidden in enumerate(out.hidden)}
    found["prefill.logits_last"] = out.logits_last
    found.update({f"decode.{t}.logits": runner.decode(following[:, t]).logits_last for t in range(following.shape[1])})
    return found


def measure(prompts: int, length: int = 32, batch: int = 2) -> list[dict]:
    """One row per (setting, pair, prompt, tensor): the share of rows beyond the row bound, the worst row, and
    whether the row policy passes it."""
    case = GoldenCase.load(CASE)
    weights = case.weights()
    rng = np.random.default_rng(20261207)
    rows = []
    settings = [(scope, form) for scope in ("official", "all") for form in ("absorbed", "naive")]
    with tqdm(total=prompts * len(settings), desc="fp8 flips") as progress:
        for scope, form in settings:
            numerics = Numerics("fp8", "ue8m0", scope)
            runners = {(name, dtype): resolve_backend(name).make_runner(case.config, weights, numerics, dtype,
                                                                       attention_form=form)
                       for pair in PAIRS for name, dtype in (pair[:2], pair[2:])}
            for prompt in range(prompts):
                tokens = rng.integers(0, case.config.vocab_size, (batch, length))
                following = rng.integers(0, case.config.vocab_size, (batch, DECODE_STEPS))
                outputs = {key: _outputs(runner, tokens, following) for key, runner in runners.items()}
                for a_name, a_dtype, b_name, b_dtype in PAIRS:
                    expected, got = outputs[(a_name, a_dtype)], outputs[(b_name, b_dtype)]
                    for tensor in expected:
                        errors = row_errors(got[tensor], expected[tensor])
                        rows.append({"scope": scope, "form": form, "pair": f"{a_name}-{a_dtype} vs {b_name}-{b_dtype}",
                                     "prompt": prompt, "tensor": tensor, "rows": int(errors.size),
                                     "share_off": float(np.mean(errors > POLICY.value)),
                                     "worst_row": float(errors.max()),
                                     "passes": Comparison.of_rows(tensor, got[tensor], expected[tensor], POLICY).passed})
                progress.update()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for key in sorted({(row["pair"], row["scope"], row["form"]) for row in rows}):
        group = [row for row in rows if (row["pair"], row["scope"], row["form"]) == key]
        hidden = [row for row in group if row["tensor"].endswith("hidden")]
        logits = [row for row in group if row["tensor"].endswith("logits") or row["tensor"].endswith("logits_last")]
        table.append({"pair": key[0], "scope": key[1], "form": key[2], "prompts": len({row["prompt"] for row in group}),
                      f"hidden rows beyond {POLICY.value:g} (max share)": f"{max(r['share_off'] for r in hidden):.0%}",
                      f"logits rows beyond {POLICY.value:g} (max share)": f"{max(r['share_off'] for r in logits):.0%}",
                      "worst row": f"{max(row['worst_row'] for row in group):.2e}",
                      "tensors the policy passes": f"{sum(row['passes'] for row in group)}/{len(group)}",
                      "_passed": all(row["passes"] for row in group)})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    args = parser.parse_args(argv)
    table = summarize(measure(args.prompts))
    gates = [gate(f"{row['pair']}, {row['scope']}, {row['form']}: the row policy golden.fp8-path.row passes every "
                  "tensor of these correct evaluations", row["tensors the policy passes"], row["_passed"])
             for row in table]
    notes = (f"{args.prompts} random prompts of 2x32 tokens and {DECODE_STEPS} decode steps per setting on "
             f"golden/official/v3-tiny-fp8-act. Policy golden.fp8-path.row: at most {POLICY.share_off:.0%} of a "
             f"tensor's rows (rounded up) beyond {POLICY.value:g}, none beyond {POLICY.worst_row:g}; rows are each "
             "block's output per token and each logits tensor per sequence.")
    shown = [{k: v for k, v in row.items() if not k.startswith("_")} for row in table]
    raise SystemExit(publish("fp8_flips", "FP8 activation path: rounding flips between correct evaluations", shown,
                             gates, notes))


if __name__ == "__main__":
    main()
