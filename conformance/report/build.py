"""`dsv3-conformance report`: the conformance report over the shipped golden cases.

It verifies the golden files, checks every case on every backend, runs the suite (pytest with the
report plugin, so that every comparison is recorded), plants the mutation catalogue, measures expert
load on the golden prompts, and writes report.md, report.json and report.html (figures embedded).
"""

from __future__ import annotations

import base64
import html
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate
from tqdm.auto import tqdm

from dsv3_conformance.report import plots
from dsv3_conformance.backends import resolve_backend
from dsv3_conformance.checks import CHECKS
from dsv3_conformance.golden.divergences import DIVERGENCES
from dsv3_conformance.golden.cases import CaseResult, GoldenCase, check_case
from dsv3_conformance.golden.manifest import case_dirs, verify
from dsv3_conformance.mutation.runner import CheckRun, MutantResult, run_catalogue, summarize
from dsv3_conformance.report.loads import expert_loads
from dsv3_conformance.report.runs import provenance, run_suite
from dsv3_conformance.report.scoreboard import table as scoreboard_table
from dsv3_conformance.report.section import Section, capability_sections, section_names
from dsv3_conformance.tolerances import POLICY
from dsv3_conformance.verdict import FAILED, INCOMPLETE, PASSED, Missing, allowed, outcome

def versions() -> dict[str, str]:
    """Versions of everything a result depends on (absent packages are left out)."""
    from importlib import metadata

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("dsv3-conformance", "numpy", "ml_dtypes", "tensorflow", "torch", "transformers", "hypothesis",
                    "llama_cpp_python", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def suite_controls(rows: list[dict]) -> dict[tuple[str, str], CheckRun]:
    """The suite's unmutated runs of registered checks, as control runs for the mutation table."""
    outcomes = {"passed": "passed", "failed": "failed", "skipped": "unsupported"}
    return {(row["check"], row["backend"]): CheckRun(row["check"], outcomes.get(row["outcome"], "error"), row["message"])
            for row in rows if row.get("check") in CHECKS and row.get("backend")}


def _extra_sections(golden_dir: Path, backends: list[str], out: Path, names) -> list[Section]:
    sections = capability_sections()
    return [sections[name](golden_dir, backends, out) for name in tqdm(names, desc="capability sections",
                                                                      unit="section")]


@dataclass
class Report:
    golden_dir: Path
    manifest_problems: list[str]
    cases: list[CaseResult] = field(default_factory=list)
    suite_status: int | None = None
    suite: list[dict] = field(default_factory=list)
    mutants: list[MutantResult] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    extra: list[Section] = field(default_factory=list)
    allow: tuple[str, ...] = ()
    made: dict[str, str] = field(default_factory=provenance)

    def missing(self) -> list[tuple[str, Missing]]:
        """(where, what) of everything expected that was not compared: golden tensors, suite checks, and backends
        no mutant applies to."""
        found = [(f"golden {case.case} on {case.backend}", m) for case in self.cases for m in case.missing]
        found += [(f"suite on {row['backend']}", Missing(*fields, row["check"])) for row in self.suite
                  for fields in row.get("not_compared", [])]
        if self.mutants is not None:
            for name in dict.fromkeys(m.backend for m in self.mutants):
                if all(m.verdict == "not applicable" for m in self.mutants if m.backend == name):
                    found.append((f"mutants on {name}", Missing("the mutation catalogue", "mutation",
                                                                "no mutant applies: the backend declares no "
                                                                "mutation targets")))
        return found

    @property
    def verdict(self) -> str:
        failed = (bool(self.manifest_problems) or any(case.verdict == FAILED for case in self.cases)
                  or any(row["outcome"] == "failed" for row in self.suite)
                  or self.suite_status not in (None, 0, 1)
                  or (self.suite_status == 1 and not any(row.get("not_compared") for row in self.suite))
                  or any(not m.ok for m in self.mutants or []) or not all(section.passed for section in self.extra))
        compared = sum(len(case.results) for case in self.cases) + sum(row["outcome"] == "passed" for row in self.suite)
        return outcome(failed, compared, [m for _, m in self.missing()], self.allow)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    def backend_rows(self) -> list[dict]:
        """One line per backend: its golden cases, its suite checks, its mutants, and what was not compared."""
        rows = []
        for name in dict.fromkeys([c.backend for c in self.cases] + [r["backend"] for r in self.suite if r["backend"]]):
            cases = [c for c in self.cases if c.backend == name]
            checks = [r for r in self.suite if r["backend"] == name]
            mutants = [m for m in self.mutants or [] if m.backend == name]
            missing = [m for where, m in self.missing() if where.endswith(f" on {name}")]
            failed = any(c.verdict == FAILED for c in cases) or any(r["outcome"] == "failed" for r in checks) or \
                any(not m.ok for m in mutants)
            compared = sum(len(c.results) for c in cases) + sum(r["outcome"] == "passed" for r in checks)
            row = {"backend": name, "verdict": outcome(failed, compared, missing, self.allow),
                   "golden cases": f"{sum(c.verdict == PASSED for c in cases)} of {len(cases)} passed"}
            if self.suite:
                row["suite checks"] = f"{sum(r['outcome'] == 'passed' for r in checks)} passed, " \
                                      f"{sum(r['outcome'] == 'failed' for r in checks)} failed of {len(checks)}"
            if self.mutants is not None:
                row["mutants"] = f"{sum(m.ok for m in mutants)} of {len(mutants)} as expected"
            row["not compared"] = ", ".join(sorted({m.part for m in missing})) or "nothing"
            rows.append(row)
        return rows

    def claims(self) -> dict[str, bool]:
        return {claim: held for section in self.extra for claim, held in section.claims.items()}

    def divergences(self) -> list[dict]:
        observed = {row["nodeid"].split("[")[-1].rstrip("]"): row["outcome"] for row in self.suite
                    if row["check"].startswith("test_known_divergence_still_exists[")}
        return [{"divergence": d.key, "source": d.source, "description": d.description,
                 "still observed": {"passed": "yes", "failed": "NO (record out of date)", "skipped": "not checked"}
                 .get(observed.get(d.key), "not run" if d.example else "not runnable (official code)")}
                for d in DIVERGENCES]

    def component_summary(self) -> list[dict]:
        summary: dict[tuple[str, str], dict] = {}
        for row in self.suite:
            entry = summary.setdefault((row["component"], row["backend"] or "-"), {
                "component": row["component"], "backend": row["backend"] or "-", "passed": 0, "failed": 0,
                "skipped": 0, "comparisons": 0, "worst rel_err / tolerance": 0.0})
            entry[row["outcome"]] = entry.get(row["outcome"], 0) + 1
            for comparison in row["comparisons"]:
                entry["comparisons"] += 1
                if comparison["tolerance"] > 0:
                    ratio = comparison["rel_err"] / comparison["tolerance"]
                    entry["worst rel_err / tolerance"] = max(entry["worst rel_err / tolerance"], ratio)
        for entry in summary.values():
            entry["status"] = "FAIL" if entry["failed"] else "pass"
            entry["worst rel_err / tolerance"] = f"{entry['worst rel_err / tolerance']:.2e}"
        return list(summary.values())

    def check_rows(self) -> list[dict]:
        rows = []
        for row in self.suite:
            worst = max(row["comparisons"], key=lambda c: c["rel_err"] / c["tolerance"] if c["tolerance"] else
                        (0 if c["rel_err"] == 0 else float("inf")), default=None)
            rows.append({"component": row["component"], "check": row["check"], "backend": row["backend"] or "-",
                         "status": row["outcome"], "metric": "rel_err" if worst else "exact or invariant",
                         "comparisons": len(row["comparisons"]),
                         "worst rel_err": f"{worst['rel_err']:.2e}" if worst else "-",
                         "tolerance": f"{worst['tolerance']:.0e} ({worst['policy']})" if worst else "-",
                         "note": row["message"][:160]})
        return rows

    def scoreboard(self) -> list[dict]:
        """The suite's rows as the scoreboard's table: backend x check family."""
        return scoreboard_table(self.suite, list(dict.fromkeys(row["backend"] for row in self.suite if row["backend"])))

    def mutation_rows(self) -> list[dict]:
        return [{"mutant": m.mutant, "backend": m.backend, "verdict": m.verdict,
                 "killed by (measured)": "; ".join(m.killed_by) or "-",
                 "errors": "; ".join(m.errors) or "-"} for m in self.mutants or []]

    def golden_rows(self) -> list[dict]:
        return [{"case": c.case, "backend": c.backend, "passed": sum(r.passed for r in c.results),
                 "checked": len(c.results), "not compared": len(c.missing),
                 "worst rel_err": f"{max(r.rel_err for r in c.results):.2e}" if c.results else "-",
                 "status": {PASSED: "pass", FAILED: "FAIL", INCOMPLETE: "INCOMPLETE"}[c.verdict]} for c in self.cases]

    def missing_rows(self) -> list[dict]:
        return [{"where": where, "not compared": m.check or m.what, "what": m.what if m.check else "",
                 "part": m.part, "allowed": "yes" if allowed(m, self.allow) else "NO", "why": m.reason[:200]}
                for where, m in self.missing()]

    def summary(self) -> str:
        lines = ["golden files match the manifest" if not self.manifest_problems else
                 "GOLDEN FILES DO NOT MATCH THE MANIFEST:\n" + "\n".join(f"  {p}" for p in self.manifest_problems),
                 tabulate(self.golden_rows(), headers="keys", disable_numparse=True)]
        if self.suite_status is not None:
            lines.append(f"suite: {'passed' if self.suite_status == 0 else 'FAILED'} ({len(self.suite)} checks)")
        if self.mutants is not None:
            lines.append(f"mutants: {summarize(self.mutants)[1]}")
        missing = self.missing()
        if missing:
            lines.append(tabulate(self.missing_rows(), headers="keys", disable_numparse=True,
                                  maxcolwidths=[None, None, None, None, None, 80]))
        parts = sorted({m.part for _, m in missing if not allowed(m, self.allow)})
        lines.append(self.verdict + (f": not compared ({', '.join(parts)}); allow with --allow-missing "
                                     f"{','.join(parts)}" if self.verdict == INCOMPLETE and parts else
                                     f" (allowed missing: {', '.join(sorted({m.part for _, m in missing}))})"
                                     if missing and self.verdict == PASSED else ""))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "passed": self.passed, "allowed_missing": list(self.allow),
                "not_compared": self.missing_rows(), "golden_dir": str(self.golden_dir), "versions": versions(),
                "manifest_problems": self.manifest_problems, "golden": [c.to_json() for c in self.cases],
                "suite_status": self.suite_status, "components": self.component_summary(), "checks": self.suite,
                "scoreboard": self.scoreboard(),
                "mutants": [m.to_json() for m in self.mutants or []], "known_divergences": self.divergences(),
                "tolerances": {key: {"value": t.value, "basis": t.basis} for key, t in POLICY.items()},
                "sections": {section.title: section.rows for section in self.extra},
                "provenance": self.made, "backends": self.backend_rows(), "claims": self.claims(),
                "stored": {section.title: section.stored for section in self.extra if section.stored}}

    def sections(self) -> list[tuple[str, str, list[dict]]]:
        """(title, introduction, rows) of every table, shared by the markdown and the HTML."""
        integrity = [{"problem": p} for p in self.manifest_problems] or [
            {"problem": "none: every golden file matches its sha256 in golden/manifest.json"}]
        sections = [
            ("Summary", "The verdict per backend, and what was not compared.", self.backend_rows()),
            ("Provenance", "When, from what and where this report was made; the versions it depends on.",
             [{"what": k, "value": v} for k, v in {**self.made, **versions()}.items()]),
            ("Golden integrity", "sha256 of every golden file against the manifest.", integrity),
            ("Golden cases", "Each backend against every expected tensor of every case (details below).",
             self.golden_rows()),
        ]
        if self.missing():
            sections.append(("Not compared", "What was expected and not compared: INCOMPLETE unless allowed "
                                             "(--allow-missing).", self.missing_rows()))
        if self.suite:
            sections.append(("Scoreboard", "Every check family on each backend: its checks passed, FAILED, not "
                                           "compared or not applicable, and the comparison nearest its bound (as "
                                           "`dsv3-conformance scoreboard` writes it).", self.scoreboard()))
            sections += [("Components", "The suite per component and backend; worst ratio of an observed error "
                                        "to its tolerance (below 1 passes).", self.component_summary()),
                         ("Checks", "Every check of the suite: its worst comparison and the policy entry it uses.",
                          self.check_rows())]
        if self.mutants is not None:
            sections.append(("Mutation kill table", "Known bug classes planted in each backend, the checks that "
                                                    "caught them (each passed unmutated first) and what they measured; "
                                                    "control mutants change nothing and must survive.",
                             self.mutation_rows()))
        sections.append(("Known divergences", "Where an oracle or the official code departs from the official "
                                              "semantics: recorded, not absorbed by tolerances.", self.divergences()))
        sections += [(section.title, section.introduction + (f" ({section.stored}.)" if section.stored else ""),
                      section.rows) for section in self.extra]
        return sections

    def case_sections(self) -> list[tuple[str, list[dict]]]:
        return [(f"Golden case {case.case} on {case.backend}", [r.table_row() for r in case.results])
                for case in self.cases]

    def to_markdown(self) -> str:
        parts = ["# DeepSeek-V3 conformance report", "", f"Overall: **{self.verdict}**", "", VERDICTS]
        parts += [f"- claim that does not hold, as measured: {claim}" for claim, held in self.claims().items()
                  if not held]
        for title, intro, rows in self.sections():
            parts += ["", f"## {title}", "", intro, "",
                      tabulate(_cells(rows), headers="keys", tablefmt="github", disable_numparse=True)]
        parts += ["", "## Figures", ""] + [f"![{name}]({path.name})" for name, path in self.figures.items()]
        for title, rows in self.case_sections():
            parts += ["", f"### {title}", "", tabulate(_cells(rows), headers="keys", tablefmt="github",
                                                         disable_numparse=True)]
        return "\n".join(parts) + "\n"

    def to_html(self) -> str:
        verdict = self.verdict
        sections = self.sections()
        anchors = [f"s{index}" for index in range(len(sections))]
        failing = [claim for claim, held in self.claims().items() if not held]
        parts = [f"<h1>DeepSeek-V3 conformance report</h1><p class='verdict {verdict.lower()}'>{verdict}</p>",
                 f"<p class='made'>{html.escape(self.made['made'])}, commit {html.escape(self.made['commit'])}, "
                 f"{html.escape(self.made['machine'])}: <code>{html.escape(self.made['command'])}</code></p>",
                 f"<p>{html.escape(VERDICTS)}</p>"]
        if failing:
            parts.append("<div class='claims'><b>Claims that do not hold, as measured:</b><ul>" +
                         "".join(f"<li>{html.escape(claim)}</li>" for claim in failing) + "</ul></div>")
        contents = [(anchor, title) for anchor, (title, _, _) in zip(anchors, sections)]
        contents += [("figures", "Figures"), ("cases", "Golden cases in detail")]
        parts.append("<nav><b>Contents</b><ol>" + "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>"
                                                          for a, t in contents) + "</ol></nav>")
        for anchor, (title, intro, rows) in zip(anchors, sections):
            body = _table(rows)
            if len(rows) > COLLAPSE_ROWS:
                body = f"<details><summary>{len(rows)} rows</summary>{body}</details>"
            parts.append(f"<h2 id='{anchor}'>{html.escape(title)}</h2><p>{html.escape(intro)}</p>{body}")
        parts.append("<h2 id='figures'>Figures</h2>")
        for name, path in self.figures.items():
            encoded = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,"
                         f"{encoded}'>")
        parts.append("<h2 id='cases'>Golden cases in detail</h2>")
        for title, rows in self.case_sections():
            parts.append(f"<details><summary>{html.escape(title)}</summary>{_table(rows)}</details>")
        return f"<!doctype html><html><head><meta charset='utf-8'><title>DeepSeek-V3 conformance report</title>" \
               f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"


COLLAPSE_ROWS = 40  # a longer table starts collapsed


def _cell(value: object) -> str:
    """A value as a table shows it: numbers short, sequences joined, no Python reprs, one line of a message."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    text = str(value).strip().splitlines()[0] if str(value).strip() else ""
    return text if len(text) <= 240 else text[:237] + "..."


def _cells(rows: list[dict]) -> list[dict]:
    return [{key: _cell(value) for key, value in row.items()} for row in rows]


def _table(rows: list[dict]) -> str:
    """An HTML table whose header is every key of every row, in order: no row longer than its header."""
    if not rows:
        return "<p>(none)</p>"
    keys = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f'<td class="{_css_class(_cell(row.get(k, "")))}">{html.escape(_cell(row.get(k, "")))}'
                                    "</td>" for k in keys) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.good{color:#176317}td.bad{color:#fff;background:#b3261e}
.verdict{font-size:22px;font-weight:bold}.passed{color:#176317}.failed{color:#b3261e}img{max-width:100%;
border:1px solid #ddd}summary{cursor:pointer;margin:.3em 0}.made{color:#555;font-size:13px}
.claims{border-left:4px solid #b3261e;padding:.2em 1em;margin:1em 0}nav{font-size:14px}"""


VERDICTS = ("PASSED: everything expected was compared and is within tolerance. FAILED: a comparison is out of "
            "tolerance (or a mutant survived, a golden file changed). INCOMPLETE: something expected was not compared "
            "(a part the backend cannot run); it is not a pass unless the command allowed that part to be missing "
            "(--allow-missing), and every part not compared is listed either way.")


def _css_class(value: object) -> str:
    text = str(value)
    if text in ("pass", "passed", "killed", "yes", "survived (control)"):
        return "good"
    if text in ("FAIL", "failed", "SURVIVED", "error", "EQUIVALENT", "INCOMPLETE") or \
            text.startswith(("NO", "KILLED", "EQUIVALENCE")):
        return "bad"
    return ""


def build_report(golden_dir: Path, backends: list[str], out: Path, suite: bool = False, mutants: str = "none",
                 jobs: int = 1, profile: str = "ci", capabilities=None,
                 allow: tuple[str, ...] = ()) -> Report:
    """Everything above, written to `out` (report.md, report.json, report.html and the figures);
    `capabilities`: which capability sections to add (default all: section.section_names()); `allow`: parts that may
    be missing."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(golden_dir, [str(problem) for problem in verify(golden_dir)], allow=tuple(allow))
    cases = [GoldenCase.load(path) for path in case_dirs(golden_dir)]
    for case in tqdm(cases, desc="golden cases", unit="case"):
        weights = case.weights()
        for backend in backends:
            report.cases.append(check_case(case, resolve_backend(backend), weights=weights, allow=report.allow))
    if suite:
        report.suite_status, report.suite = run_suite(backends, out / "suite", profile, report.allow)
    if mutants != "none":
        report.mutants = run_catalogue(backends, first_kill=mutants == "first-kill", jobs=jobs, profile=profile,
                                       known_controls=suite_controls(report.suite))
    report.figures["Error per layer"] = plots.error_per_layer(report.cases, out / "error_per_layer.png")
    if report.suite:
        report.figures["Errors against tolerances"] = plots.error_against_tolerance(
            report.suite, out / "error_vs_tolerance.png")
    report.figures["Expert load per layer"] = plots.expert_load(expert_loads(golden_dir), out / "expert_load.png")
    report.extra = _extra_sections(golden_dir, backends, out,
                                   section_names() if capabilities is None else capabilities)
    for section in report.extra:
        report.figures.update(section.figures)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out / "report.md").write_text(report.to_markdown())
    (out / "report.html").write_text(report.to_html())
    return report
