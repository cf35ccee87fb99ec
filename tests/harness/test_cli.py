"""The command line: check-golden's JSON contract and exit statuses, and golden integrity checks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.format.safetensors_io import read_all, write_safetensors
from dsv3_conformance.golden.manifest import verify

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
TINY = GOLDEN / "official" / "v3-tiny"


def test_check_golden_json_has_exactly_the_contract_fields(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["check-golden", str(TINY), "--backend", "reference", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result) == ["case", "backend", "verdict", "passed", "results", "not_compared", "allowed_missing",
                            "not_compared_by_policy"]
    assert result["case"] == "v3-tiny" and result["backend"] == "reference" and result["passed"] is True
    assert result["verdict"] == "PASSED" and result["not_compared"] == [] == result["not_compared_by_policy"]
    expected = read_all(TINY / "expected.safetensors")
    compared = {"prefill.logits_last", "prefill.logits_last.naive", "tokens.decoded"} | {
        n for n in expected if n.startswith(("prefill.layer.", "decode."))}
    assert {r["name"] for r in result["results"]} == compared
    for row in result["results"]:
        assert list(row) == ["name", "rel_err", "max_abs", "tolerance", "passed"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == "PASSED: 18 tensors within tolerance"


def test_a_wrong_expected_tensor_fails_with_status_1(tmp_path):
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    expected = read_all(case / "expected.safetensors")
    expected["decode.4.logits"] = expected["decode.4.logits"] * np.float32(1.001)
    write_safetensors(case / "expected.safetensors", expected)
    out = tmp_path / "r.json"
    assert main(["check-golden", str(case), "--json", str(out)]) == 1
    failed = [r["name"] for r in json.loads(out.read_text())["results"] if not r["passed"]]
    assert failed == ["decode.4.logits"]


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["check-golden", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a golden case, no expected.safetensors" in capsys.readouterr().err
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    (case / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes()[:50000])
    assert main(["check-golden", str(case)]) == 2
    assert "model.safetensors: truncated: tensor" in capsys.readouterr().err


def test_unknown_expected_tensors_are_not_compared_and_never_passed(tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    expected = read_all(case / "expected.safetensors")
    expected["router.scores"] = np.zeros((2, 512), np.float32)
    write_safetensors(case / "expected.safetensors", expected)
    assert main(["check-golden", str(case)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"router.scores +unknown +no +a tensor this harness does not compare", out)
    assert out.strip().splitlines()[-1] == ("INCOMPLETE: 18 tensors within tolerance; 1 not compared (unknown): "
                                            "allow them with --allow-missing unknown")
    assert main(["check-golden", str(case), "--allow-missing", "unknown"]) == 0


def test_mtp_tensors_without_an_mtp_module_are_refused(tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    expected = read_all(case / "expected.safetensors")
    expected["mtp.0.logits"] = np.zeros((2, 512), np.float32)
    write_safetensors(case / "expected.safetensors", expected)
    assert main(["check-golden", str(case)]) == 2
    assert "tensor 'mtp.0.logits': expected an MTP depth below num_nextn_predict_layers=0, found depth 0" in \
        capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "add"])
def test_tampered_golden_files_are_named(tmp_path, damage):
    golden = tmp_path / "golden"
    shutil.copytree(GOLDEN, golden)
    target = golden / "official" / "v3-tiny-fp8" / "expected-h100-fp8-gemm.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-4]))
    elif damage == "delete":
        target.unlink()
    else:
        target = target.with_name("expected-extra.safetensors")
        target.write_bytes(b"")
    problems = verify(golden)
    assert [p.path for p in problems] == [str(target)], problems


@pytest.mark.parametrize("backend", ["reference", "tf"])
def test_generate_returns_the_official_greedy_tokens(backend, capsys):
    expected = read_all(TINY / "expected.safetensors")
    prompts = [",".join(map(str, row)) for row in expected["tokens.prompt"]]
    steps = expected["tokens.decoded"].shape[1]
    args = ["generate", str(TINY), "--steps", str(steps), "--backend", backend, "--json"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    assert main(args) == 0
    generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"]
    assert generated == expected["tokens.decoded"].tolist()


def test_generate_rejects_ragged_prompts(capsys):
    assert main(["generate", str(TINY), "--prompt", "1,2", "--prompt", "3", "--backend", "reference"]) == 2
    assert "equal length" in capsys.readouterr().err


def test_malformed_meta_json_is_named(tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    (case / "meta.json").write_text("{gemm_impl: fp8")
    assert main(["check-golden", str(case)]) == 2
    assert f"{case / 'meta.json'}: not valid JSON" in capsys.readouterr().err


def test_unknown_config_fields_are_bad_input_unless_allowed(tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(TINY, case)
    raw = json.loads((case / "config.json").read_text())
    raw["my_serving_flag"] = True
    (case / "config.json").write_text(json.dumps(raw))
    assert main(["check-golden", str(case)]) == 2
    assert "unknown config field(s) my_serving_flag" in capsys.readouterr().err
    assert main(["check-golden", str(case), "--allow-fields", "my_serving_flag"]) == 0
    assert "accepted by --allow-fields: my_serving_flag" in capsys.readouterr().err


def test_a_passing_tf_check_prints_nothing_tensorflow_internal_on_stderr():
    """TensorFlow's start-up lines (absl's notice, oneDNN, CUDA probing, XLA's service) are dropped; -v keeps them."""
    import os
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "dsv3_conformance.cli", "check-golden",
               str(TINY.parent.parent / "oracle" / "q-lora-0"), "--backend", "tf"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("PASSED")
    loud = subprocess.run(command[:3] + ["-v"] + command[3:], capture_output=True, text=True, env=environment,
                          timeout=600, check=False)
    assert loud.returncode == 0 and "absl::InitializeLog" in loud.stderr


def test_version_and_defaults_in_help(capsys):
    from importlib import metadata

    assert main(["--version"]) == 0
    assert metadata.version("dsv3-conformance") in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    assert "tokens to generate (default: 16)" in " ".join(capsys.readouterr().out.split())
