"""`pytest conformance/ --scale full`: the released widths, on a synthetic checkpoint in the released layout.

Generates (about 32 GB of disk, a few minutes) 3 dense layers, 1 MoE layer with 256 experts and the MTP
module at hidden 7168, then verifies every layer numerically with 16 tokens, measuring peak resident memory:
one MoE layer under 6 GB, the whole stream under 12 GB. Set DSV3_SYNTHETIC to an existing folder to reuse a
generated checkpoint. Not part of CI (tests/test_fullscale.py is its shortened form).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.fullscale.synthetic import full_scale_config, write_synthetic
from conformance.paths import ROOT

MOE_LAYER_BOUND_GIB, STREAM_BOUND_GIB = 6.0, 12.0


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> Path:
    given = os.environ.get("DSV3_SYNTHETIC")
    if given and (Path(given) / "model.safetensors.index.json").is_file():
        return Path(given)
    return write_synthetic(Path(given) if given else tmp_path_factory.mktemp("full") / "ckpt", full_scale_config(),
                           shard_bytes=4 << 30)


@pytest.mark.full
def test_every_layer_of_a_full_width_checkpoint_verifies_in_bounded_memory(full_checkpoint, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "conformance.cli", "verify-checkpoint", str(full_checkpoint),
                           "--layers", "all", "--tokens", "16", "--backend", "tf", "--no-oracle", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=6 * 3600, check=False)
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["layers"]
    peaks = {row["layer"]: float(row["peak resident"].split()[0]) for row in rows}
    moe = [row["layer"] for row in rows if row["kind"] == "MoE"]
    assert all(peaks[layer] < MOE_LAYER_BOUND_GIB for layer in moe), peaks
    assert max(peaks.values()) < STREAM_BOUND_GIB, peaks
