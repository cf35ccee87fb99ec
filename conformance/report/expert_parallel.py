"""The expert-parallelism section of the report: the layer's properties against the single-device MoE, the
node limit, dispatch traffic of the 671B config under both schemes, and redundant-expert placement."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_conformance.format.config import deepseek_v3_671b
from dsv3_conformance.format.weights import GateWeights
from dsv3_conformance.ep.placement import contiguous, with_redundancy
from dsv3_conformance.ep.traffic import Topology, formula, nodes_per_token, plan

# The 671B deployment of the report: 8 nodes of 8 GPUs, 256 routed experts (4 per GPU), one group per node.
NODES, PER_NODE = 8, 8
HIDDEN_BYTES = 7168  # one token's hidden state dispatched in fp8, one byte per element
TOKENS = 1024


def routing_671b(tokens: int = TOKENS, seed: int = 0) -> np.ndarray:
    """Experts [T, 8] chosen by the reference router with the 671B gate shapes on random inputs and weights."""
    from dsv3_conformance.backends import REFERENCE

    config = deepseek_v3_671b()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, config.dim))
    gate = GateWeights(rng.standard_normal((config.n_routed_experts, config.dim)) / np.sqrt(config.dim),
                       rng.normal(-0.2, 0.5, config.n_routed_experts))
    return REFERENCE.component("route")(x, gate, config)[1]


def traffic_rows(experts: np.ndarray, tokens_per_rank_seed: int = 1) -> list[dict]:
    config = deepseek_v3_671b()
    topology = Topology(NODES * PER_NODE, PER_NODE, config.n_routed_experts)
    source = np.random.default_rng(tokens_per_rank_seed).integers(0, topology.ranks, len(experts))
    reached = nodes_per_token(experts, topology)
    closed = formula(experts, source, topology)
    rows = []
    for scheme in ("direct", "two-hop"):
        traffic = plan(experts, source, topology, scheme)
        agree = traffic.inter == closed[f"{scheme}.inter"] and traffic.intra == closed[f"{scheme}.intra"]
        rows.append({"scheme": scheme, "tokens": len(experts),
                     "nodes per token (mean / max)": f"{reached.mean():.2f} / {reached.max()}",
                     "inter-node copies per token": f"{traffic.inter / len(experts):.2f}",
                     "inter-node bytes per token": f"{traffic.inter / len(experts) * HIDDEN_BYTES:,.0f}",
                     "intra-node copies per token": f"{traffic.intra / len(experts):.2f}",
                     "busiest rank receives (inter)": int(traffic.received_inter.max()),
                     "plan = formula": "yes" if agree else "NO",
                     "status": "pass" if agree and reached.max() <= config.n_limited_groups else "FAIL"})
    return rows


def placement_rows(loads: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, (load, devices, extra) in loads.items():
        before, after = contiguous(load, devices), with_redundancy(load, devices, extra)
        rows.append({"load": name, "experts": len(load), "devices": devices, "redundant slots": devices * extra,
                     "max/mean before": f"{before.max_over_mean:.2f}", "max/mean after": f"{after.max_over_mean:.2f}",
                     "status": "pass" if after.max_over_mean <= before.max_over_mean else "FAIL"})
    return rows


def report_section(golden_dir, backends: list[str], out: Path):
    from dsv3_conformance.backends import TF
    from dsv3_conformance.checks.isolated import run_isolated
    from dsv3_conformance.report.loads import expert_loads
    from dsv3_conformance.report.section import Section

    results = run_isolated("dsv3_conformance.ep.properties", TF)
    rows = [{"what": f"EP layer on {size} device(s) vs one device", "examples": r["examples"],
             "routings": ", ".join(r["kinds"]), "worst forward": f"{r['forward']:.1e}",
             "worst gradient": f"{r['gradients']:.1e}", "status": "pass" if r["failure"] is None else
             f"FAIL: {r['failure']}"} for size, r in results["properties"].items()]
    limit = results["node_limit"]
    rows.append({"what": "node limit asserted on a dispatch that breaks it", "status": "pass" if limit["asserted"]
                 else "FAIL: not asserted", "routings": limit["message"][:120]})
    traffic = traffic_rows(routing_671b())
    golden = {f"{name}, layer {layer}": (counts[layer].astype(np.float64), 4, 1)
              for name, counts in expert_loads(golden_dir).items() for layer in range(len(counts))}
    skewed = np.random.default_rng(2).pareto(1.5, 256) + 0.05
    placement = placement_rows({**golden, "generated Pareto(1.5), 671B shape": (skewed, 64, 1)})
    intro = ("impl/expert_parallel.py on a DTensor mesh (all-to-all by relayout): its output and gradients against the "
             "single-device MoE (ep.float64), the node limit, the dispatch plan of the 671B config (8 nodes x 8 ranks, "
             "router on random inputs) under direct and two-hop dispatch checked against the closed formula, and "
             "redundant-expert placement (conformance/ep/).")
    section = Section("Expert parallelism", intro, rows + traffic + placement)
    section.passed = all(str(row.get("status", "pass")).startswith("pass") for row in section.rows)
    return section
