"""Full scale, shortened for CI: parameter accounting of the released config, a synthetic checkpoint in the
released layout (small widths, fewer experts), integrity mode finding each planted fault by tensor and shard,
and numeric mode verifying every layer with only the routed experts its tokens need. The full-width version
is conformance/suite/test_full_scale.py (`pytest conformance/ --scale full`)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.format.config import deepseek_v3_671b, load_config
from dsv3_conformance.fullscale.integrity import check_integrity
from dsv3_conformance.fullscale.params import PUBLISHED, count_parameters
from dsv3_conformance.fullscale.synthetic import ci_scale_config, shard_plan, write_synthetic
from dsv3_conformance.format.weights import expected_tensors
from dsv3_conformance.paths import ROOT

EXPERT = "model.layers.3.mlp.experts.5.up_proj.weight"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "ckpt", ci_scale_config(), seed=1,
                           shard_bytes=6 << 20)


@pytest.fixture()
def copy(synthetic, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic, tmp_path / "ckpt"))


def test_the_released_parameter_counts_are_reproduced():
    counts = count_parameters(deepseek_v3_671b())
    for key, value in (("main", counts.main), ("stored", counts.stored),
                       ("mtp_block", counts.mtp_unique - counts.mtp_input_projection - counts.mtp_norms)):
        assert abs(value / 1e9 / PUBLISHED[key] - 1) <= 0.005, (key, value)
    assert abs(counts.activated / 1e9 / PUBLISHED["activated"] - 1) <= 0.005
    # The MTP module shares embedding and head: the stored copies are 2 x vocab x dim more.
    assert counts.mtp_stored - counts.mtp_unique == 2 * 129280 * 7168


def test_parameters_of_a_hand_counted_config():
    """tiny: 2 layers (1 dense), dim 64, 8 experts of width 32, k = 2."""
    from dsv3_conformance.format.config import tiny

    config = tiny(n_mtp_layers=0)
    counts = count_parameters(config)
    specs = expected_tensors(config)
    assert counts.main == sum(int(np.prod(s.shape)) for s in specs.values() if s.role != "scale")
    expert = 3 * 64 * 32
    assert counts.activated == counts.main - 8 * expert + 2 * expert - 256 * 64


def test_shards_stay_within_their_budget():
    specs = expected_tensors(ci_scale_config())
    plan = shard_plan(specs, 1 << 20)
    assert sorted(name for shard in plan for name in shard) == sorted(specs)
    assert len(plan) > 5


def test_the_synthetic_checkpoint_is_in_the_released_layout(synthetic):
    index = json.loads((synthetic / "model.safetensors.index.json").read_text())
    config = load_config(synthetic)
    assert config.fp8_weights and config.n_mtp_layers == 1 and config.n_routed_experts == 16
    assert len(set(index["weight_map"].values())) > 1
    assert f"model.layers.{config.n_layers}.eh_proj.weight" in index["weight_map"]
    result = check_integrity(synthetic, config, hash_files=True)
    assert result.passed, result.problems
    assert all(len(row["sha256"]) == 64 for row in result.shards)


def _rewrite_shard(path: Path, change) -> None:
    """Edit a shard's header (and data) in place: change(header, data) -> (header, data)."""
    raw = path.read_bytes()
    length, = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), bytearray(raw[8 + length:])
    header, data = change(header, data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data))


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _drop(name):
    def change(header, data):
        begin, end = header[name]["data_offsets"]
        del header[name]
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
                entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
        return header, data[:begin] + data[end:]
    return change


def _problems(folder: Path) -> list[dict]:
    return [p.row() for p in check_integrity(folder, load_config(folder)).problems]


def test_a_missing_expert_tensor_is_named(copy):
    shard = _shard_of(copy, EXPERT)
    _rewrite_shard(shard, _drop(EXPERT))
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][EXPERT]
    index_path.write_text(json.dumps(index))
    assert {"tensor": EXPERT, "shard": "-", "problem": "missing: the config needs it and the index does not name it"} \
        in _problems(copy)


def test_a_wrong_scale_shape_is_named(copy):
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"  # [4, 1]
    shard = _shard_of(copy, name)

    def change(header, data):
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [cols, rows]
        return header, data
    _rewrite_shard(shard, change)
    problems = _problems(copy)
    assert any(p["tensor"] == name and p["shard"] == shard.name and "wrong shape" in p["problem"]
               and "block-scale grid" in p["problem"] for p in problems), problems


def test_a_truncated_shard_is_named(copy):
    shard = _shard_of(copy, EXPERT)
    shard.write_bytes(shard.read_bytes()[:-1000])
    problems = _problems(copy)
    assert len(problems) == 1 and problems[0]["shard"] == shard.name and "truncated" in problems[0]["problem"], \
        problems


def test_a_wrong_dtype_is_named(copy):
    name = "model.layers.0.mlp.down_proj.weight"
    shard = _shard_of(copy, name)

    def change(header, data):
        header[name]["dtype"] = "U8"  # same size, not e4m3
        return header, data
    _rewrite_shard(shard, change)
    problems = _problems(copy)
    assert any(p["tensor"] == name and p["shard"] == shard.name and "wrong dtype: expected F8_E4M3, found U8"
               in p["problem"] for p in problems), problems


def test_nan_in_one_block_is_named_with_the_block(copy):
    name = "model.layers.2.mlp.down_proj.weight"  # [512, 1024]
    shard = _shard_of(copy, name)

    def change(header, data):
        begin, _ = header[name]["data_offsets"]
        cols = header[name]["shape"][1]
        data[begin + 200 * cols + 300] = 0x7F  # row 200, column 300: block [1, 2]
        return header, data
    _rewrite_shard(shard, change)
    problems = _problems(copy)
    assert {"tensor": name, "shard": shard.name,
            "problem": "1 NaN or Inf value(s), first at [200, 300], in 128x128 block [1, 2]"} in problems


def test_the_command_exit_status_follows_the_contract(copy, capsys):
    assert main(["verify-checkpoint", str(copy), "--integrity-only"]) == 0
    _rewrite_shard(_shard_of(copy, EXPERT), _drop(EXPERT))
    assert main(["verify-checkpoint", str(copy), "--integrity-only"]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["verify-checkpoint", str(copy / "nowhere")]) == 2


def test_numeric_mode_verifies_every_layer_with_only_the_needed_experts(synthetic, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "dsv3_conformance.cli", "verify-checkpoint", str(synthetic),
                           "--layers", "all", "--tokens", "16", "--backend", "tf", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["layers"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["status"] == "pass" and "rel_err" in row["tf"] for row in rows), rows
    moe = [row for row in rows if row["kind"] in ("MoE", "MTP module")]
    assert all(int(row["experts loaded"].split("/")[0]) < 16 for row in moe), moe
    assert all(float(row["peak resident"].split()[0]) < 4 for row in rows)


def test_published_numbers_stand_beside_the_released_config_only():
    assert all("published" in row for row in count_parameters(deepseek_v3_671b()).rows()[:5])
    tiny_rows = count_parameters(deepseek_v3_671b().replace(n_layers=4, n_dense_layers=1, name="small")).rows()
    assert not any("published" in row for row in tiny_rows)
    assert "4 blocks" in tiny_rows[0]["note"]


@pytest.mark.long
def test_streaming_many_layers_keeps_memory_flat(tmp_path):
    """Each layer's one-block models compile programs of their own (the resident experts differ); the backend
    releases them between layers, so the peak does not rise with depth (it rose ~12 MiB a layer at these widths,
    and by up to 1.5 GiB a layer at the released ones, when they were kept)."""
    config = ci_scale_config().replace(n_layers=14, dim=1024, inter_dim=2048, moe_inter_dim=512, name="deep")
    folder = write_synthetic(tmp_path / "deep", config, seed=3, shard_bytes=256 << 20)
    out = tmp_path / "rows.json"
    assert main(["verify-checkpoint", str(folder), "--layers", ",".join(map(str, range(14))), "--tokens", "16",
                 "--backend", "tf", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["layers"]
    peaks = [float(row["peak resident"].split()[0]) for row in rows]
    assert max(peaks[5:]) - peaks[5] < 0.05, peaks  # GiB: flat after the first MoE layers' one-time costs
