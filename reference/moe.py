"""DeepSeekMoE with auxiliary-loss-free routing (report section 2.1.2, equations 12-16).

Affinities s = sigmoid(x W_g^T) (softmax for V2-style gates). The correction bias b is added only to
choose experts (eq. 16): group-limited choice keeps the topk_group groups with the best score (sum of
the two best biased affinities when a bias exists, the best one otherwise), masks the other groups
with -inf, and takes the top-k biased affinities. The gating weights are the unbiased affinities of
the chosen experts, normalized for sigmoid gates (eq. 13), times route_scale.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.weights import ExpertNotResident, FFNWeights, GateWeights, MoEWeights

from .ffn import swiglu_ffn


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first; ties go to the lower index."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def affinities(x: np.ndarray, gate: GateWeights, config: ModelConfig) -> np.ndarray:
    """Token-to-expert affinities s [T, E] (eq. 15; softmax for V2-style gates)."""
    logits = x @ gate.weight.astype(x.dtype).T
    if config.score_func == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def group_scores(choice: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Score of each expert group [T, G]: sum of its two best choice scores with a bias, else its best."""
    grouped = choice.reshape(choice.shape[0], config.n_expert_groups, config.experts_per_group)
    if config.gate_bias:
        return np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
    return grouped.max(axis=-1)


# What an expert outside the kept groups scores: -inf, not 0, since with negative biases every kept
# score may be below 0 and a 0 would win.
MASKED_CHOICE = -np.inf


def limit_to_groups(choice: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Choice scores with every expert outside the topk_group best groups set to MASKED_CHOICE."""
    if config.n_expert_groups == 1:
        return choice
    kept = top_k(group_scores(choice, config), config.n_limited_groups)
    allowed = np.zeros((choice.shape[0], config.n_expert_groups), dtype=bool)
    np.put_along_axis(allowed, kept, True, axis=-1)
    return np.where(np.repeat(allowed, config.experts_per_group, axis=-1), choice, MASKED_CHOICE)


def select_experts(choice: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The k experts [T, k] with the best choice scores inside the kept groups (eq. 16)."""
    return top_k(limit_to_groups(choice, config), config.n_activated_experts)


def normalizes_topk(config: ModelConfig) -> bool:
    """Sigmoid gates renormalize the chosen experts' weights to sum 1; softmax gates do not."""
    return config.score_func == "sigmoid"


def gate_weights(scores: np.ndarray, experts: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Unbiased affinities of the chosen experts, normalized for sigmoid gates (eq. 13), times route_scale."""
    weights = np.take_along_axis(scores, experts, axis=-1)
    if normalizes_topk(config):
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights * config.route_scale


def route(x: np.ndarray, gate: GateWeights, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Gating weights [T, k] and chosen expert indices [T, k] for tokens x [T, dim]."""
    scores = affinities(x, gate, config)
    choice = scores if gate.bias is None else scores + gate.bias.astype(x.dtype)
    experts = select_experts(choice, config)
    return gate_weights(scores, experts, config), experts


def moe(x: np.ndarray, weights: MoEWeights, config: ModelConfig, numerics: Numerics,
        forced_experts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """sum_i g_i * expert_i(x) over the chosen experts plus the shared experts (eq. 12), for x [T, dim].

    Returns the output and the chosen experts [T, k]. `forced_experts` replaces the choice (the gating
    weights still come from this model's own affinities): it lets two backends be compared on equal routing.
    """
    if forced_experts is None:
        gating, experts = route(x, weights.gate, config)
    else:
        experts = np.asarray(forced_experts)
        gating = gate_weights(affinities(x, weights.gate, config), experts, config)
    out = np.zeros_like(x)
    for expert in np.unique(experts):
        if weights.experts[expert] is None:
            raise ExpertNotResident(f"a token routes to expert {int(expert)}, which was not loaded")
        tokens, slot = np.nonzero(experts == expert)
        out[tokens] += gating[tokens, slot, None] * swiglu_ffn(x[tokens], weights.experts[expert], numerics, "expert")
    return out + shared_experts(x, weights.shared, numerics), experts


def shared_experts(x: np.ndarray, shared: FFNWeights | None, numerics: Numerics) -> np.ndarray:
    """The shared experts' output (one FFN of width n_shared * moe_inter), zero when there are none."""
    return np.zeros_like(x) if shared is None else swiglu_ffn(x, shared, numerics, "shared_expert")
