"""Training DeepSeek-V3 in TensorFlow: one XLA-compiled step for the whole model.

The step (report sections 2.1.2, 2.2, 3.3, 4.2; SEMANTICS.md sections 3-5):
- forward in the compute dtype (bfloat16 by default) from float32 master weights; the router stays float32;
  the causal forward over the whole sequence (no cache), the MTP modules teacher-forced on the sequence;
- losses: next-token cross-entropy; the MTP loss, lambda / D times the sum of the depths' cross-entropies
  over the positions that have a target; the complementary sequence-wise balance loss alpha * sum_i f_i P_i
  per MoE layer and sequence (when the settings ask for it);
- gradients through XLA, clipped to a global norm, AdamW on float32 moments with decoupled weight decay and
  the settings' learning-rate schedule (given per step);
- after the update, outside the gradient: each MoE block's correction bias moves by gamma toward balance
  (down for an overloaded expert, up for an underloaded one) when the settings use bias balancing; the bias
  only ever chooses experts, never weights them;
- returned: the losses, the gradient norm, every MoE block's expert loads, and the most expert groups one
  token's experts spanned (the caller asserts node-limited routing on it).
With `settings.fp8`, every linear layer's Fprop, Dgrad and Wgrad GEMM runs in fp8 (impl.fp8
.fp8_training_matmul, the same quantizers as inference); the embedding, the output head, the router, the
norms and the attention core stay in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.training import TrainSettings
from dsv3_conformance.format.weights import FFNWeights, GateWeights, LinearWeight, ModelWeights, MoEWeights

from . import attention
from .fp8 import dequantize_weight
from .moe import StackedMoE, affinities
from .mtp import chained, mtp_embedding, mtp_head, mtp_input
from .model import program
from .trees import leaves, rebuild, structure_of


def _master(array) -> tf.Variable:
    return tf.Variable(tf.constant(np.asarray(array, np.float32)), trainable=True)


def _master_linear(weight: LinearWeight) -> LinearWeight:
    if weight.quantized:  # training starts from the dequantized fp8 checkpoint
        return LinearWeight(_master(dequantize_weight(tf.constant(weight.weight), tf.constant(weight.scale_inv),
                                                      tf.float32).numpy()))
    return LinearWeight(_master(weight.weight))


def _variable_tree(weights: ModelWeights):
    """The model's master variables; the MTP modules share the main model's embedding and output head (the same
    variables)."""
    main = _master_tree(dataclasses.replace(weights, mtp=()))
    modules = tuple(dataclasses.replace(_master_tree(dataclasses.replace(m, embed=None, head=None)),
                                        embed=main.embed, head=main.head) for m in weights.mtp)
    return dataclasses.replace(main, mtp=modules)


def _master_tree(tree):
    """The weight tree as float32 variables, routed experts stacked, gate biases apart (non-trainable)."""
    if tree is None:
        return None
    if isinstance(tree, np.ndarray):
        return _master(tree)
    if isinstance(tree, tuple):
        return tuple(_master_tree(item) for item in tree)
    if isinstance(tree, LinearWeight):
        return _master_linear(tree)
    if isinstance(tree, MoEWeights):
        def stacked(projection: str) -> LinearWeight:
            parts = [_master_linear(getattr(e, projection)).weight.numpy() for e in tree.experts]
            return LinearWeight(_master(np.stack(parts)))
        bias = None if tree.gate.bias is None else tf.Variable(np.asarray(tree.gate.bias, np.float32),
                                                               trainable=False)
        return StackedMoE(GateWeights(_master(tree.gate.weight), bias),
                          FFNWeights(stacked("gate_proj"), stacked("up_proj"), stacked("down_proj")),
                          _master_tree(tree.shared))
    return type(tree)(**{f.name: _master_tree(getattr(tree, f.name)) for f in dataclasses.fields(tree)})


def cross_entropy(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Per-position cross-entropy in float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))


def balance_loss(scores: tf.Tensor, experts: tf.Tensor, config: ModelConfig, alpha: float) -> tf.Tensor:
    """alpha * sum_i f_i P_i per sequence, averaged over sequences; scores [B, S, E] (unbiased affinities),
    experts [B, S, k]. f (counts) carries no gradient; P does."""
    _, length, n_experts = scores.shape
    counts = tf.reduce_sum(tf.one_hot(experts, n_experts, dtype=tf.float32), axis=[1, 2])  # [B, E]
    f = n_experts / (config.n_activated_experts * length) * counts
    p = tf.reduce_mean(scores / tf.reduce_sum(scores, axis=-1, keepdims=True), axis=1)
    return alpha * tf.reduce_mean(tf.reduce_sum(tf.stop_gradient(f) * p, axis=-1))


def bias_update(bias: tf.Tensor, loads: tf.Tensor, gamma: float) -> tf.Tensor:
    """The aux-loss-free update: bias + gamma * sign(mean load - load)."""
    loads = tf.cast(loads, tf.float32)
    return bias + gamma * tf.sign(tf.reduce_mean(loads) - loads)


def mtp_loss_scale(weight: float, depths: int) -> float:
    """The MTP loss is lambda / D times the sum of the depths' losses."""
    return weight / depths


def learning_rate_at(settings: TrainSettings, step: int) -> float:
    """Step 1..: linear warm-up to the peak, then cosine decay to final_lr_ratio of it at total_steps."""
    if settings.warmup_steps and step <= settings.warmup_steps:
        return settings.learning_rate * step / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.total_steps - settings.warmup_steps))
    return settings.learning_rate * (settings.final_lr_ratio + (1.0 - settings.final_lr_ratio)
                                     * 0.5 * (1.0 + math.cos(math.pi * progress)))


def gradients(tape: tf.GradientTape, total: tf.Tensor, values: list[tf.Tensor],
              variables: list[tf.Variable]) -> list[tf.Tensor]:
    """d total / d value for every master weight (zeros where a weight does not reach the loss)."""
    return [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
            for g, v in zip(tape.gradient(total, values), variables)]


def groups_spanned(experts: tf.Tensor, config: ModelConfig) -> tf.Tensor:
    """The most expert groups one token's experts span."""
    groups = tf.one_hot(experts // config.experts_per_group, config.n_expert_groups, dtype=tf.int32)
    return tf.reduce_max(tf.reduce_sum(tf.reduce_max(groups, axis=-2), axis=-1))


class Trainer:
    """A model and its optimizer state; `step(tokens)` runs one compiled training step."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, settings: TrainSettings = TrainSettings(),
                 dtype: str = "bfloat16", attention_form: AttentionForm = "naive",
                 options: MTPOptions = MTPOptions()):
        self.config, self.settings, self.options = config, settings, options
        self.dtype = tf.as_dtype(dtype)
        self.numerics = Numerics(fp8_training=settings.fp8)
        self.tree = _variable_tree(weights)
        modules = self.tree.mtp
        blocks = [layer.ffn for layer in self.tree.layers] + [m.block.ffn for m in modules]
        self.biases = [b.gate.bias for b in blocks if isinstance(b, StackedMoE) and b.gate.bias is not None]
        bias_ids = {id(b) for b in self.biases}
        unique = {id(v): v for v in leaves(self.tree) if id(v) not in bias_ids}
        self.variables = list(unique.values())
        self._slot = {id(v): i for i, v in enumerate(self.variables)}
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.steps = 0
        self.structure = structure_of(self.tree)
        self.program = program(config, self.numerics, self.dtype, attention_form, structure_of(self.tree))
        self._compiled = tf.function(self._step, jit_compile=True, autograph=False)

    # -- the forward pass and the losses --------------------------------------------------------------------

    def _compute_tree(self, values: list[tf.Tensor]):
        """The tree with each master weight cast to the compute dtype (router weights and biases in float32)."""
        cast = {}
        router = {id(b.gate.weight) for b in [layer.ffn for layer in self.tree.layers] + [m.block.ffn
                  for m in self.tree.mtp] if isinstance(b, StackedMoE)}
        for variable, value in zip(self.variables, values):
            cast[id(variable)] = value if id(variable) in router else tf.cast(value, self.dtype)
        return rebuild(self.structure, iter(cast.get(id(leaf), leaf) for leaf in leaves(self.tree)))

    def losses(self, values: list[tf.Tensor], tokens: tf.Tensor) -> dict:
        """Every loss and routing statistic of a batch [B, S], differentiable in `values`."""
        config, settings = self.config, self.settings
        weights = self._compute_tree(values)
        batch, length = tokens.shape
        positions = tf.range(length)
        mask = attention.causal_mask(0, length, length)

        def store(cache, kv_latent, rope_key):
            return kv_latent, rope_key

        gate_inputs: list = []
        layers = len(weights.layers)
        logits, _, experts, source = self.program._forward(weights, tokens, positions, mask, [None] * layers, store,
                                                           gate_inputs)
        main = tf.reduce_mean(cross_entropy(logits[:, :-1], tokens[:, 1:]))
        blocks = [layer.ffn for layer in weights.layers if isinstance(layer.ffn, StackedMoE)]
        balance = tf.constant(0.0)
        if settings.uses_sequence_loss:
            for gate_input, chosen, block in zip(gate_inputs, experts, blocks):
                scores = tf.reshape(affinities(gate_input, block.gate, config), [batch, length, -1])
                balance += balance_loss(scores, tf.reshape(chosen, [batch, length, -1]), config,
                                        settings.balance_alpha)
        mtp, mtp_experts = self._mtp_loss(weights, tokens, source, positions, mask, store)
        return {"main": main, "mtp": mtp, "balance": balance, "experts": list(experts) + mtp_experts}

    def _mtp_loss(self, weights, tokens, state, positions, mask, store) -> tuple[tf.Tensor, list]:
        """Every depth teacher-forced over the sequence: depth k at position i embeds t(i+k) (zeros past the
        end, whose positions have no target) and predicts t(i+k+1)."""
        batch, length = tokens.shape
        cos, sin = self.program._rope(positions)
        total, chosen = tf.constant(0.0), []
        for depth, module in enumerate(weights.mtp, start=1):
            ahead = tf.pad(tokens[:, depth:], [[0, 0], [0, depth]])
            x = mtp_input(mtp_embedding(module.embed, ahead, positions, self.options), state, module, self.config,
                          self.options)
            y, experts = self.program._block(x, module.block, None, cos, sin, mask, store)
            normed, logits = mtp_head(y, module, self.config)
            valid = length - depth - 1
            if valid > 0:
                losses = cross_entropy(logits[:, :valid], tokens[:, depth + 1:])
                denominator = batch * (valid if self.options.loss_normalization == "valid" else length)
                total += tf.reduce_sum(losses) / denominator
            if experts is not None:
                chosen.append(experts)
            state = chained(y, normed, self.options)
        return (mtp_loss_scale(self.settings.mtp_weight, len(weights.mtp)) * total if weights.mtp else total), chosen

    # -- the step --------------------------------------------------------------------------------------------

    def _step(self, tokens: tf.Tensor, learning_rate: tf.Tensor, step: tf.Tensor):
        settings = self.settings
        with tf.GradientTape() as tape:
            values = [tf.identity(v) for v in self.variables]
            for value in values:
                tape.watch(value)
            parts = self.losses(values, tokens)
            total = parts["main"] + parts["mtp"] + parts["balance"]
        grads = gradients(tape, total, values, self.variables)
        clipped, norm = tf.clip_by_global_norm(grads, settings.clip_norm)
        step = tf.cast(step, tf.float32)
        for variable, grad, m, v in zip(self.variables, clipped, self.m, self.v):
            m.assign(settings.beta1 * m + (1 - settings.beta1) * grad)
            v.assign(settings.beta2 * v + (1 - settings.beta2) * grad * grad)
            m_hat = m / (1 - settings.beta1 ** step)
            v_hat = v / (1 - settings.beta2 ** step)
            variable.assign_sub(learning_rate * (m_hat / (tf.sqrt(v_hat) + settings.epsilon)
                                                 + settings.weight_decay * variable))
        loads = [tf.math.unsorted_segment_sum(tf.ones_like(tf.reshape(e, [-1])), tf.reshape(e, [-1]),
                                              self.config.n_routed_experts) for e in parts["experts"]]
        if settings.uses_bias:
            for bias, load in zip(self.biases, loads):
                bias.assign(bias_update(bias, load, settings.bias_gamma))
        spanned = tf.reduce_max(tf.stack([groups_spanned(e, self.config) for e in parts["experts"]])) \
            if parts["experts"] else tf.constant(0)
        return {"main": parts["main"], "mtp": parts["mtp"], "balance": parts["balance"], "grad_norm": norm,
                "gradients": grads,
                "loads": tf.stack(loads) if loads else tf.zeros([0, self.config.n_routed_experts], tf.int32),
                "groups_spanned": spanned}

    def restart(self, weights: ModelWeights) -> None:
        """Start again from `weights` (the same config) with zero moments at step 0, keeping the compiled step: a
        run from another seed compiles nothing."""
        for variable, value in zip(leaves(self.tree), leaves(_variable_tree(weights))):
            if isinstance(variable, tf.Variable):
                variable.assign(value)
        for moment in self.m + self.v:
            moment.assign(tf.zeros_like(moment))
        self.steps = 0

    def step(self, tokens: np.ndarray) -> dict:
        """One training step on tokens [B, S]; asserts node-limited routing (at most topk_group groups per
        token) on its routing; returns numbers (loads per MoE block [blocks, E])."""
        self.steps += 1
        learning_rate = learning_rate_at(self.settings, self.steps)
        out = self._compiled(tf.constant(tokens, tf.int32), tf.constant(learning_rate, tf.float32),
                             tf.constant(self.steps, tf.int32))
        result = {key: value.numpy() for key, value in out.items() if key != "gradients"}
        result["gradients"] = [g.numpy() for g in out["gradients"]]
        if result["groups_spanned"] > self.config.n_limited_groups:
            raise AssertionError(f"step {self.steps}: a token's experts span {int(result['groups_spanned'])} groups, "
                                 f"more than topk_group={self.config.n_limited_groups}")
        result["learning_rate"] = learning_rate
        return result

    def weights(self) -> dict[int, np.ndarray]:
        """Every trainable variable's value, by position in `variables`."""
        return {i: v.numpy() for i, v in enumerate(self.variables)}

    def gradient_tree(self, grads: list[np.ndarray]) -> ModelWeights:
        """Gradients (one per variable, as `step` returns them) in the format layer's tree (experts split, the
        gate biases and the MTP modules' shared embedding and head as zeros)."""
        slot = {id(variable): grad for variable, grad in zip(self.variables, grads)}
        values = [slot.get(id(leaf), np.zeros(leaf.shape, np.float32)) for leaf in leaves(self.tree)]
        return _exported(rebuild(self.structure, iter(tf.constant(v) for v in values)))


def _exported(tree):
    """A master tree back in the format layer's shapes (NumPy float32; stacked experts split again)."""
    if tree is None:
        return None
    if isinstance(tree, (tf.Variable, tf.Tensor)):
        return tree.numpy()
    if isinstance(tree, tuple):
        return tuple(_exported(item) for item in tree)
    if isinstance(tree, StackedMoE):
        stacks = [tree.experts.gate_proj.weight.numpy(), tree.experts.up_proj.weight.numpy(),
                  tree.experts.down_proj.weight.numpy()]
        experts = tuple(FFNWeights(*(LinearWeight(stack[e]) for stack in stacks)) for e in range(len(stacks[0])))
        gate = GateWeights(tree.gate.weight.numpy(), None if tree.gate.bias is None else tree.gate.bias.numpy())
        return MoEWeights(gate, experts, _exported(tree.shared))
    return type(tree)(**{f.name: _exported(getattr(tree, f.name)) for f in dataclasses.fields(tree)})


def export(trainer: Trainer) -> ModelWeights:
    """The trainer's current weights as a ModelWeights tree (the MTP modules' embedding and head: copies)."""
    return _exported(trainer.tree)
