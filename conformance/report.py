"""The conformance report over the shipped golden cases: report.md and report.json."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate
from tqdm.auto import tqdm

from .golden import CaseResult, GoldenCase, check_case
from .manifest import case_dirs, verify


def versions() -> dict[str, str]:
    """Versions of everything a result depends on (absent packages are left out)."""
    from importlib import metadata

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("dsv3-conformance", "numpy", "ml_dtypes", "tensorflow", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


@dataclass
class Report:
    golden_dir: Path
    manifest_problems: list[str]
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.manifest_problems and all(case.passed for case in self.cases)

    def summary(self) -> str:
        rows = [(c.case, c.backend, sum(r.passed for r in c.results), len(c.results),
                 max((r.rel_err for r in c.results), default=float("nan")), "pass" if c.passed else "FAIL")
                for c in self.cases]
        table = tabulate(rows, headers=["case", "backend", "passed", "checked", "worst rel_err", "status"],
                         floatfmt=".2e")
        integrity = ("golden files match the manifest" if not self.manifest_problems else
                     "GOLDEN FILES DO NOT MATCH THE MANIFEST:\n" + "\n".join(f"  {p}" for p in self.manifest_problems))
        return f"{integrity}\n{table}\n{'PASSED' if self.passed else 'FAILED'}"

    def to_json(self) -> dict:
        return {"passed": self.passed, "golden_dir": str(self.golden_dir), "versions": versions(),
                "manifest_problems": self.manifest_problems, "cases": [case.to_json() for case in self.cases]}

    def to_markdown(self) -> str:
        parts = ["# DeepSeek-V3 conformance report", "", f"Overall: **{'PASSED' if self.passed else 'FAILED'}**", "",
                 "## Versions", "", tabulate(sorted(versions().items()), headers=["component", "version"],
                                               tablefmt="github"), "", "## Golden integrity", ""]
        parts += [f"- {p}" for p in self.manifest_problems] or ["All golden files match their sha256 in the manifest."]
        for case in self.cases:
            rows = [(r.name, f"{r.rel_err:.3e}", f"{r.max_abs:.3e}", f"{r.tolerance:.1e}",
                     "pass" if r.passed else "**FAIL**") for r in case.results]
            parts += ["", f"## {case.case} on {case.backend}", "",
                      tabulate(rows, headers=["tensor", "rel_err", "max_abs", "tolerance", "status"],
                               tablefmt="github")]
        return "\n".join(parts) + "\n"


def build_report(golden_dir: Path, backends: list[str], out: Path) -> Report:
    """Verify the golden manifest, check every case on every backend, write report.md and report.json."""
    report = Report(golden_dir, [str(problem) for problem in verify(golden_dir)])
    cases = [GoldenCase.load(path) for path in case_dirs(golden_dir)]
    jobs = [(case, backend) for case in cases for backend in backends]
    weights = {}
    for case, backend in tqdm(jobs, desc="golden checks", unit="run"):
        weights.setdefault(case.path, case.weights())
        report.cases.append(check_case(case, backend, weights=weights[case.path]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out / "report.md").write_text(report.to_markdown())
    return report
