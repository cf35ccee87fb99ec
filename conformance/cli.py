"""The `dsv3-conformance` command line.

Exit status: 0 pass; 1 conformance failure (a tensor out of tolerance, a surviving mutant, a failed
suite, a backend producing non-finite logits); 2 bad input (the message names the file, tensor or field
as written, what was expected and what was found); 3 internal error (a bug of the harness or a backend
crash, with the traceback on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

# TensorFlow's C++ INFO and WARNING lines (oneDNN, CUDA probing, XLA service) would bury the tables; errors
# still print. Set before anything imports TensorFlow; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from tabulate import tabulate

from dsv3_conformance.console import quiet
from dsv3_conformance.backends import DEFAULT_BACKENDS, Unsupported, resolve_backend, resolve_backends
from dsv3_conformance.format.checkpoint import load_weights, open_checkpoint
from dsv3_conformance.format.config import ALLOW_FIELDS_HELP, ModelConfig, allow_fields, load_config
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.inputs import InputError
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.golden.cases import CaseResult, GoldenCase, check_case
from dsv3_conformance.golden.manifest import verify
from dsv3_conformance.studies.experiments import add_command as experiment_command
from dsv3_conformance.fullscale.command import add_command as fullscale_commands
from dsv3_conformance.pipeline.command import add_command as schedule_command
from dsv3_conformance.pipeline.execution import add_command as pipeline_step_command
from dsv3_conformance.report.scoreboard import add_command as scoreboard_command
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.profiles import PROFILES
from dsv3_conformance.backends import NonFiniteOutput, greedy
from dsv3_conformance.backends import speculative_generate
from dsv3_conformance.verdict import PASSED, Missing, allowed, parse_allow

PASS, FAILURE, BAD_INPUT, INTERNAL = 0, 1, 2, 3
PROJECT_PACKAGE = "dsv3_conformance"


def results_table(result: CaseResult) -> str:
    return tabulate([r.table_row() for r in result.results], headers="keys", disable_numparse=True)


def report_unknown_fields(config: ModelConfig, source: str) -> None:
    """Unknown config fields the user allowed are said once."""
    if config.unknown_fields:
        print(f"{source}: unknown config field(s) accepted by --allow-fields: {', '.join(config.unknown_fields)}",
              file=sys.stderr)


def write_output(path: str, text: str) -> None:
    """Write an output file the user named; a path that cannot be written is bad input."""
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise BadInput(f"{path}: cannot write the output file ({error.strerror or error})") from None


def missing_table(missing: list[Missing], allow: tuple[str, ...]) -> str:
    return tabulate([{"not compared": m.what, "part": m.part, "allowed": "yes" if allowed(m, allow) else "no",
                      "why": m.reason} for m in missing], headers="keys", disable_numparse=True,
                    maxcolwidths=[None, None, None, 90])


def _check_golden(args: argparse.Namespace) -> int:
    backend = resolve_backend(args.backend)
    allow = parse_allow(args.allow_missing)
    case = GoldenCase.load(args.case_dir, allow_fields(args.allow_fields))
    report_unknown_fields(case.config, str(case.path / "config.json"))
    result = check_case(case, backend, args.dtype, allow=allow)
    print(f"case {result.case} on backend {result.backend}")
    if result.results:
        print(results_table(result))
    if result.missing:
        print(missing_table(result.missing, allow))
    if args.json:
        write_output(args.json, json.dumps(result.to_json(), indent=2))
    print(result.summary())
    return PASS if result.passed else FAILURE


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
    backend = resolve_backend(args.backend)
    config = load_config(args.config or args.model_dir, allow_fields(args.allow_fields))
    report_unknown_fields(config, args.config or str(Path(args.model_dir) / "config.json"))
    prompt = _parse_prompts(args.prompt)
    if prompt.shape[1] + args.steps - 1 > config.max_seq_len:
        raise InputError(f"a prompt of {prompt.shape[1]} tokens and {args.steps} steps exceeds "
                         f"max_position_embeddings={config.max_seq_len}")
    with open_checkpoint(args.model_dir) as checkpoint:
        weights = load_weights(checkpoint, config, progress=True)
        if config.n_mtp_layers and not weights.mtp:
            if args.speculative:
                raise InputError(f"{args.model_dir}: --speculative needs the MTP module, which this checkpoint "
                                 "does not store")
            print(f"{args.model_dir}: no MTP tensors stored: loaded as a model without MTP", file=sys.stderr)
        runner = backend.make_runner(config, weights, Numerics(args.gemm_impl, config.scale_fmt), args.dtype)
        stats = None
        try:
            if args.speculative:
                generated, stats = speculative_generate(runner, prompt, args.steps, args.speculative)
            else:
                generated = greedy(runner, prompt, args.steps)
        except NonFiniteOutput as error:
            print(f"dsv3-conformance: FAILED: backend {backend.name}: {error}", file=sys.stderr)
            return FAILURE
    if stats is not None:
        print(f"speculative decoding, depth {args.speculative}: {stats.accepted}/{stats.drafted} drafts accepted "
              f"({stats.acceptance:.1%}), {stats.steps_per_token:.2f} main-model steps per token", file=sys.stderr)
    if args.json:
        result = {"prompt": prompt.tolist(), "generated": generated.tolist()}
        if stats is not None:
            result["speculative"] = {"depth": args.speculative, "drafted": stats.drafted, "accepted": stats.accepted,
                                     "main_steps": stats.main_steps}
        print(json.dumps(result))
    else:
        for row in generated:
            print(" ".join(str(int(token)) for token in row))
    return PASS


def _golden_generate(args: argparse.Namespace) -> int:
    from dsv3_conformance.golden.generate import generate_all

    for path in generate_all(Path(args.golden_dir), args.case or None):
        print(f"wrote {path}")
    return PASS


def _golden_make(args: argparse.Namespace) -> int:
    from dsv3_conformance.golden.make import make_case

    if args.prompt:
        prompt = _parse_prompts(args.prompt)
    else:
        batch, length = _parse_shape(args.random)
        config = load_config(args.checkpoint, allow_fields(args.allow_fields))
        prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (batch, length))
    layers = _parse_layers(args.layers, load_config(args.checkpoint, allow_fields(args.allow_fields)))
    meta = make_case(Path(args.out), Path(args.checkpoint), args.producer, prompt, args.steps, layers,
                     positions=_parse_positions(args.positions, prompt.shape[1]),
                     official=Path(args.official) if args.official else None, device=args.device, dtype=args.dtype,
                     copy_weights=args.copy_weights, allow_fields=allow_fields(args.allow_fields),
                     command=" ".join(["dsv3-conformance", *sys.argv[1:]]))
    print(f"wrote {args.out} ({meta['producer']}); check a port with: dsv3-conformance check-golden {args.out} "
          "--backend YOUR_BACKEND")
    return PASS


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--random takes BATCH,LENGTH (two integers), found {text!r}") from None
    if batch < 1 or length < 1:
        raise InputError(f"--random BATCH,LENGTH must both be >= 1, found {text!r}")
    return batch, length


def _parse_layers(text: str | None, config: ModelConfig) -> list[int]:
    if not text:
        return []
    if text == "all":
        return list(range(config.n_layers))
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise InputError(f"--layers takes comma-separated layer numbers or all, found {text!r}") from None


def _parse_positions(text: str | None, length: int) -> tuple[int, ...]:
    """--positions: comma-separated prompt positions, negative ones counted from the end (-1 is the last)."""
    if not text:
        return ()
    try:
        chosen = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--positions takes comma-separated integer positions, found {text!r}") from None
    bad = [position for position in chosen if not -length <= position < length]
    if bad:
        raise InputError(f"--positions {bad}: the prompt has {length} positions")
    return tuple(sorted({position % length for position in chosen}))


def _golden_verify(args: argparse.Namespace) -> int:
    problems = verify(Path(args.golden_dir))
    for problem in problems:
        print(problem)
    print("golden files match the manifest" if not problems else f"{len(problems)} golden file problem(s)")
    return FAILURE if problems else PASS


def mutation_table(results) -> str:
    rows = [(r.mutant, r.backend, r.verdict, "\n".join(r.killed_by + r.errors) or "-") for r in results]
    return tabulate(rows, headers=["mutant", "backend", "verdict", "killed by (what it measured) / errors"],
                    disable_numparse=True, maxcolwidths=[None, None, None, 110])


def _mutants(args: argparse.Namespace) -> int:
    from dsv3_conformance.mutation.catalogue import CATALOGUE
    from dsv3_conformance.mutation.runner import run_catalogue, select, summarize

    if args.list:
        print(tabulate([(m.key, m.origin, m.bug) for m in CATALOGUE], headers=["mutant", "origin", "bug"]))
        return PASS
    try:
        select(args.mutant)
    except KeyError as error:
        raise BadInput(str(error.args[0])) from None
    specs = [backend_spec.strip() for backend_spec in args.backend.split(",")]
    resolve_backends(specs)
    results = run_catalogue(specs, args.mutant, not args.all_checks, args.jobs, args.hypothesis_profile)
    print(mutation_table(results))
    if args.json:
        write_output(args.json, json.dumps([r.to_json() for r in results], indent=2))
    verdict, line = summarize(results)
    print(line)
    if any(r.verdict == "error" for r in results):
        return INTERNAL
    return PASS if verdict == PASSED else FAILURE


def _report(args: argparse.Namespace) -> int:
    from dsv3_conformance.report.build import build_report
    from dsv3_conformance.report.section import section_names

    specs = [spec.strip() for spec in args.backend.split(",")]
    resolve_backends(specs)
    chosen = args.sections.strip()
    known = section_names()
    capabilities = known if chosen == "all" else [] if chosen == "none" else \
        [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(capabilities) - set(known))
    if unknown:
        raise BadInput(f"--sections: unknown section(s) {unknown}: expected 'all', 'none' or a comma-separated "
                       f"list of {', '.join(known)}")
    from dsv3_conformance.checks import CHECKS

    allow = parse_allow(args.allow_missing, set(CHECKS) | {key.split(":")[0] for key in CHECKS})
    report = build_report(Path(args.golden_dir), specs, Path(args.out), suite=args.suite or args.full,
                          mutants="all" if args.full else args.mutants, jobs=args.jobs, profile=args.hypothesis_profile,
                          capabilities=capabilities, allow=allow)
    print(f"wrote {Path(args.out) / 'report.html'}, report.md and report.json")
    print(report.summary())
    return PASS if report.passed else FAILURE


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {text!r}")
        return value
    return parse


# Subcommands of the capabilities that live in their own packages: each registers itself.
CAPABILITY_COMMANDS = (schedule_command, pipeline_step_command, fullscale_commands, experiment_command,
                       scoreboard_command)
# Tools above the harness (the benchmarks) register their commands through this entry point group.
COMMAND_GROUP = "dsv3_conformance.commands"
BACKEND_HELP = "a built-in name (reference, tf), an entry-point name, or package.module:object"
ALLOW_HELP = ("comma-separated parts that may be missing (e.g. mtp,naive,fp8): what the backend cannot run is then "
              "listed but does not make the verdict INCOMPLETE (exit 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3-conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="keep TensorFlow's start-up lines on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    golden = commands.add_parser("check-golden", help="check a backend against one golden case folder")
    golden.add_argument("case_dir")
    golden.add_argument("--backend", default="reference", help=BACKEND_HELP)
    golden.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=None,
                        help="compute dtype (default: the backend's)")
    golden.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    golden.add_argument("--allow-missing", metavar="PARTS", help=ALLOW_HELP)
    golden.add_argument("--allow-fields", metavar="FIELDS", help=ALLOW_FIELDS_HELP)
    golden.set_defaults(run=_check_golden)

    generate = commands.add_parser("generate", help="greedy generation from prompt token ids")
    generate.add_argument("model_dir", help="checkpoint folder (HF or official layout)")
    generate.add_argument("--prompt", action="append", required=True,
                          help="comma-separated token ids; repeat for a batch of equal-length prompts")
    generate.add_argument("--steps", type=_at_least(0), default=16, help="tokens to generate")
    generate.add_argument("--config", help="config file (default: MODEL_DIR/config.json)")
    generate.add_argument("--allow-fields", metavar="FIELDS", help=ALLOW_FIELDS_HELP)
    generate.add_argument("--backend", default="tf", help=BACKEND_HELP)
    generate.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=None)
    generate.add_argument("--gemm-impl", choices=("bf16", "fp8"), default="bf16",
                          help="numerics path for fp8 weights: dequantized (bf16) or fp8 activations")
    generate.add_argument("--speculative", type=_at_least(1), metavar="DEPTH", default=None,
                          help="draft DEPTH tokens at a time with the MTP modules and verify them (greedy "
                               "speculative decoding: the same tokens, fewer main-model steps)")
    generate.add_argument("--json", action="store_true", help="print JSON instead of one line per sequence")
    generate.set_defaults(run=_generate)

    golden_cmd = commands.add_parser("golden", help="golden cases: make one from your checkpoint, regenerate the oracle ones, verify hashes")
    golden_commands = golden_cmd.add_subparsers(dest="golden_command", required=True)
    regenerate = golden_commands.add_parser("generate", help="regenerate the oracle-produced cases (needs the "
                                                             "oracle extra)")
    regenerate.add_argument("--golden-dir", default=str(GOLDEN_DIR))
    regenerate.add_argument("--case", action="append", help="only this case (repeatable)")
    regenerate.set_defaults(run=_golden_generate)
    make = golden_commands.add_parser("make", help="make a golden case from your own checkpoint with a producer you "
                                                   "trust (transformers, the official code, or a backend)")
    make.add_argument("out", help="the case folder DIR/CASE to write; DIR/manifest.json gets its entry")
    make.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json and safetensors)")
    make.add_argument("--producer", required=True, help="hf (transformers from_pretrained), official (the official "
                                                        "inference code, with --official), or a backend name")
    make.add_argument("--official", metavar="CHECKOUT", help="a DeepSeek-V3 repository checkout (--producer official)")
    make.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the official code runs")
    make.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="its compute dtype")
    prompts = make.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="comma-separated token ids; repeat for a batch")
    prompts.add_argument("--random", metavar="BATCH,LENGTH", help="seeded random prompts of this shape")
    make.add_argument("--seed", type=_at_least(0), default=0, help="seed of --random")
    make.add_argument("--steps", type=_at_least(0), default=8, help="greedy decode steps")
    make.add_argument("--layers", help="blocks whose outputs are recorded: comma-separated, or all (default: none, "
                                       "the logits only)")
    make.add_argument("--positions", help="prompt positions whose logits are recorded besides the last: "
                                          "comma-separated, negative from the end (default: none)")
    make.add_argument("--copy-weights", action="store_true", help="copy the weights into the case (default: the "
                                                                  "case names the checkpoint and its fingerprint)")
    make.add_argument("--allow-fields", metavar="FIELDS", help=ALLOW_FIELDS_HELP)
    make.set_defaults(run=_golden_make)
    check = golden_commands.add_parser("verify", help="check every golden file against the manifest's sha256")
    check.add_argument("--golden-dir", default=str(GOLDEN_DIR), help="(default: the shipped cases)")
    check.set_defaults(run=_golden_verify)

    profile_help = "hypothesis profile of the checks (default: $HYPOTHESIS_PROFILE or ci)"
    default_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    mutants = commands.add_parser("mutants", help="plant known bugs in each backend; every one must be caught")
    mutants.add_argument("--backend", default=",".join(DEFAULT_BACKENDS), help="comma-separated backends")
    mutants.add_argument("--mutant", action="append", help="only this mutant (repeatable)")
    mutants.add_argument("--all-checks", action="store_true",
                         help="run every check a mutant names (default: stop each mutant at the first check that "
                              "kills it)")
    mutants.add_argument("--jobs", type=_at_least(1), default=os.cpu_count() or 1, help="worker processes")
    mutants.add_argument("--hypothesis-profile", choices=PROFILES, default=default_profile, help=profile_help)
    mutants.add_argument("--list", action="store_true", help="list the catalogue and exit")
    mutants.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    mutants.set_defaults(run=_mutants)

    report = commands.add_parser("report", help="check every golden case on each backend and write a report")
    report.add_argument("golden_dir", nargs="?", default=str(GOLDEN_DIR), help="golden cases (default: the shipped "
                                                                                "ones)")
    report.add_argument("--backend", default=",".join(DEFAULT_BACKENDS), help="comma-separated backends")
    report.add_argument("--out", default="report", help="folder for report.md, report.json and report.html")
    report.add_argument("--suite", action="store_true", help="add the conformance suite (pytest conformance/)")
    report.add_argument("--mutants", choices=("none", "first-kill", "all"), default="none",
                        help="add the mutation table: each mutant stopped at its first kill, or with all its checks "
                             "(default: none)")
    report.add_argument("--full", action="store_true", help="the full report: the suite and every mutant with all its "
                                                            "checks")
    report.add_argument("--jobs", type=_at_least(1), default=os.cpu_count() or 1, help="processes for the mutants")
    report.add_argument("--hypothesis-profile", choices=PROFILES, default=default_profile, help=profile_help)
    report.add_argument("--allow-missing", metavar="PARTS", help=ALLOW_HELP)
    report.add_argument("--sections", default="all",
                        help="capability sections: all (default), none, or a comma-separated list (mtp, pipeline, "
                             "expert-parallel, ...)")
    report.set_defaults(run=_report)

    from importlib import metadata

    registered = [entry.load() for entry in metadata.entry_points(group=COMMAND_GROUP)]
    for add_command in (*CAPABILITY_COMMANDS, *registered):
        add_command(commands, _at_least)
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('dsv3-conformance')}")
    _show_defaults(parser)
    return parser


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.formatter_class = _DefaultsHelp
                _show_defaults(command)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for a bad option
        return int(exit_.code or 0)
    if not args.verbose:
        quiet()
    try:
        return args.run(args)
    except BadInput as error:
        print(f"dsv3-conformance: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except Unsupported as error:  # the input asks for what the chosen backend does not implement
        print(f"dsv3-conformance: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except OSError as error:  # a file the user named cannot be read (permissions, a folder for a file, ...)
        where = error.filename or "input"
        print(f"dsv3-conformance: error: {where}: {error.strerror or error}", file=sys.stderr)
        return BAD_INPUT
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == PROJECT_PACKAGE:
            raise
        # a dependency of the chosen backend (or of the command) that this environment lacks
        print(f"dsv3-conformance: error: the module {error.name!r} is not installed here, and what was asked for needs "
              f"it (TensorFlow for the tf backends, torch and transformers for the oracle, the llamacpp extra for "
              "llama.cpp)", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("dsv3-conformance: interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug of the harness or a crash of a backend
        traceback.print_exc()
        print("dsv3-conformance: internal error (a bug of the harness or a crash of the backend, traceback above)",
              file=sys.stderr)
        return INTERNAL


if __name__ == "__main__":
    sys.exit(main())
