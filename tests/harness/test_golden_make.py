"""`golden make` writes a golden case from a user's checkpoint with two independent producers (transformers'
own loading and the reference backend); each case passes on both backends, names and fingerprints its
checkpoint, verifies against its manifest, and fails a port that hard-codes rope_theta."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import THETA, save_tiny_hf  # noqa: E402

from dsv3_conformance.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    save_tiny_hf(checkpoint)
    golden = tmp_path_factory.mktemp("golden")
    for producer in ("hf", "reference"):
        assert main(["golden", "make", str(golden / producer), "--checkpoint", str(checkpoint), "--producer", producer,
                     "--random", "2,8", "--steps", "4", "--layers", "all", "--positions", "0,3,-1"]) == 0
    return checkpoint, golden


@pytest.mark.parametrize("producer", ["hf", "reference"])
@pytest.mark.parametrize("backend", ["reference", "tf"])
def test_a_made_case_passes_on_both_backends(made, producer, backend, capsys):
    _, golden = made
    assert main(["check-golden", str(golden / producer), "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "PASSED: 12 tensors" in out and "prefill.layer.2.hidden" in out and "tokens.decoded" in out
    assert "prefill.position.0.logits" in out and "prefill.position.3.logits" in out


def test_chosen_positions_are_the_producer_s_logits_there(made):
    """-1 is the last position: its recorded logits are the producer's last-position logits, bit for bit."""
    from dsv3_conformance.format.safetensors_io import read_all

    _, golden = made
    expected = read_all(golden / "hf" / "expected.safetensors")
    assert sorted(name for name in expected if name.startswith("prefill.position.")) == [
        "prefill.position.0.logits", "prefill.position.3.logits", "prefill.position.7.logits"]
    assert (expected["prefill.position.7.logits"] == expected["prefill.logits_last"]).all()
    assert not (expected["prefill.position.0.logits"] == expected["prefill.logits_last"]).all()


def test_a_position_outside_the_prompt_is_bad_input(made, tmp_path, capsys):
    checkpoint, _ = made
    assert main(["golden", "make", str(tmp_path / "case"), "--checkpoint", str(checkpoint), "--producer",
                 "reference", "--random", "1,4", "--steps", "0", "--positions", "4"]) == 2
    assert "--positions [4]" in capsys.readouterr().err


def test_the_case_records_its_provenance_and_the_manifest_covers_it(made):
    checkpoint, golden = made
    meta = json.loads((golden / "hf" / "meta.json").read_text())
    assert meta["producer"].startswith("transformers") and meta["checkpoint"]["path"] == str(checkpoint.resolve())
    assert meta["command"].startswith("dsv3-conformance") and meta["created"] and meta["transformers"]
    assert not list((golden / "hf").glob("model*.safetensors"))  # the weights stay where they are
    assert main(["golden", "verify", "--golden-dir", str(golden)]) == 0
    manifest = json.loads((golden / "manifest.json").read_text())
    assert sorted(case["path"] for case in manifest["cases"]) == ["hf", "reference"]


def test_a_port_that_hard_codes_theta_fails_the_made_case(made):
    _, golden = made
    assert THETA != 10000.0
    assert main(["check-golden", str(golden / "hf"), "--backend", "broken_backends:HARD_CODED_THETA"]) == 1


def test_another_checkpoint_in_its_place_is_refused(made, tmp_path, capsys):
    checkpoint, golden = made
    case = tmp_path / "case"
    case.mkdir()
    for name in ("config.json", "expected.safetensors"):
        (case / name).write_bytes((golden / "hf" / name).read_bytes())
    meta = json.loads((golden / "hf" / "meta.json").read_text())
    meta["checkpoint"]["fingerprint"] = "0" * 64
    (case / "meta.json").write_text(json.dumps(meta))
    assert main(["check-golden", str(case)]) == 2
    assert "not the one this case was made from" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("DSV3_OFFICIAL_CHECKOUT"), reason="needs DSV3_OFFICIAL_CHECKOUT, a checkout "
                                                                        "of the official DeepSeek-V3 repository")
def test_the_official_code_as_a_producer(made, tmp_path):
    checkpoint, _ = made
    assert main(["golden", "make", str(tmp_path / "official"), "--checkpoint", str(checkpoint), "--producer",
                 "official", "--official", os.environ["DSV3_OFFICIAL_CHECKOUT"], "--random", "2,8", "--steps", "4",
                 "--layers", "all"]) == 0
    assert main(["check-golden", str(tmp_path / "official"), "--backend", "tf"]) == 0
    assert Path(tmp_path / "official" / "meta.json").is_file()
    # The official forward returns the last position's logits alone: other positions cannot be recorded from it.
    assert main(["golden", "make", str(tmp_path / "positions"), "--checkpoint", str(checkpoint), "--producer",
                 "official", "--official", os.environ["DSV3_OFFICIAL_CHECKOUT"], "--random", "1,8", "--steps", "0",
                 "--positions", "0"]) == 2


@pytest.mark.parametrize("case", ["official-cuda-float32", "official-cuda-bfloat16"])
@pytest.mark.parametrize("backend", ["reference", "tf"])
def test_cases_the_official_code_made_on_an_h100_pass_on_both_backends(case, backend):
    """`golden make --producer official --device cuda` run on an H100 (benchmarks/results/gpu/official-cuda/): an
    independent producer on another device, checked here."""
    from dsv3_conformance.paths import RESULTS_DIR

    assert main(["check-golden", str(RESULTS_DIR / "gpu" / "official-cuda" / case), "--backend", backend]) == 0
