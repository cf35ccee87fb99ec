"""The ue8m0 scope: which linear modules round activation scales, as a setting a golden records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsv3_conformance.benchmarks.fp8_flips import measure
from dsv3_conformance.cli import main
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.metrics import Comparison
from dsv3_conformance.tolerances import Tolerance

FP8_ACT = Path(__file__).resolve().parents[2] / "golden" / "official" / "v3-tiny-fp8-act"
ATTENTION_AND_FFN = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj", "dense_ffn",
                     "shared_expert", "expert")


def test_official_scope_rounds_only_the_plain_linear_modules():
    # The official inference code passes scale_fmt only from its plain Linear class: wq_a, wkv_a, experts.
    official = Numerics("fp8", "ue8m0")
    assert {m: official.scale_format(m) for m in ATTENTION_AND_FFN} == {
        "q_proj": None, "q_a_proj": "ue8m0-log2f", "q_b_proj": None, "kv_a_proj": "ue8m0-log2f", "kv_b_proj": None,
        "o_proj": None, "dense_ffn": None, "shared_expert": None, "expert": "ue8m0-log2f"}
    assert {Numerics("fp8", "ue8m0", "all").scale_format(m) for m in ATTENTION_AND_FFN} == {"ue8m0"}
    assert {Numerics("fp8", None, "all").scale_format(m) for m in ATTENTION_AND_FFN} == {None}
    with pytest.raises(BadInput, match="unknown ue8m0_scope 'every'"):
        Numerics("fp8", "ue8m0", "every")


def _case_with_scope(tmp_path: Path, scope: object) -> Path:
    case = tmp_path / "case"
    shutil.copytree(FP8_ACT, case)
    meta = json.loads((case / "meta.json").read_text())
    meta["ue8m0_scope"] = scope
    (case / "meta.json").write_text(json.dumps(meta))
    return case


def test_the_wrong_scope_fails_the_official_case(tmp_path, capsys):
    """The official case pins the scope: replayed with ue8m0 in every linear, every token moves."""
    assert main(["check-golden", str(_case_with_scope(tmp_path, "all")), "--backend", "reference"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_an_unknown_scope_in_meta_is_bad_input(tmp_path, capsys):
    assert main(["check-golden", str(_case_with_scope(tmp_path, "some")), "--backend", "reference"]) == 2
    assert "field 'ue8m0_scope' must be one of ['official', 'all'], found 'some'" in capsys.readouterr().err


def test_row_comparison_judges_every_row():
    """At most a share of the rows (rounded up) beyond the row bound, none beyond the worst-row bound, no NaN."""
    policy = Tolerance("t", 1e-5, "test", share_off=0.25, worst_row=0.6)
    expected = np.ones((8, 8))
    flipped = expected.copy()
    flipped[0] *= 1.5
    flipped[1] *= 1.5
    assert Comparison.of_rows("t", flipped, expected, policy).passed  # 2 of 8 rows off, each by 0.5
    assert Comparison.of_rows("t", flipped, expected, policy).rows_off == 2
    flipped[2] *= 1.0001
    assert not Comparison.of_rows("t", flipped, expected, policy).passed  # 3 of 8: more than a quarter
    one_bad = expected.copy()
    one_bad[5] *= 1.7
    assert not Comparison.of_rows("t", one_bad, expected, policy).passed  # one row beyond 0.6
    one_nan = expected.copy()
    one_nan[7, 3] = np.nan
    assert not Comparison.of_rows("t", one_nan, expected, policy).passed
    assert not Comparison.of_rows("t", expected[:, :4], expected, policy).passed  # shape mismatch
    two = np.ones((2, 8))
    assert Comparison.of_rows("t", two * [[1.0], [1.3]], two, policy).passed  # 1 of 2 rows, rounded up
    assert not Comparison.of_rows("t", two * 1.3, two, policy).passed


@pytest.mark.long
def test_flip_measurement_shortened():
    """benchmarks.fp8_flips on one prompt: the row policy passes every tensor of correct evaluations."""
    rows = measure(prompts=1, length=16)
    assert len(rows) == 8 * 10 and all(row["passes"] for row in rows)
