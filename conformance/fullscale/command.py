"""Commands for real checkpoints: `verify-checkpoint`, `params`, `synthetic-checkpoint`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from dsv3_conformance.format.checkpoint import open_checkpoint
from dsv3_conformance.format.config import ALLOW_FIELDS_HELP, allow_fields, load_config, preset
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.verdict import FAILED, PASSED, outcome, parse_allow, summary_line


def _layers(text: str, config) -> list[int]:
    if text == "all":
        return list(range(config.n_layers + config.n_mtp_layers))
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--layers takes comma-separated layer indices or 'all', found {text!r}") from None
    last = config.n_layers + config.n_mtp_layers - 1
    bad = [layer for layer in layers if not 0 <= layer <= last]
    if bad or not layers:
        raise BadInput(f"--layers: expected indices in [0, {last}] (num_hidden_layers={config.n_layers} plus "
                       f"{config.n_mtp_layers} MTP layer(s)), found {text!r}")
    return layers


def _verify(args: argparse.Namespace) -> int:
    from dsv3_conformance.fullscale.integrity import check_integrity
    from dsv3_conformance.fullscale.numeric import verify_layers

    allow = parse_allow(args.allow_missing)
    folder = Path(args.checkpoint)
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a checkpoint folder")
    config = load_config(args.config or folder, allow_fields(args.allow_fields))
    try:
        integrity = check_integrity(folder, config, hash_files=args.hash, finite=not args.headers_only)
    except FileNotFoundError as error:
        raise BadInput(str(error)) from None
    print(f"integrity of {folder} against {args.config or folder / 'config.json'}: {integrity.tensors} tensors, "
          f"{integrity.bytes / 2**30:.2f} GiB in {len(integrity.shards)} shard(s)")
    print(tabulate(integrity.shards, headers="keys", disable_numparse=True))
    if integrity.problems:
        print(tabulate([p.row() for p in integrity.problems], headers="keys", disable_numparse=True,
                       maxcolwidths=[70, 40, 90]))
    print(f"{'PASSED' if integrity.passed else 'FAILED'}: {len(integrity.problems)} integrity problem(s)")
    result = {"checkpoint": str(folder), "integrity": {"passed": integrity.passed, "shards": integrity.shards,
                                                        "problems": [p.row() for p in integrity.problems]}}
    status = 0 if integrity.passed else 1
    if not args.integrity_only and args.layers and integrity.passed:
        layers = _layers(args.layers, config)
        with open_checkpoint(folder) as checkpoint:
            rows = verify_layers(checkpoint, config, layers, args.tokens, args.backend.split(","),
                                 random_hidden=args.random_hidden, seed=args.seed, oracle=args.oracle)
        print(tabulate([row.row(allow) for row in rows], headers="keys", disable_numparse=True, maxcolwidths=60))
        missing = [m for row in rows for m in row.missing]
        failed = [row for row in rows if row.failed]
        verdict = outcome(bool(failed), sum(row.compared for row in rows), missing, allow)
        if verdict == FAILED:
            print(f"FAILED: {len(failed)} of {len(rows)} layers failed (on "
                  f"{', '.join(sorted({name for row in failed for name in row.failed}))})", end="")
        else:
            print(summary_line(verdict, sum(row.compared for row in rows), 0, "layer comparisons", missing, allow),
                  end="")
        print(f"; peak resident {max(row.peak_gib for row in rows):.2f} GiB")
        result["layers"] = [row.row(allow) for row in rows]
        result["verdict"] = verdict
        result["not_compared"] = [{"what": m.what, "part": m.part, "reason": m.reason} for m in missing]
        status = status or (0 if verdict == PASSED else 1)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return status


def _params(args: argparse.Namespace) -> int:
    from dsv3_conformance.fullscale.params import count_parameters

    config = load_config(args.config) if args.config else preset(args.preset)
    print(tabulate(count_parameters(config).rows(), headers="keys", disable_numparse=True))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from dsv3_conformance.fullscale.synthetic import ci_scale_config, full_scale_config, write_synthetic

    config = full_scale_config(args.moe_layers) if args.scale == "full" else ci_scale_config()
    folder = write_synthetic(args.out, config, seed=args.seed, shard_bytes=args.shard_mib << 20)
    print(f"wrote {folder}", file=sys.stderr)
    return 0


def add_command(commands, integer) -> None:
    verify = commands.add_parser("verify-checkpoint", help="a checkpoint against its config: integrity from the "
                                                           "headers, then layers numerically in bounded memory")
    verify.add_argument("checkpoint")
    verify.add_argument("--config", help="config file (default: CHECKPOINT/config.json)")
    verify.add_argument("--allow-fields", metavar="FIELDS", help=ALLOW_FIELDS_HELP)
    verify.add_argument("--integrity-only", action="store_true", help="stop after the integrity checks")
    verify.add_argument("--hash", action="store_true", help="sha256 of every shard (streamed)")
    verify.add_argument("--headers-only", action="store_true", help="skip the NaN/Inf scan of the data")
    verify.add_argument("--layers", help="comma-separated layers to verify numerically (num_hidden_layers + k: MTP "
                                         "module k), or all")
    verify.add_argument("--tokens", type=integer(1), default=16,
                        help="tokens per sequence (two sequences run at once)")
    verify.add_argument("--backend", default="tf", help="backends compared with the float64 reference")
    verify.add_argument("--random-hidden", action="store_true",
                        help="seeded random input hidden states instead of streaming the layers below")
    verify.add_argument("--seed", type=integer(0), default=0)
    verify.add_argument("--oracle", action="store_true",
                        help="compare the transformers decoder layer too (where every expert of a layer is resident)")
    verify.add_argument("--allow-missing", metavar="PARTS", help="comma-separated parts that may be not compared "
                                                                  "(e.g. mtp, layers, oracle)")
    verify.add_argument("--json", metavar="OUT")
    verify.set_defaults(run=_verify)

    params = commands.add_parser("params", help="parameter accounting of a config (total, activated, MTP, stored)")
    params.add_argument("--config")
    params.add_argument("--preset", default="deepseek-v3-671b")
    params.set_defaults(run=_params)

    synthetic = commands.add_parser("synthetic-checkpoint", help="write a synthetic checkpoint in the released "
                                                                 "layout (random weights)")
    synthetic.add_argument("out")
    synthetic.add_argument("--scale", choices=("ci", "full"), default="ci")
    synthetic.add_argument("--moe-layers", type=integer(1), default=1, help="full scale: MoE layers after the 3 dense")
    synthetic.add_argument("--seed", type=integer(0), default=0)
    synthetic.add_argument("--shard-mib", type=integer(1), default=1024)
    synthetic.set_defaults(run=_synthetic)
