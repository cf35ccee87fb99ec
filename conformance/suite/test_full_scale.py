"""`pytest conformance/ --scale full`: the released widths, on a synthetic checkpoint in the released layout.

Generates (about 32 GB of disk, five minutes) 3 dense layers, 1 MoE layer with 256 experts and the MTP
module at hidden 7168, then verifies numerically with 16 tokens, measuring peak resident memory: the MoE
layer alone under 6 GB (measured 5.1 GB, 24 experts loaded), the whole stream under 12 GB (measured 6.9 GB;
each layer's peak starts from what the layers before it left resident). Set DSV3_SYNTHETIC to an existing folder to reuse a
generated checkpoint. Not part of CI (tests/harness/test_fullscale.py is its shortened form).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3_conformance.fullscale.synthetic import full_scale_config, write_synthetic
from dsv3_conformance.paths import ROOT

MOE_LAYER_BOUND_GIB, STREAM_BOUND_GIB = 6.0, 12.0


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> Path:
    given = os.environ.get("DSV3_SYNTHETIC")
    if given and (Path(given) / "model.safetensors.index.json").is_file():
        return Path(given)
    return write_synthetic(Path(given) if given else tmp_path_factory.mktemp("full") / "ckpt", full_scale_config(),
                           shard_bytes=4 << 30)


def _verify(folder: Path, out: Path, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "dsv3_conformance.cli", "verify-checkpoint", str(folder),
                           "--tokens", "16", "--backend", "tf", "--json", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=6 * 3600, check=False)
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())["layers"]


def _peak(row: dict) -> float:
    return float(row["peak resident"].split()[0])


@pytest.mark.full
def test_one_full_width_moe_layer_verifies_under_6_gb(full_checkpoint, tmp_path):
    """The MoE layer alone (random input hidden states): 16 tokens, only the experts they route to loaded."""
    rows = _verify(full_checkpoint, tmp_path / "moe.json", "--layers", "3", "--random-hidden")
    assert rows[0]["kind"] == "MoE" and rows[0]["status"] == "pass" and _peak(rows[0]) < MOE_LAYER_BOUND_GIB, rows


@pytest.mark.full
def test_the_whole_full_width_stream_verifies_under_12_gb(full_checkpoint, tmp_path):
    rows = _verify(full_checkpoint, tmp_path / "all.json", "--layers", "all", "--headers-only")
    assert all(row["status"] == "pass" for row in rows), rows
    assert max(_peak(row) for row in rows) < STREAM_BOUND_GIB, rows
