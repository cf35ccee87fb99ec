"""The side-by-side benchmark: the CI workload runs gated, its JSON has the contract's form, every peer returns
the same logits as the reference on the same weights, and a missed gate fails the command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsv3_conformance.benchmarks import bench
from dsv3_conformance.benchmarks.peers import make_peer
from dsv3_conformance.paths import ROOT


@pytest.mark.long
def test_the_ci_workload_runs_gated_and_writes_the_contract(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "dsv3_conformance.cli", "bench", "--workload", "tiny", "--gate",
                           "--peers", "tf,reference,hf", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    result = json.loads(out.read_text())
    assert {"workload", "results", "floors", "ratios", "steal_per_round"} <= set(result)
    assert len(result["steal_per_round"]) == result["rounds"]
    assert all(len(r["decode_floor_fraction_per_round"]) == result["rounds"] for r in result["results"].values())
    assert {"prefill_s", "decode_ms"} <= set(result["results"]["tf"]) and "reference" in result["results"]
    assert all(r["peak_memory_gib"] >= r["memory_gib"] for r in result["results"].values())
    assert result["floors"]["matmul_flops_per_s"] > 0 and result["floors"]["read_bytes_per_s"] > 0
    assert 0 < result["floors"]["prefill_floor_s"] < result["results"]["reference"]["prefill_s"]
    assert result["gates"] and done.returncode == (0 if all(g["passed"] for g in result["gates"]) else 1), done.stdout


def test_the_machine_record_names_what_tells_machines_of_one_cpu_name_apart():
    record = bench.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    assert record["avx512"] == (" avx512f " in f" {cpuinfo.read_text()} ".replace("\n", " "))
    cache = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    assert record["last_level_cache"] == (cache[-1].read_text().strip() if cache else None)
    assert f"last-level cache {record['last_level_cache']}" in _table(record)


def _table(record: dict, **more) -> str:
    """The table of a run with no implementations, on `record`'s machine."""
    return bench.table({"machine": record, "results": {}, "ratios": {}, **more,
                        "floors": {"matmul_flops_per_s": 1e9, "prefill_floor_s": 1.0, "read_bytes_per_s": 1e9,
                                   "read_bytes_per_s_spread": [1e9, 1e9], "decode_floor_ms": 1.0}})


def test_steal_is_the_share_of_cpu_time_other_machines_took(tmp_path):
    # proc(5): the first line sums all CPUs: user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 50 0 25 400 5 0 2 18 3 0\n")
    before = bench.cpu_times(stat)
    stat.write_text("cpu  200 0 60 1500 10 0 5 235 9 0\ncpu0 100 0 30 750 5 0 2 118 4 0\n")
    after = bench.cpu_times(stat)
    assert before == (35, 1000) and after == (235, 2010)
    assert bench.steal_fraction(before, after) == pytest.approx(200 / 1010)
    assert bench.steal_fraction(None, after) is None and bench.cpu_times(tmp_path / "absent") is None
    assert "(steal) per round 2.0-30.0%" in _table(bench.machine(), steal_per_round=[0.3, None, 0.02])


def test_a_decode_is_held_against_the_floor_of_its_own_round():
    # 1 GB a step: round 1 reads at 1 GB/s (floor 1 s) and steps in 1 s, round 2 at 2 GB/s (floor 0.5 s) in 0.25 s
    fractions = bench.floor_fractions(1e9, [1e9, 2e9], [1.0, 0.25])
    assert fractions == pytest.approx([1.0, 2.0])  # the medians' ratio would be 0.75 / 0.625 = 1.2
    with pytest.raises(ValueError):
        bench.floor_fractions(1e9, [1e9], [1.0, 0.25])


def test_a_missed_gate_fails(monkeypatch, tmp_path):
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"tiny": {"prefill_vs_reference": 1e9}}))
    monkeypatch.setattr(bench, "GATES", gates)
    result = {"workload": "tiny", "ratios": {"prefill_vs_reference": 10.0}}
    assert bench.check_gates(result) == [{"gate": "prefill_vs_reference >= 1000000000.0", "measured": 10.0,
                                         "passed": False}]


@pytest.mark.parametrize("peer, trimmed, batch", [("tf", False, 1), ("tf", True, 1), ("hf", False, 1),
                                                  ("llamacpp", False, 1), ("llamacpp", False, 8)])
def test_every_peer_computes_the_same_model(peer, trimmed, batch):
    """Trimmed, TF's only block runs at the last position: its logits, and a decode step over the caches that
    prefill filled, stay the reference's. llama.cpp holds a batch's sequences in one cache, in float16 (its
    default: hence its tolerance), and must keep them apart."""
    pytest.importorskip({"llamacpp": "llama_cpp"}.get(peer, "transformers"))
    config = bench.WORKLOADS["tiny"]["config"].replace(n_layers=1, n_dense_layers=0, vocab_size=512)
    weights = bench.bench_weights(config)
    rng = np.random.default_rng(0)
    tokens, following = rng.integers(0, 512, (batch, 12)), rng.integers(0, 512, batch)
    reference, other = make_peer("reference", config, weights), make_peer(peer, config, weights, None, trimmed)
    tolerance = dict(rtol=1e-2, atol=1e-2) if peer == "llamacpp" else dict(rtol=1e-4, atol=1e-4)
    assert np.allclose(other.prefill(tokens), reference.prefill(tokens), **tolerance)
    assert np.allclose(other.decode(following), reference.decode(following), **tolerance)


@pytest.mark.parametrize("workload", ["tiny", "bench-small"])
@pytest.mark.parametrize("trimmed", [False, True])
def test_the_prefill_floor_multiplies_what_the_prefill_counts(workload, trimmed):
    """The products the floor times do the FLOPs prefill_flops counts from the parameter count (fullscale.params),
    but for the norms' weights (well under 0.5%): none left out, none counted twice."""
    spec = bench.WORKLOADS[workload]
    gemms = bench.prefill_gemms(spec["config"], spec["prompt"], trimmed)
    counted = bench.prefill_flops(spec["config"], 1, spec["prompt"], trimmed)
    assert sum(g.flops for g in gemms) == pytest.approx(counted, rel=5e-3)
    assert sum(g.flops for g in gemms) <= counted


@pytest.mark.parametrize("peers, named", [("tf,foo", "'foo'"), ("tf,official", "--official-repo")])
def test_a_bad_peer_list_is_bad_input(peers, named, capsys):
    """Refused before anything is built: exit status 2, the message naming what the user wrote."""
    from dsv3_conformance.cli import main

    assert main(["bench", "--workload", "tiny", "--peers", peers]) == 2
    assert named in capsys.readouterr().err


def test_the_peak_sampler_sees_a_transient_allocation():
    """256 MB written and freed inside the block: resident memory is back afterwards, the peak saw it."""
    with bench.PeakResident() as sampled:
        block = np.ones(64 << 20, np.float32)
        time.sleep(0.05)
        del block
    assert sampled.rise >= 0.2 and bench._resident_gib() - sampled.start < 0.1


def test_work_counts_of_a_hand_counted_config():
    """Float32: 4 bytes for every parameter a step reads (all but the embedding and the unused experts)."""
    from dsv3_conformance.fullscale.params import count_parameters

    config = bench.WORKLOADS["tiny"]["config"]
    weights = bench.bench_weights(config)
    expert = 3 * config.dim * config.moe_inter_dim
    unused = config.n_routed_experts - config.n_activated_experts  # one MoE layer
    read = count_parameters(config.replace(n_mtp_layers=0)).main - config.vocab_size * config.dim - unused * expert
    assert bench.decode_bytes(weights, config, 1) == 4 * read
    assert bench.decode_bytes(weights, config, 64) - bench.decode_bytes(weights, config, 1) == 4 * unused * expert


def test_a_trimmed_prefill_counts_the_last_block_at_one_position():
    """What trimming leaves out, counted by hand for the tiny workload (its last block is a MoE block): every
    projection of that block but the kv one (still needed for the cache) at all but the last position, and the
    attention of all but the last query."""
    config = bench.WORKLOADS["tiny"]["config"]
    length, heads, dim = 128, config.n_heads, config.dim
    kv = dim * (config.kv_lora_rank + config.qk_rope_head_dim)
    attention = (dim * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * heads * config.qk_head_dim + kv
                 + config.kv_lora_rank + config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
                 + heads * config.v_head_dim * dim)
    router = config.n_routed_experts * (dim + 1)  # weight and bias
    experts = (config.n_shared_experts + config.n_activated_experts) * 3 * dim * config.moe_inter_dim
    block = attention + 2 * dim + router + experts  # 2 norms
    per_query = heads * (config.qk_head_dim + config.v_head_dim) * 2
    left_out = 2 * (block - kv) * (length - 1) + per_query * (length * (length + 1) / 2 - length)
    assert bench.prefill_flops(config, 2, length) - bench.prefill_flops(config, 2, length, trimmed=True) == 2 * left_out


def test_fp8_weights_are_counted_as_stored():
    """An e4m3 expert: one byte per weight and a float32 scale per 128x128 block (dim 256 = 2 blocks, width
    160 = 2 blocks, one of them partial)."""
    config = bench.WORKLOADS["tiny"]["config"].replace(moe_inter_dim=160, fp8_weights=True)
    weights = bench.bench_weights(config)
    expert = 3 * (config.dim * config.moe_inter_dim + 4 * 2 * 2)
    unused = config.n_routed_experts - config.n_activated_experts
    assert bench.decode_bytes(weights, config, 64) - bench.decode_bytes(weights, config, 1) == unused * expert


def test_a_benchmark_with_a_missed_gate_fails_its_command(monkeypatch, tmp_path, capsys):
    """benchmarks.timing.publish: the results are written either way; a missed gate makes the exit status 1."""
    from dsv3_conformance.benchmarks import timing

    monkeypatch.setattr(timing, "RESULTS", tmp_path)
    rows = [{"case": "a", "ms": 1.0}]
    assert timing.publish("held", "t", rows, [timing.gate("holds", 1.0, True)], "n") == 0
    assert timing.publish("missed", "t", rows, [timing.gate("holds", 1.0, True),
                                                timing.gate("too slow", 2.0, False)], "n") == 1
    assert json.loads((tmp_path / "missed.json").read_text())["passed"] is False
    assert "gate missed: too slow" in capsys.readouterr().err
