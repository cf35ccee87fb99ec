"""The registry of checks: library functions that pytest, the mutation runner and the report all call.

A check takes a `Backend` and returns nothing; it fails only by raising `CheckFailed` (conformance.verdict)
and may raise `Unsupported` when the backend cannot run it. Hypothesis-driven checks draw their examples
under the shared profile (conformance/profiles.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import hypothesis
from hypothesis import given, settings

from .. import profiles  # noqa: F401  (the shared hypothesis profile is loaded before any check is defined)
from ..backends import Backend, Unsupported

SCALES = ("fast", "small", "full")


@dataclass(frozen=True)
class Check:
    key: str  # "<group>:<name>", e.g. "routing:k"
    component: str  # the report's grouping
    function: Callable[[Backend], None]
    doc: str
    scale: str = "fast"  # runs from this --scale tier up
    needs_oracle: bool = False  # needs torch and transformers

    def run(self, backend: Backend) -> None:
        """Run against `backend`; an example the backend cannot run is skipped, all of them: Unsupported."""
        try:
            self.function(backend)
        except hypothesis.errors.Unsatisfiable as error:
            raise Unsupported(f"{self.key}: the backend could run none of the generated examples ({error})") from None


CHECKS: dict[str, Check] = {}


def register(key: str, component: str, function: Callable[[Backend], None], doc: str = "", scale: str = "fast",
             needs_oracle: bool = False) -> Check:
    if key in CHECKS:
        raise ValueError(f"check {key!r} registered twice")
    if scale not in SCALES:
        raise ValueError(f"check {key!r}: unknown scale {scale!r}")
    check = Check(key, component, function, doc or (function.__doc__ or "").strip().splitlines()[0], scale,
                  needs_oracle)
    CHECKS[key] = check
    return check


def check(key: str, component: str, **options) -> Callable[[Callable], Callable]:
    """Decorator form of `register`."""
    def decorate(function: Callable) -> Callable:
        register(key, component, function, **options)
        return function
    return decorate


def examples(*strategies, max_examples: int | None = None, requires: dict | None = None, **named):
    """`hypothesis.given` for a check body taking (backend, drawn values...).

    `requires` (Backend.require's arguments) is checked before any example is drawn; an example the backend
    cannot run (`Unsupported`) is rejected.
    """
    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)
        def tolerant(*args, **kwargs):
            try:
                return body(*args, **kwargs)
            except Unsupported:
                hypothesis.reject()

        given_body = given(*strategies, **named)(tolerant)
        if max_examples:
            given_body = settings(max_examples=max_examples)(given_body)

        @functools.wraps(body)
        def check(backend: Backend) -> None:
            backend.require(**(requires or {}))
            given_body(backend)
        return check
    return decorate
