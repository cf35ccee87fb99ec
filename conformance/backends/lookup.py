"""Finding a backend by name: a built-in name, then the Python entry points of group `conformance.backends`,
then `package.module:object` naming a `Backend` anywhere on the path. So a user checks their own implementation
with `--backend mypkg.backend:BACKEND` in pytest, `check-golden` and `report` alike, without editing the harness
(the way ONNX's backend test suite runs any backend)."""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Sequence

from dsv3_conformance.backends.builtin import BUILTIN
from dsv3_conformance.backends.interface import Backend, BackendError

ENTRY_POINT_GROUP = "dsv3_conformance.backends"


def _from_entry_points(name: str) -> Backend | None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as error:  # a broken plugin is the user's input
                raise BackendError(f"backend {name!r}: entry point {entry.value!r} failed to load ({error})") from None
    return None


def _from_path(spec: str) -> Backend:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BackendError(f"backend {spec!r}: cannot import module {module_name!r} ({error})") from None
    backend = module
    for part in attribute.split("."):
        backend = getattr(backend, part, None)
        if backend is None:
            raise BackendError(f"backend {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    return backend


def resolve_backend(spec: str | Backend) -> Backend:
    """The backend named `spec`: a built-in name, an entry point name, or `package.module:object`."""
    if isinstance(spec, Backend):
        return spec
    spec = spec.strip()
    backend = BUILTIN.get(spec) or (_from_path(spec) if ":" in spec else _from_entry_points(spec))
    if backend is None:
        installed = sorted(entry.name for entry in metadata.entry_points(group=ENTRY_POINT_GROUP))
        raise BackendError(f"unknown backend {spec!r}: expected one of {', '.join([*BUILTIN, *installed])}, an entry "
                           f"point of group {ENTRY_POINT_GROUP!r}, or package.module:object")
    if not isinstance(backend, Backend):
        raise BackendError(f"backend {spec!r} is a {type(backend).__name__}, not a dsv3_conformance.backends.Backend")
    problems = backend.contract_problems()
    if problems:
        raise BackendError(f"backend {spec!r} does not declare what the harness needs: {'; '.join(problems)}")
    return backend


def resolve_backends(specs: str | Sequence[str]) -> list[Backend]:
    """Comma-separated (or listed) backend specs, each resolved; duplicates refused."""
    names = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not names:
        raise BackendError("no backend given")
    backends = [resolve_backend(name) for name in names]
    seen = [b.name for b in backends]
    if len(set(seen)) != len(seen):
        raise BackendError(f"backend given twice: {seen}")
    return backends
