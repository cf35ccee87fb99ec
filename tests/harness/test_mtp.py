"""The MTP loss on hand-computable cases, the MTP module's options as settings, and `generate --speculative`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.safetensors_io import read_all
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.reference.training import mtp_loss

MTP_CASE = GOLDEN_DIR / "official" / "v3-tiny-mtp"


def test_uniform_logits_cost_log_v_per_valid_position():
    """Uniform logits: every cross-entropy is ln V. Depth k has S - k - 1 targets; lambda / D scales the sum."""
    batch, length, vocab = 2, 6, 8
    tokens = np.arange(batch * length).reshape(batch, length) % vocab
    logits = [np.zeros((batch, length, vocab)) for _ in range(2)]
    valid = mtp_loss(logits, tokens, 0.3, MTPOptions(loss_normalization="valid"))
    assert valid == pytest.approx(0.3 / 2 * (math.log(vocab) + math.log(vocab)))
    over_all = mtp_loss(logits, tokens, 0.3, MTPOptions(loss_normalization="all"))
    assert over_all == pytest.approx(0.3 / 2 * math.log(vocab) * ((length - 2) / length + (length - 3) / length))


def test_a_certain_prediction_costs_nothing_and_the_targets_are_shifted_by_depth_plus_one():
    tokens = np.array([[3, 1, 4, 1, 5]])
    logits = np.full((1, 5, 6), -50.0)
    for i in range(3):  # depth 1 at position i predicts t(i+2)
        logits[0, i, tokens[0, i + 2]] = 50.0
    assert mtp_loss([logits], tokens, 1.0, MTPOptions()) == pytest.approx(0.0, abs=1e-12)
    logits[0, 0] = 0.0  # the first position now uniform: ln 6 over 3 valid positions
    assert mtp_loss([logits], tokens, 1.0, MTPOptions()) == pytest.approx(math.log(6) / 3)


@pytest.mark.parametrize("options", [dict(concat="last"), dict(chain="sideways"), dict(loss_normalization="T"),
                                     dict(zero_first_position="yes")])
def test_unknown_options_are_refused(options):
    with pytest.raises(BadInput, match="MTP option"):
        MTPOptions(**options)


@pytest.mark.parametrize("backend", ["reference", "tf"])
def test_generate_speculative_returns_the_greedy_tokens(backend, capsys):
    expected = read_all(MTP_CASE / "expected.safetensors")
    args = ["generate", str(MTP_CASE), "--steps", str(expected["tokens.decoded"].shape[1]), "--backend", backend,
            "--speculative", "1", "--json"]
    for row in expected["tokens.prompt"]:
        args += ["--prompt", ",".join(map(str, row))]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["generated"] == expected["tokens.decoded"].tolist()
    assert result["speculative"]["drafted"] >= 1 and "drafts accepted" in captured.err


def test_speculative_needs_mtp_modules(capsys):
    status = main(["generate", str(GOLDEN_DIR / "official" / "v3-tiny"), "--prompt", "1,2", "--speculative", "1"])
    assert status == 2 and "num_nextn_predict_layers=0" in capsys.readouterr().err
