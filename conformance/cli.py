"""The `dsv3-conformance` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from tabulate import tabulate

from reference.checkpoint import CheckpointError, load_weights, open_checkpoint
from reference.config import ConfigError, ModelConfig, load_config
from reference.linear import Numerics
from reference.model import InputError
from reference.safetensors_io import SafetensorsError

from .backends import BACKENDS, BackendError, make_runner
from .golden import CaseResult, GoldenCase, GoldenError, check_case
from .manifest import ManifestError, verify

# Errors that are the user's input, reported in one line with exit status 2.
USER_ERRORS = (ConfigError, CheckpointError, GoldenError, SafetensorsError, InputError, BackendError, ManifestError)


def results_table(result: CaseResult) -> str:
    rows = [(r.name, f"{r.rel_err:.3e}", f"{r.max_abs:.3e}", f"{r.tolerance:.1e}", "pass" if r.passed else "FAIL")
            for r in result.results]
    return tabulate(rows, headers=["tensor", "rel_err", "max_abs", "tolerance", "status"], disable_numparse=True)


def report_unknown_fields(config: ModelConfig, source: str) -> None:
    """Unknown config fields are kept, not fatal, and said once."""
    if config.unknown_fields:
        print(f"{source}: unknown config field(s) kept and ignored: {', '.join(config.unknown_fields)}",
              file=sys.stderr)


def _check_golden(args: argparse.Namespace) -> int:
    case = GoldenCase.load(args.case_dir)
    report_unknown_fields(case.config, str(case.path / "config.json"))
    result = check_case(case, args.backend, args.dtype)
    print(f"case {result.case} on backend {result.backend}")
    print(results_table(result))
    if result.not_compared:
        print(f"not compared (unknown to this harness): {', '.join(result.not_compared)}", file=sys.stderr)
    failed = [r for r in result.results if not r.passed]
    print(f"{'PASSED' if result.passed else 'FAILED'}: {len(result.results) - len(failed)}/{len(result.results)} "
          "tensors within tolerance")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.passed else 1


def _parse_prompts(prompts: list[str]) -> np.ndarray:
    try:
        rows = [[int(token) for token in prompt.replace(",", " ").split()] for prompt in prompts]
    except ValueError as error:
        raise InputError(f"--prompt takes comma-separated integer token ids ({error})") from None
    if len({len(row) for row in rows}) != 1 or not rows[0]:
        raise InputError(f"prompts of a batch must be non-empty and of equal length, got lengths "
                         f"{[len(row) for row in rows]}")
    return np.array(rows, dtype=np.int64)


def _generate(args: argparse.Namespace) -> int:
    config = load_config(args.config or args.model_dir)
    report_unknown_fields(config, args.config or str(Path(args.model_dir) / "config.json"))
    prompt = _parse_prompts(args.prompt)
    with open_checkpoint(args.model_dir) as checkpoint:
        weights = load_weights(checkpoint, config, progress=True)
        runner = make_runner(args.backend, config, weights, Numerics(args.gemm_impl, config.scale_fmt), args.dtype)
        generated = runner.generate(prompt, args.steps)
    if args.json:
        print(json.dumps({"prompt": prompt.tolist(), "generated": generated.tolist()}))
    else:
        for row in generated:
            print(" ".join(str(int(token)) for token in row))
    return 0


def _golden_generate(args: argparse.Namespace) -> int:
    from .golden_generate import generate_all

    for path in generate_all(Path(args.golden_dir), args.case or None):
        print(f"wrote {path}")
    return 0


def _golden_verify(args: argparse.Namespace) -> int:
    problems = verify(Path(args.golden_dir))
    for problem in problems:
        print(problem)
    print("golden files match the manifest" if not problems else f"{len(problems)} golden file problem(s)")
    return 1 if problems else 0


def mutation_table(results) -> str:
    rows = [(r.mutant, r.backend, "killed" if r.killed else "SURVIVED",
             "\n".join(k.split(": ")[0] for k in r.killed_by) or "-") for r in results]
    return tabulate(rows, headers=["mutant", "backend", "verdict", "killed by"], disable_numparse=True)


def _mutants(args: argparse.Namespace) -> int:
    from .mutants import CATALOGUE, run_catalogue

    if args.list:
        print(tabulate([(m.key, m.origin, m.bug) for m in CATALOGUE], headers=["mutant", "origin", "bug"]))
        return 0
    results = run_catalogue(args.backend.split(","), args.mutant, args.first_kill, args.jobs)
    print(mutation_table(results))
    survivors = [f"{r.mutant} on {r.backend}" for r in results if not r.killed]
    print(f"{len(results) - len(survivors)}/{len(results)} mutants killed"
          + (f"; SURVIVED: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=2))
    return 1 if survivors else 0


def _report(args: argparse.Namespace) -> int:
    from .report import build_report

    report = build_report(Path(args.golden_dir), args.backend.split(","), Path(args.out), suite=not args.no_suite,
                          mutants=args.mutants, jobs=args.jobs)
    print(f"wrote {Path(args.out) / 'report.html'}, report.md and report.json")
    print(report.summary())
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-conformance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    golden = commands.add_parser("check-golden", help="check a backend against one golden case folder")
    golden.add_argument("case_dir")
    golden.add_argument("--backend", choices=BACKENDS, default="reference")
    golden.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=None,
                        help="compute dtype (default: float64 for reference, float32 for tf)")
    golden.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    golden.set_defaults(run=_check_golden)

    generate = commands.add_parser("generate", help="greedy generation from prompt token ids")
    generate.add_argument("model_dir", help="checkpoint folder (HF or official layout)")
    generate.add_argument("--prompt", action="append", required=True,
                          help="comma-separated token ids; repeat for a batch of equal-length prompts")
    generate.add_argument("--steps", type=int, default=16, help="tokens to generate")
    generate.add_argument("--config", help="config file (default: MODEL_DIR/config.json)")
    generate.add_argument("--backend", choices=BACKENDS, default="tf")
    generate.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=None)
    generate.add_argument("--gemm-impl", choices=("bf16", "fp8"), default="bf16",
                          help="numerics path for fp8 weights: dequantized (bf16) or fp8 activations")
    generate.add_argument("--json", action="store_true", help="print JSON instead of one line per sequence")
    generate.set_defaults(run=_generate)

    golden_cmd = commands.add_parser("golden", help="golden cases: regenerate the oracle ones, verify hashes")
    golden_commands = golden_cmd.add_subparsers(dest="golden_command", required=True)
    regenerate = golden_commands.add_parser("generate", help="regenerate the oracle-produced cases (needs the "
                                                             "oracle extra)")
    regenerate.add_argument("--golden-dir", default="golden")
    regenerate.add_argument("--case", action="append", help="only this case (repeatable)")
    regenerate.set_defaults(run=_golden_generate)
    check = golden_commands.add_parser("verify", help="check every golden file against the manifest's sha256")
    check.add_argument("--golden-dir", default="golden")
    check.set_defaults(run=_golden_verify)

    mutants = commands.add_parser("mutants", help="plant known bugs in each backend; every one must be caught")
    mutants.add_argument("--backend", default=",".join(BACKENDS), help="comma-separated backends")
    mutants.add_argument("--mutant", action="append", help="only this mutant (repeatable)")
    mutants.add_argument("--first-kill", action="store_true", help="stop each mutant at the first check that kills it")
    mutants.add_argument("--jobs", type=int, default=1, help="processes to run mutants in")
    mutants.add_argument("--list", action="store_true", help="list the catalogue and exit")
    mutants.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    mutants.set_defaults(run=_mutants)

    report = commands.add_parser("report", help="check every golden case on each backend and write a report")
    report.add_argument("golden_dir", nargs="?", default="golden")
    report.add_argument("--backend", default=",".join(BACKENDS), help="comma-separated backends")
    report.add_argument("--out", default="report", help="folder for report.md, report.json and report.html")
    report.add_argument("--no-suite", action="store_true", help="leave out the pytest suite (golden checks only)")
    report.add_argument("--mutants", choices=("first-kill", "all", "none"), default="first-kill",
                        help="mutation table: stop each mutant at its first kill, run all its checks, or skip")
    report.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for the mutants")
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"dsv3-conformance: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
