"""`dsv3-conformance schedule METHOD --ranks R --chunks C`: a schedule as JSON on stdout, nothing else there.

The output is one list per rank of operations in the format of schedules.py. The static checks run first
(static.py); a schedule that fails one is an internal error, reported on stderr with exit status 3.
"""

from __future__ import annotations

import argparse
import json

from dsv3_conformance.pipeline.schedules import METHODS, generate
from dsv3_conformance.pipeline.static import check_schedule


def _schedule(args: argparse.Namespace) -> int:
    schedule = generate(args.method, args.ranks, args.chunks)
    problems = check_schedule(args.method, schedule, args.chunks)
    if problems:
        raise RuntimeError(f"the generated {args.method} schedule fails its static checks: {'; '.join(problems)}")
    print(json.dumps(schedule))
    return 0


def add_command(commands, integer) -> None:
    """Register the subcommand; `integer(minimum)` is the CLI's argparse type for bounded integers."""
    parser = commands.add_parser("schedule", help="a pipeline schedule (DualPipe, DualPipeV, 1F1B, ZB1P) as JSON")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--ranks", type=integer(1), required=True, help="pipeline ranks")
    parser.add_argument("--chunks", type=integer(1), required=True, help="micro-batches")
    parser.set_defaults(run=_schedule)
