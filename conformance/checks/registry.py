"""The registry of checks: library functions that pytest, the mutation runner and the report all call.

A check takes a `Backend` and returns nothing; it fails only by raising `CheckFailed` (conformance.verdict)
and raises `Unsupported` or `Incomplete` when the backend could not run all of it: what was not run is
not compared, which makes the suite's verdict INCOMPLETE unless the user allows it. A check that does not
apply to a backend by its definition (the reference is the float64 oracle it would be compared with) says
so before it runs (`applies`): that is neither a pass nor something missing. Hypothesis-driven checks draw
their examples under the shared profile (conformance/profiles.py); an example the backend cannot run is
replaced by another, and counted as not compared.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import hypothesis
from hypothesis import given, settings

# The shared hypothesis profile is loaded before any check is defined.
from dsv3_conformance import profiles  # noqa: F401
from dsv3_conformance.backends import Backend, Unsupported
from dsv3_conformance.verdict import Incomplete, Missing, NotApplicable

SCALES = ("fast", "small", "full")


@dataclass(frozen=True)
class Check:
    key: str  # "<group>:<name>", e.g. "routing:k"
    component: str  # the report's grouping
    function: Callable[[Backend], None]
    doc: str
    scale: str = "fast"  # runs from this --scale tier up
    needs_oracle: bool = False  # needs torch and transformers
    applies: Callable[[Backend], str | None] = lambda backend: None  # why the check does not apply, if it does not

    @property
    def family(self) -> str:
        return self.key.split(":")[0]

    def run(self, backend: Backend) -> None:
        """Run against `backend`. NotApplicable before anything runs when the check does not apply; Unsupported
        when the backend ran none of it, Incomplete when it ran only some (both: not compared)."""
        reason = self.applies(backend)
        if reason:
            raise NotApplicable(reason)
        if self.needs_oracle:
            _require_oracle()
        _REJECTED.clear()
        try:
            self.function(backend)
        except hypothesis.errors.Unsatisfiable as error:
            raise Unsupported(f"{self.key}: the backend could run none of the generated examples ({error})",
                              _REJECTED[0].part if _REJECTED else None) from None
        if _REJECTED:
            parts = {}
            for reason in _REJECTED:
                parts.setdefault((reason.part or self.family, str(reason)), 0)
                parts[(reason.part or self.family, str(reason))] += 1
            raise Incomplete([Missing(self.key, part, f"{count} generated example(s) not run: {why}", self.key)
                              for (part, why), count in parts.items()])

    def missing(self, reason: Exception) -> list[Missing]:
        """What a run that raised `reason` (Unsupported or Incomplete) did not compare."""
        if isinstance(reason, Incomplete):
            return [dataclasses.replace(item, check=self.key) for item in reason.missing]
        return [Missing(self.key, getattr(reason, "part", None) or self.family, str(reason), self.key)]


# Unsupported examples of the check being run (hypothesis replaces them; the check then reports them).
_REJECTED: list[Unsupported] = []


def _require_oracle() -> None:
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("torch", "transformers")):
        raise Unsupported("needs the oracle extra: pip install 'dsv3-conformance[oracle]'", "oracle")


CHECKS: dict[str, Check] = {}


def register(key: str, component: str, function: Callable[[Backend], None], doc: str = "", scale: str = "fast",
             needs_oracle: bool = False, applies: Callable[[Backend], str | None] | None = None) -> Check:
    if key in CHECKS:
        raise ValueError(f"check {key!r} registered twice")
    if scale not in SCALES:
        raise ValueError(f"check {key!r}: unknown scale {scale!r}")
    check = Check(key, component, function, doc or (function.__doc__ or "").strip().splitlines()[0], scale,
                  needs_oracle, applies or (lambda backend: None))
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
    cannot run (`Unsupported`) is rejected, and recorded: the check then reports it as not compared.
    """
    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)
        def tolerant(*args, **kwargs):
            try:
                return body(*args, **kwargs)
            except Unsupported as reason:
                _REJECTED.append(reason)
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
