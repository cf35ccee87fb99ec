"""A section of the report beyond the golden cases and the suite: a capability's table, figures and verdict, and
where the sections come from (this package's modules, and any registered through the entry point group
`conformance.report_sections`, as the benchmarks register theirs)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

SECTION_GROUP = "dsv3_conformance.report_sections"
# name -> module of this package whose report_section(golden_dir, backends, out) computes it
BUILTIN_SECTIONS = {name: f"dsv3_conformance.report.{module}" for name, module in
                    {"mtp": "mtp", "fp8": "fp8", "pipeline": "pipeline", "expert-parallel": "expert_parallel",
                     "training": "training"}.items()}


@dataclass
class Section:
    """A table (and its figures) a capability contributes to the report."""

    title: str
    introduction: str
    rows: list[dict]
    figures: dict[str, Path] = field(default_factory=dict)
    passed: bool = True  # a capability's own verdict; a failed section fails the report
    # Numbers not computed in this run: where and when they were measured (shown with the section).
    stored: str = ""
    # claim -> whether it holds, as measured (a claim that does not hold is shown at the top of the report)
    claims: dict[str, bool] = field(default_factory=dict)


def stored_note(result: dict, path: Path) -> str:
    """Where and when a stored result file was measured, from its own record (or the file's date)."""
    from datetime import datetime, timezone

    where = result.get("machine")
    if isinstance(where, dict):
        where = f"{where.get('cpu', 'unknown CPU')}, {where.get('cores', '?')} cores"
    when = result.get("date") or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date().isoformat()
    return f"stored results, not measured in this run: {path.name}, on {where or 'a machine not recorded'}, {when}"


def capability_sections() -> dict[str, Callable]:
    """name -> report_section(golden_dir, backends, out) of every section: the built-in ones, then the registered."""
    sections = {name: importlib.import_module(module).report_section for name, module in BUILTIN_SECTIONS.items()}
    for entry in metadata.entry_points(group=SECTION_GROUP):
        sections.setdefault(entry.name, entry.load())
    return sections


def section_names() -> list[str]:
    return [*BUILTIN_SECTIONS, *(entry.name for entry in metadata.entry_points(group=SECTION_GROUP)
                                 if entry.name not in BUILTIN_SECTIONS)]
