"""Planting a mutant: replace a function (or constant) of a backend, wherever the backend holds it.

A patch names its target by role and attribute (`"moe:route"`, `"model:TFTransformer.step"`); the
backend's record says which module plays each role. Before planting, every module of the backend's
packages is imported, so that a function imported by name elsewhere (`from .moe import route`) is
found and replaced there too: a mutant targets the function where it is used, not only where it is
defined. Functions and classes are replaced in every module and class that holds the same object;
constants (numbers) only where they are defined, since equal small numbers are shared objects.
Leaving the context restores every holder, whatever happened inside. Caches of the backend's modules
(functools caches, such as the TensorFlow backend's compiled programs) are emptied on entry and exit.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

from dsv3_conformance.backends import Backend
# NotApplicable: the backend has no such role or attribute, so the mutant does not apply to it.
from dsv3_conformance.verdict import NotApplicable


@dataclass(frozen=True)
class Context:
    """What a mutant's maker may use: the module that holds the target, and its array namespace."""

    module: ModuleType
    xp: Any


Maker = Callable[[Any, Context], Any]


def import_backend(backend: Backend) -> None:
    """Import every module of the backend's packages (so that all holders of a target exist)."""
    for package_name in backend.packages:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            importlib.import_module(info.name)


def resolve(backend: Backend, target: str) -> tuple[Any, str, ModuleType]:
    """(owner, attribute, module) of `role:attribute` or `role:Class.attribute` in `backend`."""
    role, _, path = target.partition(":")
    if role not in backend.mutation_targets:
        raise NotApplicable(f"backend {backend.name} names no module for role {role!r}")
    module = importlib.import_module(backend.mutation_targets[role])
    owner: Any = module
    *classes, attribute = path.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name, None)
        if owner is None:
            raise NotApplicable(f"{module.__name__} has no class {class_name!r}")
    if attribute not in vars(owner):
        raise NotApplicable(f"{module.__name__} has no {path!r}")
    return owner, attribute, module


def _holders(original: object, backend: Backend) -> list[tuple[object, str]]:
    """Every (module or class, attribute) of the backend's packages that holds `original`."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not backend.owns(name):
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                found.append((module, attribute))
            elif isinstance(value, type) and value.__module__ == name:
                found += [(value, a) for a, v in vars(value).items() if v is original]
    return found


def clear_caches(backend: Backend) -> None:
    """Empty every functools cache of the backend's modules (compiled programs built before or during a
    planting must not outlive it)."""
    for name, module in list(sys.modules.items()):
        if module is not None and backend.owns(name):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


# The keys of the mutants planted in this process now: checks that run in a process of their own plant them there
# too (conformance.checks.isolated).
PLANTED: list[str] = []


@contextlib.contextmanager
def planted(backend: Backend, mutant) -> Iterator[None]:
    """Every patch of `mutant` (a catalogue.Mutant) in `backend`, its key in PLANTED meanwhile."""
    with contextlib.ExitStack() as stack:
        for patch in mutant.patches:
            stack.enter_context(replaced(backend, patch.target, patch.make))
        PLANTED.append(mutant.key)
        stack.callback(PLANTED.remove, mutant.key)
        yield


@contextlib.contextmanager
def replaced(backend: Backend, target: str, make: Maker) -> Iterator[None]:
    owner, attribute, module = resolve(backend, target)
    original = vars(owner)[attribute]
    new = make(original, Context(module, importlib.import_module(backend.array_namespace)))
    shared = callable(original) or isinstance(original, type)
    holders = _holders(original, backend) if shared else []
    if (owner, attribute) not in holders:
        holders.append((owner, attribute))
    clear_caches(backend)
    with contextlib.ExitStack() as stack:
        stack.callback(clear_caches, backend)
        for holder, name in holders:
            stack.callback(setattr, holder, name, original)
            setattr(holder, name, new)
        yield
