"""Routing invariants of each backend's gate (report eq. 12-16, SEMANTICS.md section 2).

The expected values are computed here from the definition, in float64: affinities, group scores, and
the conditions a correct choice must meet. Biases include strongly negative ones, where masking
groups with 0 instead of -inf picks experts from masked groups.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from dsv3_conformance.format.weights import GateWeights
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.verdict import expect, expect_close
from dsv3_conformance.checks.registry import check, examples
from dsv3_conformance.checks.strategies import configs

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


def _group_scores(choice: np.ndarray, config) -> np.ndarray:
    """[T, G]: the top-2 sum of each group's choice scores with a bias, the maximum without."""
    grouped = choice.reshape(len(choice), config.n_expert_groups, -1)
    return np.sort(grouped, axis=-1)[..., -2:].sum(-1) if config.gate_bias else grouped.max(-1)


def group_violation(choice: np.ndarray, row: np.ndarray, config, margin: float) -> str | None:
    """Why the experts `row` of one token cannot come from the topk_group best groups of its choice scores (the
    float64 definition) read with a slack of `margin`; None when they can."""
    groups = sorted(set((np.asarray(row) // config.experts_per_group).tolist()))
    if len(groups) > config.n_limited_groups:
        return f"routed to groups {groups}, more than topk_group={config.n_limited_groups}"
    scores = _group_scores(choice[None], config)[0]
    threshold = np.sort(scores)[-config.n_limited_groups]
    worst_used = min(scores[g] for g in groups)
    if worst_used < threshold - 2 * margin:  # a top-2 sum carries the slack of both scores
        return f"uses group score {worst_used:.6g} below the top-{config.n_limited_groups} threshold {threshold:.6g}"
    return None


def choice_violation(choice: np.ndarray, row: np.ndarray, config, margin: float) -> str | None:
    """Why the experts `row` of one token are not its top-k choice scores within the groups they come from, and
    within the groups a top-topk_group selection containing those also keeps; None when they are."""
    row = np.asarray(row)
    used = set((row // config.experts_per_group).tolist())
    others = [g for g in np.argsort(-_group_scores(choice[None], config)[0], kind="stable") if g not in used]
    kept = used | set(others[: max(0, config.n_limited_groups - len(used))])
    candidates = [e for e in range(config.n_routed_experts) if e // config.experts_per_group in kept and e not in row]
    if candidates:
        best_unchosen, worst_chosen = max(choice[candidates]), min(choice[row])
        if best_unchosen > worst_chosen + margin:
            return f"an unchosen expert scores {best_unchosen:.6g} above a chosen one ({worst_chosen:.6g})"
    return None


def misrouted(choice: np.ndarray, experts: np.ndarray, config, margin: float) -> dict[int, str]:
    """Tokens whose experts [T, k] no group-limited top-k of the choice scores [T, E] (float64, s + bias) allows
    when read with a slack of `margin` (a near tie may break either way), with why."""
    problems = {}
    for token, row in enumerate(np.asarray(experts)):
        if len(set(row.tolist())) != config.n_activated_experts or not all(0 <= e < config.n_routed_experts
                                                                         for e in row):
            problems[token] = f"experts {row.tolist()} are not {config.n_activated_experts} distinct valid indices"
            continue
        why = group_violation(choice[token], row, config, margin) or choice_violation(choice[token], row, config,
                                                                                     margin)
        if why:
            problems[token] = why
    return problems


@check("routing:groups", COMPONENT)
@examples(gates())
def experts_come_from_the_best_groups(backend, gate_case):
    """At most topk_group groups, and they are the best by top-2 sum (bias) or max (no bias)."""
    config, x, gate = gate_case
    weights, experts = backend.component("route")(x, gate, config)
    choice = _choice(x, gate, config)
    for token, row in enumerate(np.asarray(experts)):
        why = group_violation(choice[token], row, config, _margin(weights))
        expect(why is None, f"token {token} {why}")


@check("routing:choice", COMPONENT)
@examples(gates())
def choice_uses_biased_scores(backend, gate_case):
    """Within the kept groups, no unchosen expert has a higher biased score than a chosen one."""
    config, x, gate = gate_case
    weights, experts = backend.component("route")(x, gate, config)
    choice = _choice(x, gate, config)
    for token, row in enumerate(np.asarray(experts)):
        why = choice_violation(choice[token], row, config, _margin(weights))
        expect(why is None, f"token {token}: {why}")


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
