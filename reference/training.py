"""Training in NumPy (float64): the losses, auxiliary-loss-free balancing, AdamW, and gradients by finite
differences. Slow and plain on purpose: it is the baseline the TensorFlow training step is checked against.

Losses of one batch of token sequences [B, S] (report sections 2.1.2, 2.2; SEMANTICS.md sections 3, 4):
- main: the mean cross-entropy of each position's logits against the next token;
- MTP: lambda / D times the sum over depths of each depth's cross-entropy (`mtp_loss`);
- balance: for each MoE layer and sequence, alpha * sum_i f_i P_i with f_i = N_r / (K_r T) * (tokens of the
  sequence routed to expert i) and P_i = the sequence's mean of s_i / sum_j s_j (s: the affinities, before
  the bias), averaged over the sequences and summed over the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.training import TrainSettings
from dsv3_conformance.format.weights import MoEWeights

from .attention import LatentCache
from .model import block, mtp_forward
from .moe import affinities
from .norm import rms_norm


@dataclass(frozen=True)
class Losses:
    main: float
    mtp: float
    balance: float
    loads: tuple[np.ndarray, ...]  # tokens routed to each expert [E], per MoE block (main layers, then MTP depths)
    groups_reached: int  # the most expert groups one token's experts span, over every MoE layer

    @property
    def total(self) -> float:
        return self.main + self.mtp + self.balance


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, in float64."""
    wide = logits.astype(np.float64)
    shifted = wide - wide.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def mtp_loss(logits: list[np.ndarray], tokens: np.ndarray, weight: float, options: MTPOptions) -> float:
    """lambda / D * sum over depths k of the cross-entropy of depth k's logits [B, S, V] against t(i+k+1).

    Positions whose target lies beyond the sequence have none; the mean is over the positions that have
    one ("valid") or over all S positions (1/T, "all").
    """
    batch, length = tokens.shape
    total = 0.0
    for depth, depth_logits in enumerate(logits, start=1):
        valid = length - depth - 1
        if valid <= 0:
            continue
        losses = cross_entropy(depth_logits[:, :valid], tokens[:, depth + 1:])
        total += losses.sum() / (batch * (valid if options.loss_normalization == "valid" else length))
    return mtp_loss_scale(weight, len(logits)) * total


def mtp_loss_scale(weight: float, depths: int) -> float:
    """lambda / D: the weight of the sum of the D depths' losses."""
    return weight / depths


def balance_loss(scores: np.ndarray, experts: np.ndarray, config: ModelConfig, alpha: float) -> float:
    """alpha * sum_i f_i P_i averaged over sequences; scores [B, S, E] (unbiased affinities), experts [B, S, k]."""
    batch, length, n_experts = scores.shape
    k = config.n_activated_experts
    total = 0.0
    for sequence in range(batch):
        counts = np.bincount(experts[sequence].ravel(), minlength=n_experts)
        f = n_experts / (k * length) * counts
        normalized = scores[sequence] / scores[sequence].sum(axis=-1, keepdims=True)
        total += alpha * float(f @ normalized.mean(axis=0))
    return total / batch


def learning_rate_at(settings: TrainSettings, step: int) -> float:
    """The learning rate of step 1, 2, ...: a linear warm-up over warmup_steps to the peak, then a cosine from the
    peak down to final_lr_ratio of it at total_steps (flat after)."""
    if step <= settings.warmup_steps:
        return settings.learning_rate * step / settings.warmup_steps
    done = min(step - settings.warmup_steps, settings.total_steps - settings.warmup_steps)
    span = max(settings.total_steps - settings.warmup_steps, 1)
    floor = settings.final_lr_ratio * settings.learning_rate
    return floor + (settings.learning_rate - floor) * (1 + math.cos(math.pi * done / span)) / 2


def expert_loads(experts: np.ndarray, n_experts: int) -> np.ndarray:
    return np.bincount(np.asarray(experts).ravel(), minlength=n_experts)


def max_violation(loads: np.ndarray) -> float:
    """MaxVio = max_i load_i / mean load - 1 (0 for a perfectly balanced layer)."""
    mean = loads.mean()
    return float(loads.max() / mean - 1.0) if mean else 0.0


def bias_update(bias: np.ndarray, loads: np.ndarray, gamma: float) -> np.ndarray:
    """b_i - gamma for an overloaded expert, + gamma for an underloaded one, unchanged at the mean load."""
    return bias + gamma * np.sign(loads.mean() - loads)


def groups_spanned(experts: np.ndarray, config: ModelConfig) -> int:
    groups = np.asarray(experts) // config.experts_per_group
    return max((len(set(row.tolist())) for row in groups.reshape(-1, groups.shape[-1])), default=0)


def losses(weights, config: ModelConfig, tokens: np.ndarray, settings: TrainSettings,
           numerics: Numerics = Numerics(), form: AttentionForm = "naive",
           options: MTPOptions = MTPOptions()) -> Losses:
    """Every loss of the batch `tokens` [B, S] in float64 (weights: a ModelWeights tree)."""
    batch, length = tokens.shape
    h = weights.embed[tokens].astype(np.float64)
    gate_inputs, chosen, loads = [], [], []
    for layer in weights.layers:
        cache = LatentCache.allocate(config, batch, np.float64)
        h, _, experts = block(h, layer, config, numerics, cache, 0, form, gate_inputs=gate_inputs)
        if experts is not None:
            chosen.append(experts)
    normed = rms_norm(h, weights.norm, config.rms_norm_eps)
    logits = normed @ weights.head.T
    main = float(cross_entropy(logits[:, :-1], tokens[:, 1:]).mean())
    mtp, mtp_experts = 0.0, []
    if weights.mtp:
        caches = tuple(LatentCache.allocate(config, batch, np.float64) for _ in weights.mtp)
        # Teacher forcing: depth k at position i embeds t(i+k); past the end, token 0 (those positions have no
        # target, and the padding keeps every position's routing defined for the balance statistics).
        stream = np.pad(tokens, ((0, 0), (0, len(weights.mtp))))
        result = mtp_forward(weights, config, numerics, form, normed, stream, 0, caches, options)
        mtp = mtp_loss(list(result.logits), tokens, settings.mtp_weight, options)
        mtp_experts = [experts for experts in result.experts if experts is not None]
    balance = 0.0
    moe_layers = [layer.ffn for layer in weights.layers if isinstance(layer.ffn, MoEWeights)]
    for gate_input, experts, ffn in zip(gate_inputs, chosen, moe_layers):
        loads.append(expert_loads(experts, config.n_routed_experts))
        if settings.uses_sequence_loss:
            scores = affinities(gate_input, ffn.gate, config).reshape(batch, length, -1)
            balance += balance_loss(scores, experts.reshape(batch, length, -1), config, settings.balance_alpha)
    loads += [expert_loads(experts, config.n_routed_experts) for experts in mtp_experts]
    every = chosen + mtp_experts
    return Losses(main, mtp, balance, tuple(loads), max((groups_spanned(e, config) for e in every), default=0))


# --- optimization -------------------------------------------------------------------------------------------

def clip_by_global_norm(grads: list[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)))
    factor = min(1.0, max_norm / norm) if norm else 1.0
    return [g * factor for g in grads], norm


def adamw(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float,
          settings: TrainSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One AdamW update (decoupled weight decay) at step 1, 2, ...: (param, m, v)."""
    m = settings.beta1 * m + (1 - settings.beta1) * grad
    v = settings.beta2 * v + (1 - settings.beta2) * grad * grad
    m_hat = m / (1 - settings.beta1 ** step)
    v_hat = v / (1 - settings.beta2 ** step)
    param = param - lr * (m_hat / (np.sqrt(v_hat) + settings.epsilon) + settings.weight_decay * param)
    return param, m, v


def finite_difference(function: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d function / d x by central differences, one element at a time (float64)."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for index in range(flat.size):
        saved = flat[index]
        flat[index] = saved + eps
        up = function(x)
        flat[index] = saved - eps
        down = function(x)
        flat[index] = saved
        out[index] = (up - down) / (2 * eps)
    return grad


# --- the trained arrays, and the loss as a function of them --------------------------------------------------

def _is_mtp_copy(path: tuple) -> bool:
    return path[:1] == ("mtp",) and path[-1] in ("embed", "head")


def arrays(tree, path=()):
    """(path, array) of every array of a weight tree, depth first."""
    if isinstance(tree, np.ndarray):
        yield path, tree
    elif isinstance(tree, tuple):
        for index, item in enumerate(tree):
            yield from arrays(item, path + (index,))
    elif tree is not None:
        for name in tree.__dataclass_fields__:
            yield from arrays(getattr(tree, name), path + (name,))


def replaced(tree, values: dict, path=()):
    """The tree with the arrays at the paths in `values` replaced."""
    if isinstance(tree, np.ndarray):
        return values.get(path, tree)
    if isinstance(tree, tuple):
        return tuple(replaced(item, values, path + (index,)) for index, item in enumerate(tree))
    if tree is None:
        return None
    return type(tree)(**{name: replaced(getattr(tree, name), values, path + (name,))
                         for name in tree.__dataclass_fields__})


def in_float64(weights):
    """The weight tree with every float array in float64 (fp8 codes stay)."""
    return replaced(weights, {p: a.astype(np.float64) for p, a in arrays(weights) if a.dtype.kind == "f"})


def trainable_paths(weights) -> list[tuple]:
    """The trained arrays: every float array but the gate biases (moved by the balancing rule) and the MTP
    modules' copies of the embedding and the head (the same parameters as the main model's)."""
    return [path for path, array in arrays(weights)
            if path[-1] != "bias" and not _is_mtp_copy(path) and array.dtype.kind == "f"]


def tie_mtp_copies(weights, values: dict):
    """values with the MTP modules' embedding and head set to the main model's."""
    tied = dict(values)
    for depth in range(len(weights.mtp)):
        tied[("mtp", depth, "embed")] = values.get(("embed",), weights.embed)
        tied[("mtp", depth, "head")] = values.get(("head",), weights.head)
    return tied


def directional_derivative(weights, config: ModelConfig, tokens: np.ndarray, settings: TrainSettings, path: tuple,
                           direction: np.ndarray, eps: float = 1e-6) -> float:
    """d total loss / d t of the trained array at `path` moved along `direction` (t = 0), by a central finite
    difference in float64 (the MTP modules' copies of the embedding and head move with the main model's)."""
    base = dict(arrays(weights))[path]

    def total(t: float) -> float:
        return losses(replaced(weights, tie_mtp_copies(weights, {path: base + t * direction})), config, tokens,
                      settings).total
    return (total(eps) - total(-eps)) / (2 * eps)
