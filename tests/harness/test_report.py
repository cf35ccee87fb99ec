"""The report: its files, their tables and figures, and the plugin that records the suite's comparisons."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dsv3_conformance.report.build import build_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The report with every capability section, on the reference backend."""
    folder = tmp_path_factory.mktemp("report")
    return build_report(ROOT / "golden", ["reference"], folder), folder


@pytest.mark.long
@pytest.mark.xdist_group("report")  # one worker builds the report once for both
def test_report_files_hold_tables_and_figures(full):
    report, tmp_path = full
    assert report.passed
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] is True and not data["manifest_problems"]
    assert {case["case"] for case in data["golden"]} >= {"v3-tiny", "v3-tiny-fp8", "oracle-moe-groups"}
    assert {d["divergence"] for d in data["known_divergences"]} >= {"hf-ignores-scoring-func"}
    assert data["tolerances"]["golden.float32-path"]["value"] == 1e-5
    markdown = (tmp_path / "report.md").read_text()
    assert "## Golden cases" in markdown and re.search(r"\| v3-tiny-fp8 +\| reference +\|", markdown)
    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") >= 4 and page.count("data:image/png;base64,") == len(report.figures) >= 4
    for figure in ("error_per_layer.png", "expert_load.png", "pipeline_gantt.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
    sections = {section.title for section in report.extra}
    assert sections == {"Multi-token prediction", "FP8 accumulation and granularity", "Pipeline schedules",
                        "Expert parallelism", "Training experiments", "Performance"}
    assert all(section.passed for section in report.extra)


def test_report_fails_on_a_tampered_golden_file(tmp_path):
    import shutil

    golden = tmp_path / "golden"
    shutil.copytree(ROOT / "golden", golden)
    target = golden / "official" / "v3-tiny" / "expected.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x40
    target.write_bytes(bytes(data))
    report = build_report(golden, ["reference"], tmp_path / "out", capabilities=())
    assert not report.passed
    assert any(str(target) in problem for problem in report.manifest_problems)
    assert "GOLDEN FILES DO NOT MATCH THE MANIFEST" in report.summary()


def test_plugin_records_one_line_per_test_with_its_comparisons(tmp_path):
    command = [sys.executable, "-m", "pytest", "conformance/suite/test_suite.py", "-q",
               "-p", "dsv3_conformance.report.plugin", "--results-dir", str(tmp_path), "--backend", "reference", "-k", "golden:official/v3-tiny-fp8 and not fp8-act",
               "-p", "no:cacheprovider"]
    assert subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 0
    lines = [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["outcome"] == "passed" and lines[0]["backend"] == "reference"
    assert lines[0]["check"] == "golden:official/v3-tiny-fp8" and lines[0]["component"] == "golden cases"
    policies = {c["policy"] for c in lines[0]["comparisons"]}
    assert policies == {"golden.float32-path", "golden.fp8-path.h100", "tokens.exact"}


class _Tables(HTMLParser):
    """Per table: the header's cell count and each body row's."""

    def __init__(self):
        super().__init__()
        self.tables, self.section = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"head": 0, "rows": []})
        elif tag in ("thead", "tbody"):
            self.section = tag
        elif tag == "tr" and self.section == "tbody":
            self.tables[-1]["rows"].append(0)
        elif tag == "th":
            self.tables[-1]["head"] += 1
        elif tag == "td":
            self.tables[-1]["rows"][-1] += 1


@pytest.mark.xdist_group("report")  # one worker builds the report once for both
def test_html_renders_in_headless_chromium_with_well_formed_tables(full):
    """The page as a real browser builds it: summary first, contents, provenance, every table's rows as wide as its
    header, the figures embedded (skipped where Chromium is absent)."""
    import shutil

    import matplotlib.image

    report, tmp_path = full
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs Debian's chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3000"]
    page = (tmp_path / "report.html").as_uri()
    dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == len(report.figures) and "PASSED" in dom
    assert dom.index("<nav>") < dom.index(">Summary</h2>") < dom.index(">Golden cases</h2>")
    assert "commit " in dom and "<code>" in dom  # provenance: when, commit, machine, command line
    tables = _Tables()
    tables.feed(dom)
    assert len(tables.tables) >= 10
    wrong = [table for table in tables.tables if any(cells != table["head"] for cells in table["rows"])]
    assert not wrong, wrong[:3]
    assert "stored results, not measured in this run" in dom  # the performance and training sections
    assert not re.search(r"\(\d+, \d+\)|Traceback|errors_impl", dom)  # no tuple reprs or raw exceptions
    subprocess.run(flags + [f"--screenshot={tmp_path / 'shot.png'}", page], capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(tmp_path / "shot.png")[..., :3]
    assert (pixels.min(axis=-1) < 0.9).mean() > 0.02, "the screenshot is (nearly) blank"


def test_a_malformed_table_is_caught():
    tables = _Tables()
    tables.feed("<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table>")
    assert tables.tables == [{"head": 1, "rows": [2]}]


def test_a_failure_message_is_bounded():
    from dsv3_conformance.suite.test_suite import BOUND, _bound

    error = AssertionError("x" * 10 * BOUND)
    error.add_note("Falsifying example: check(weights=" + "1.0, " * 5 * BOUND + ")")
    _bound(error)
    assert len(error.args[0]) < BOUND + 100 and "characters cut" in error.args[0]
    assert len(error.__notes__[0]) < BOUND + 100
