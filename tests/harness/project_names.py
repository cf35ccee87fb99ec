"""The project's folders and their importable names: one namespace, dsv3_conformance, over folders that stay where
they are (pyproject.toml's package-dir is the table; `test_the_names_are_pyproject_s` holds the two together)."""

from __future__ import annotations

from pathlib import Path

NAMESPACE = "dsv3_conformance"
NAMES = {"conformance": NAMESPACE, "reference": f"{NAMESPACE}.reference", "impl": f"{NAMESPACE}.impl",
         "benchmarks": f"{NAMESPACE}.benchmarks"}


def module_of(path: Path, root: Path) -> str:
    """The importable name of the module at `path` (a package's __init__.py names the package)."""
    folder, *parts = path.relative_to(root).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NAMES[folder], *parts])


def part_of(module: str) -> str:
    """Which part of the project a module belongs to: reference, impl, format, benchmarks or harness; for a module
    outside the project, its top-level name."""
    top, _, rest = module.partition(".")
    if top != NAMESPACE:
        return top
    second = rest.split(".")[0]
    return second if second in ("reference", "impl", "format", "benchmarks") else "harness"
