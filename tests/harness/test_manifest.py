"""`golden verify` covers the whole golden folder and never leaves it."""

from __future__ import annotations

import json
import shutil

import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.golden.manifest import ManifestError, verify
from dsv3_conformance.paths import GOLDEN_DIR


@pytest.fixture()
def golden(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN_DIR, copy)
    return copy


def _edit(golden, change) -> None:
    path = golden / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_the_shipped_folder_matches(golden):
    assert verify(golden) == []


def test_an_empty_case_list_is_a_problem(golden):
    _edit(golden, lambda m: m.update(cases=[]))
    problems = [str(p) for p in verify(golden)]
    assert any("lists no case" in p for p in problems)
    assert any("v3-tiny/expected.safetensors: not listed in the manifest" in p for p in problems)


def test_a_case_dropped_from_the_manifest_is_named(golden):
    _edit(golden, lambda m: m.update(cases=[c for c in m["cases"] if c["path"] != "oracle/yarn-off"]))
    problems = {p.path for p in verify(golden)}
    assert str(golden / "oracle" / "yarn-off" / "expected.safetensors") in problems


def test_an_unlisted_case_folder_and_files_in_subfolders_are_named(golden):
    (golden / "extra-case").mkdir()
    (golden / "extra-case" / "expected.safetensors").write_bytes(b"x")
    (golden / "official" / "v3-tiny" / "sub").mkdir()
    (golden / "official" / "v3-tiny" / "sub" / "hidden.bin").write_bytes(b"y")
    problems = {p.path: p.what for p in verify(golden)}
    assert problems == {str(golden / "extra-case" / "expected.safetensors"): "not listed in the manifest",
                        str(golden / "official" / "v3-tiny" / "sub" / "hidden.bin"): "not listed in the manifest"}


def test_a_case_listed_twice_is_named(golden):
    _edit(golden, lambda m: m["cases"].append(dict(m["cases"][0])))
    assert any(p.what.startswith("listed twice") for p in verify(golden))


@pytest.mark.parametrize("bad_path", ["../..", "/etc", "official/../../x", "..\\x"])
def test_paths_outside_the_golden_folder_are_refused(golden, bad_path):
    _edit(golden, lambda m: m["cases"][0].update(path=bad_path))
    with pytest.raises(ManifestError, match="must stay inside the golden folder"):
        verify(golden)


def test_a_file_name_outside_its_case_is_refused(golden):
    _edit(golden, lambda m: m["cases"][0]["files"].update({"../../manifest.json": "0" * 64}))
    with pytest.raises(ManifestError, match="must stay inside the golden folder"):
        verify(golden)


def test_a_link_out_of_the_folder_is_a_problem(golden, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    target = golden / "official" / "v3-tiny" / "meta.json"
    target.unlink()
    target.symlink_to(outside)
    problems = {p.path: p.what for p in verify(golden)}
    assert problems[str(target)] == "is a link or leads outside the golden folder"


@pytest.mark.parametrize("manifest, message", [
    ([], "expected an object with a 'cases' list"),
    ({"cases": ["x"]}, r"cases\[0\]: expected an object"),
    ({"cases": [{"path": 3, "files": {}}]}, r"cases\[0\].path: expected a relative path"),
    ({"cases": [{"path": "a", "files": []}]}, r"cases\[0\].files: expected an object"),
    ({"cases": [{"path": "a", "files": {"x": "abc"}}]}, r"expected a sha256 \(64 hex digits\), found 'abc'"),
    ({"cases": [{"path": "a", "kind": "modle", "files": {}}]},
     r"cases\[0\].kind: expected one of \['model', 'fp8-gemm', 'fp8-accumulation', 'schedules'\], found 'modle'"),
])
def test_malformed_manifests_are_bad_input(golden, capsys, manifest, message):
    (golden / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        verify(golden)
    assert main(["golden", "verify", "--golden-dir", str(golden)]) == 2
