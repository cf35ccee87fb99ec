"""Expert parallelism: the DTensor layer against the single-device MoE on 1, 2, 4 and 8 devices (forward and
gradients, degenerate routings included), the node limit, the dispatch plan against its closed formula,
redundant-expert placement, and the tf model with expert-parallel MoE blocks on the golden cases."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv3_conformance.ep.placement import contiguous, with_redundancy
from dsv3_conformance.report.expert_parallel import routing_671b, traffic_rows
from dsv3_conformance.ep.traffic import Topology, formula, nodes_per_token, plan
from dsv3_conformance.paths import ROOT


def _run(*args, timeout=900) -> dict:
    done = subprocess.run([sys.executable, "-m", "dsv3_conformance.ep.properties", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def properties() -> dict:
    return _run()


@pytest.mark.xdist_group("ep-properties")  # one run of the properties for both tests
def test_the_layer_equals_one_device_on_every_mesh(properties):
    """N in {1, 2, 4, 8}: forward and gradients within ep.float64, over generated routings and the degenerate
    ones (all tokens to one expert, experts that receive nothing, skewed loads, tokens uneven over devices)."""
    results = properties["properties"]
    assert set(results) == {"1", "2", "4", "8"}
    for size, record in results.items():
        assert record["failure"] is None, (size, record["failure"])
        assert record["examples"] >= 8
        assert set(record["kinds"]) == {"uniform", "one-expert", "some-experts-empty", "skewed"}


@pytest.mark.xdist_group("ep-properties")
def test_the_node_limit_is_asserted_on_dispatch(properties):
    assert properties["node_limit"]["asserted"], properties["node_limit"]["message"]


@pytest.mark.parametrize("mutant", ["ep-half-capacity", "ep-ungated"])
def test_a_broken_layer_fails_the_properties(mutant):
    results = _run("--mutant", mutant, "--examples", "1")["properties"]
    assert all(record["failure"] for record in results.values()), results


@given(st.integers(1, 4).map(lambda p: 2 ** p), st.integers(0, 3).map(lambda p: 2 ** p),
       st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_the_dispatch_plan_equals_the_closed_formula(ranks, per_node, k, seed):
    if per_node > ranks:
        per_node = ranks
    topology = Topology(ranks, per_node, experts=ranks * 2)
    rng = np.random.default_rng(seed)
    tokens = int(rng.integers(1, 40))
    experts = np.array([rng.choice(topology.experts, min(k, topology.experts), replace=False) for _ in range(tokens)])
    source = rng.integers(0, ranks, tokens)
    closed = formula(experts, source, topology)
    for scheme in ("direct", "two-hop"):
        traffic = plan(experts, source, topology, scheme)
        assert (traffic.inter, traffic.intra) == (closed[f"{scheme}.inter"], closed[f"{scheme}.intra"])
        assert traffic.sent_inter.sum() == traffic.received_inter.sum()


def test_a_hand_computed_dispatch():
    """2 nodes of 2 ranks, 8 experts (2 per rank). Token on rank 0 to experts 1 (rank 0), 2 (rank 1), 5 and 7
    (ranks 2 and 3, node 1): direct sends 1 intra + 2 inter; two-hop sends 1 intra, 1 inter (to rank 2, the
    peer of rank 0) and rank 2 forwards 1 (to rank 3)."""
    topology = Topology(4, 2, 8)
    experts, source = np.array([[1, 2, 5, 7]]), np.array([0])
    assert formula(experts, source, topology) == {"direct.inter": 2, "direct.intra": 1, "two-hop.inter": 1,
                                                  "two-hop.intra": 2}
    two_hop = plan(experts, source, topology, "two-hop")
    assert two_hop.received_inter.tolist() == [0, 0, 1, 0] and two_hop.received_intra.tolist() == [0, 1, 0, 1]


def test_671b_routing_stays_within_four_nodes_and_two_hop_saves_inter_node_traffic():
    experts = routing_671b(tokens=256)
    assert nodes_per_token(experts, Topology(64, 8, 256)).max() <= 4
    direct, two_hop = traffic_rows(experts)
    assert direct["status"] == two_hop["status"] == "pass"
    assert float(two_hop["inter-node copies per token"]) < float(direct["inter-node copies per token"])
    assert float(two_hop["inter-node copies per token"]) <= 4


def test_redundant_experts_lower_the_busiest_device():
    load = np.array([100.0, 1, 1, 1, 1, 1, 1, 1])
    before, after = contiguous(load, 4), with_redundancy(load, 4, 1)
    assert before.max_over_mean == pytest.approx(101 / (107 / 4))  # experts 0 and 1 on the first device
    assert after.max_over_mean < before.max_over_mean
    assert sum(len(d) for d in after.devices) == 12 and all(len(set(d)) == len(d) for d in after.devices)
    assert sum(expert == 0 for d in after.devices for expert in d) == 4  # the hot expert on every device


def test_the_float32_e4m3_rounding_equals_the_cast():
    """The float32 e4m3 grid the expert-parallel layer rounds to (DTensor carries no float8) equals the harness cast
    bit for bit on every e4m3 value, every midpoint and its float32 neighbours, saturating values, zero and NaN."""
    import tensorflow as tf

    from dsv3_conformance.impl.fp8 import e4m3_grid, to_e4m3

    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.unique(values[np.isfinite(values)])
    middles = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    probes = np.concatenate([finite, middles, np.nextafter(middles, np.float32(np.inf)),
                             np.nextafter(middles, np.float32(-np.inf)), [500.0, -1e6, 0.0, -0.0, np.nan, 1e-30],
                             np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 100]).astype(np.float32)
    got = e4m3_grid(tf.constant(probes)).numpy()
    want = to_e4m3(tf.constant(probes)).numpy().astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)


_GOLDEN = """
import json, sys
from dsv3_conformance.golden.cases import GoldenCase, check_case
from dsv3_conformance.golden.manifest import case_dirs
rows = []
for path in case_dirs("golden"):
    result = check_case(GoldenCase.load(path), "tf-ep")
    rows.append({"case": result.case, "passed": result.passed, "compared": len(result.results),
                 "failed": [r.name for r in result.results if not r.passed]})
print(json.dumps(rows))
"""


@pytest.mark.long
def test_the_model_with_expert_parallel_moe_passes_the_golden_cases():
    """The tf backend with every MoE block expert-parallel over 4 logical devices (backend tf-ep)."""
    done = subprocess.run([sys.executable, "-c", _GOLDEN], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert len(rows) >= 10 and all(row["passed"] for row in rows), rows
