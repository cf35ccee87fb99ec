"""Routing invariants of each backend's gate (report eq. 12-16, SEMANTICS.md section 2).

The expected values are computed here from the definition, in float64: affinities, group scores, and
the conditions a correct choice must meet. Biases include strongly negative ones, where masking
groups with 0 instead of -inf picks experts from masked groups.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ..format.weights import GateWeights
from ..tolerances import tolerance
from ..verdict import expect, expect_close
from .registry import check, examples
from .strategies import configs

COMPONENT = "MoE routing"


@st.composite
def gates(draw):
    config = draw(configs())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    tokens = draw(st.integers(1, 24))
    x = rng.standard_normal((tokens, config.dim))
    weight = rng.standard_normal((config.n_routed_experts, config.dim)) / np.sqrt(config.dim)
    bias = None
    if config.gate_bias:
        bias = rng.normal(draw(st.sampled_from([-20.0, -3.0, -0.5, 0.0, 1.0])), draw(st.sampled_from([0.1, 1.0])),
                          config.n_routed_experts)
    return config, x, GateWeights(weight, bias)


def _margin(weights) -> float:
    """Slack for ranking choice scores recomputed here in float64 against a backend's own precision."""
    return tolerance(f"routing.margin.{np.asarray(weights).dtype}").value


def _affinities(x, gate, config):
    logits = x @ gate.weight.T
    if config.score_func == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _choice(x, gate, config):
    return _affinities(x, gate, config) + (0 if gate.bias is None else gate.bias)


@check("routing:k", COMPONENT)
@examples(gates())
def exactly_k_distinct_experts(backend, gate_case):
    """Every token gets exactly k distinct experts, each a valid index."""
    config, x, gate = gate_case
    _, experts = backend.component("route")(x, gate, config)
    experts = np.asarray(experts)
    expect(experts.shape == (len(x), config.n_activated_experts),
           f"experts of shape {list(experts.shape)}, expected {[len(x), config.n_activated_experts]}")
    for token, row in enumerate(experts):
        expect(len(set(row.tolist())) == config.n_activated_experts, f"token {token}: repeated expert in {row}")
        expect(all(0 <= e < config.n_routed_experts for e in row), f"token {token}: expert index out of range in {row}")


@check("routing:groups", COMPONENT)
@examples(gates())
def experts_come_from_the_best_groups(backend, gate_case):
    """At most topk_group groups, and they are the best by top-2 sum (bias) or max (no bias)."""
    config, x, gate = gate_case
    weights, experts = backend.component("route")(x, gate, config)
    grouped = _choice(x, gate, config).reshape(len(x), config.n_expert_groups, -1)
    group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1) if gate.bias is not None else grouped.max(-1)
    for token, row in enumerate(np.asarray(experts)):
        groups = set((row // config.experts_per_group).tolist())
        expect(len(groups) <= config.n_limited_groups,
               f"token {token} routed to groups {sorted(groups)}, more than topk_group={config.n_limited_groups}")
        threshold = np.sort(group_score[token])[-config.n_limited_groups]
        worst_used = min(group_score[token][g] for g in groups)
        expect(worst_used >= threshold - _margin(weights),
               f"token {token} uses group score {worst_used:.6g} below the top-{config.n_limited_groups} "
               f"threshold {threshold:.6g}")


@check("routing:choice", COMPONENT)
@examples(gates())
def choice_uses_biased_scores(backend, gate_case):
    """Within the kept groups, no unchosen expert has a higher biased score than a chosen one."""
    config, x, gate = gate_case
    weights, experts = backend.component("route")(x, gate, config)
    choice = _choice(x, gate, config)
    for token, row in enumerate(np.asarray(experts)):
        groups = set((row // config.experts_per_group).tolist())
        candidates = [e for e in range(config.n_routed_experts)
                      if e // config.experts_per_group in groups and e not in row]
        if candidates:
            best_unchosen, worst_chosen = max(choice[token, candidates]), min(choice[token, row])
            expect(best_unchosen <= worst_chosen + _margin(weights),
                   f"token {token}: an unchosen expert scores {best_unchosen:.6g} above a chosen one "
                   f"({worst_chosen:.6g})")


@check("routing:weights", COMPONENT)
@examples(gates())
def weights_are_unbiased_normalized_and_scaled(backend, gate_case):
    """Weights = unbiased affinities of the chosen experts, normalized for sigmoid, times route_scale."""
    config, x, gate = gate_case
    weights, experts = backend.component("route")(x, gate, config)
    policy = f"routing.{np.asarray(weights).dtype}"
    picked = np.take_along_axis(_affinities(x, gate, config), np.asarray(experts), axis=1)
    if config.score_func == "sigmoid":
        picked = picked / picked.sum(axis=1, keepdims=True)
        expect_close("sum of sigmoid gate weights vs route_scale", np.asarray(weights).sum(axis=1),
                     np.full(len(x), config.route_scale), policy)
    expect_close("gate weights vs unbiased affinities of the chosen experts", weights, picked * config.route_scale,
                 policy)
