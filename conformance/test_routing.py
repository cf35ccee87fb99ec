"""Routing invariants of each backend's gate (report eq. 12-16, SPEC section 2).

The expected values are computed here from the definition, in float64: affinities, group scores, and
the conditions a correct choice must meet. Biases include strongly negative ones, where masking
groups with 0 instead of -inf picks experts from masked groups.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from conformance.backends import components
from conformance.checks import expect_close
from conformance.strategies import configs
from conformance.tolerances import tolerance
from reference.weights import GateWeights


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


@given(gates())
def test_exactly_k_distinct_experts(backend, gate_case):
    config, x, gate = gate_case
    _, experts = components(backend).route(x, gate, config)
    assert experts.shape == (len(x), config.n_activated_experts)
    for row in np.asarray(experts):
        assert len(set(row.tolist())) == config.n_activated_experts, f"repeated expert in {row}"
        assert all(0 <= e < config.n_routed_experts for e in row), f"expert index out of range in {row}"


@given(gates())
def test_experts_come_from_the_best_groups(backend, gate_case):
    """At most topk_group groups, and they are the best by top-2 sum (bias) or max (no bias)."""
    config, x, gate = gate_case
    weights, experts = components(backend).route(x, gate, config)
    choice = _affinities(x, gate, config) + (0 if gate.bias is None else gate.bias)
    grouped = choice.reshape(len(x), config.n_expert_groups, -1)
    group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1) if gate.bias is not None else grouped.max(-1)
    for token, row in enumerate(np.asarray(experts)):
        groups = set((row // config.experts_per_group).tolist())
        assert len(groups) <= config.n_limited_groups, (
            f"token {token} routed to groups {sorted(groups)}, more than topk_group={config.n_limited_groups}")
        threshold = np.sort(group_score[token])[-config.n_limited_groups]
        worst_used = min(group_score[token][g] for g in groups)
        assert worst_used >= threshold - _margin(weights), (
            f"token {token} uses group score {worst_used:.6g} below the top-{config.n_limited_groups} "
            f"threshold {threshold:.6g}")


@given(gates())
def test_choice_uses_biased_scores(backend, gate_case):
    """Within the kept groups, no unchosen expert has a higher biased score than a chosen one."""
    config, x, gate = gate_case
    weights, experts = components(backend).route(x, gate, config)
    choice = _affinities(x, gate, config) + (0 if gate.bias is None else gate.bias)
    for token, row in enumerate(np.asarray(experts)):
        groups = set((row // config.experts_per_group).tolist())
        candidates = [e for e in range(config.n_routed_experts)
                      if e // config.experts_per_group in groups and e not in row]
        if candidates:
            assert max(choice[token, candidates]) <= min(choice[token, row]) + _margin(weights), (
                f"token {token}: an unchosen expert scores higher than a chosen one")


@given(gates())
def test_weights_are_unbiased_normalized_and_scaled(backend, gate_case):
    """Weights = unbiased affinities of the chosen experts, normalized for sigmoid, times route_scale."""
    config, x, gate = gate_case
    weights, experts = components(backend).route(x, gate, config)
    picked = np.take_along_axis(_affinities(x, gate, config), np.asarray(experts), axis=1)
    if config.score_func == "sigmoid":
        picked = picked / picked.sum(axis=1, keepdims=True)
        expect_close("sum of sigmoid gate weights vs route_scale", np.asarray(weights).sum(axis=1),
                     np.full(len(x), config.route_scale), f"routing.{np.asarray(weights).dtype}")
    expect_close("gate weights vs unbiased affinities of the chosen experts", weights, picked * config.route_scale,
                 f"routing.{np.asarray(weights).dtype}")
