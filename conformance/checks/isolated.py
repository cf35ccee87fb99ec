"""Checks that run in a process of their own, carrying the mutants planted in this one.

The pipeline executor and the expert-parallel layer need TensorFlow to start with several logical devices,
which a process that already ran TensorFlow cannot get. Their checks run a module of the harness in a fresh
Python with the backend and the keys of the mutants planted here (conformance.mutation.planting.PLANTED); the
module plants the same mutants there before it runs (`planted_from`), so a mutant reaches these checks as it
reaches every other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

from dsv3_conformance.backends import Backend, resolve_backend


def run_isolated(module: str, backend: Backend, *arguments: str, timeout: float = 900) -> dict:
    """`python -m module --backend NAME [--mutant KEY ...] arguments`, which prints one JSON object: that object."""
    from dsv3_conformance.mutation.planting import PLANTED

    command = [sys.executable, "-m", module, "--backend", backend.name, *(f"--mutant={key}" for key in PLANTED),
               *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")})
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="tf")
    parser.add_argument("--mutant", action="append", default=[], help="plant this catalogue mutant first")


def planted_from(arguments: argparse.Namespace) -> tuple[Backend, contextlib.ExitStack]:
    """The backend named by the arguments, and a context holding every mutant they name planted in it."""
    from dsv3_conformance.mutation.catalogue import MUTANTS
    from dsv3_conformance.mutation.planting import import_backend, planted

    backend = resolve_backend(arguments.backend)
    stack = contextlib.ExitStack()
    if arguments.mutant:
        import_backend(backend)
        for key in arguments.mutant:
            stack.enter_context(planted(backend, MUTANTS[key]))
    return backend, stack
