"""The TensorFlow model: compiled steps over preallocated latent caches.

Weights become TensorFlow variables in the compute dtype (float32 or bfloat16); fp8 weights stay e4m3
with their float32 block scales and are dequantized inside the step. The router and its bias stay
float32. Decode, verify and MTP steps are XLA-compiled; a decode step takes its position as a tensor, so a
whole generation runs one trace. The prefill is a TensorFlow graph outside XLA, since a prompt's experts
run fastest as ragged groups whose sizes depend on the routing (impl.moe.grouped_experts), and its attention
may take another form than the steps' (`prefill_form`). The caches hold as many positions as the caller asks
for (at most max_position_embeddings), and their size is checked against a memory budget before anything is
allocated.

Besides prefill and decode, the session runs the MTP modules over the positions they have not seen
(each depth with its own cache), and verifies drafted tokens in one compiled step: the next token and
the drafts are fed together, the model's own predictions and the accepted prefix are computed in the
same XLA call, and the rejected positions are rolled back (SEMANTICS.md section 4).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np
import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.inputs import InputError, check_tokens
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import (ExpertNotResident, FFNWeights, GateWeights, LinearWeight, ModelWeights,
                                             MoEWeights)

from . import attention, matvec
from .attention import LatentCache
from .bound import BoundStep
from .fp8 import E4M3
from .layers import head_logits, rms_norm, swiglu_ffn
from .moe import StackedMoE, moe
from .mtp import accepted_prefix, chained, mtp_embedding, mtp_head, mtp_input, mtp_source, tokens_ahead
from .rope import apply_rope, rotation_angles, softmax_scale
from .trees import leaves, rebuild, structure_of

Store = Callable[[LatentCache, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
# Largest latent cache (all layers) a runner allocates; a bigger request is refused before allocation.
CACHE_BUDGET_BYTES = 8 << 30
WINDOW_QUANTUM = 128  # the smallest attention window (positions); see attention_window


def _constant(array: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """A weight as a tensor, not a variable: a compiled step takes each weight as an argument, and TensorFlow's call
    looks up a variable's resource on every call, which a tensor spares. The tensor is the value of a variable made
    for it: tf.constant of a host array keeps two copies, a variable one."""
    return tf.Variable(tf.cast(tf.constant(array), dtype), trainable=False).read_value()


def _linear(weight: LinearWeight, dtype: tf.DType) -> LinearWeight:
    if weight.quantized:
        return LinearWeight(_constant(weight.weight, E4M3), _constant(weight.scale_inv, tf.float32))
    return LinearWeight(_constant(weight.weight, dtype))


def _stack_experts(experts: tuple[FFNWeights, ...], dtype: tf.DType) -> FFNWeights:
    """The experts' weights stacked per projection, [R, out, in], as constants: the host stack is freed once
    TensorFlow holds its copy (peak: two copies of one projection). An e4m3 stack is held as its bytes
    (impl.fp8.e4m3_values says why)."""
    def stacked(projection: str) -> LinearWeight:
        parts = [getattr(expert, projection) for expert in experts]
        weight = np.stack([p.weight for p in parts])
        if parts[0].quantized:
            return LinearWeight(tf.constant(weight.view(np.uint8)),
                                tf.constant(np.stack([p.scale_inv for p in parts]), tf.float32))
        return LinearWeight(tf.cast(tf.constant(weight), dtype))

    return FFNWeights(stacked("gate_proj"), stacked("up_proj"), stacked("down_proj"))


def _stacked_moe(weights: MoEWeights, dtype: tf.DType) -> StackedMoE:
    gate = GateWeights(_constant(weights.gate.weight, tf.float32),
                       None if weights.gate.bias is None else _constant(weights.gate.bias, tf.float32))
    resident = tuple(e for e, expert in enumerate(weights.experts) if expert is not None)
    if len(resident) == len(weights.experts):
        return StackedMoE(gate, _stack_experts(weights.experts, dtype), to_tf(weights.shared, dtype))
    if not resident:
        raise InputError("a MoE block with no resident routed expert")
    slots = np.zeros(len(weights.experts), np.int32)
    slots[list(resident)] = np.arange(len(resident))
    return StackedMoE(gate, _stack_experts(tuple(weights.experts[e] for e in resident), dtype),
                      to_tf(weights.shared, dtype), resident, tf.constant(slots))


def to_tf(weights, dtype: tf.DType):
    """The weight tree as TensorFlow tensors (see _constant), routed experts stacked."""
    if weights is None:
        return None
    if isinstance(weights, np.ndarray):
        return _constant(weights, dtype)
    if isinstance(weights, tuple):
        return tuple(to_tf(item, dtype) for item in weights)
    if isinstance(weights, LinearWeight):
        return _linear(weights, dtype)
    if isinstance(weights, MoEWeights):
        return _stacked_moe(weights, dtype)
    return type(weights)(**{f.name: to_tf(getattr(weights, f.name), dtype) for f in dataclasses.fields(weights)})


def _moe_blocks(weights: ModelWeights) -> list:
    """The main model's MoE blocks held here, in order (a step returns their chosen experts in this order)."""
    return [layer.ffn for layer in weights.layers if isinstance(layer.ffn, StackedMoE)]


def _partial_blocks(weights: ModelWeights) -> list:
    """The MoE blocks holding only some of their routed experts (next_logits returns the experts chosen in these)."""
    return [block for block in _moe_blocks(weights) if block.resident is not None]


def _check_resident(chosen: tuple[np.ndarray, ...], blocks: list) -> None:
    """Refuse a step that routed a token to an expert that is not resident (its output would be another's);
    chosen[i]: the experts chosen in the i-th of the blocks held here (StackedMoE)."""
    for experts, block in zip(chosen, [b for b in blocks if isinstance(b, StackedMoE)]):
        if block.resident is not None and not np.isin(experts, block.resident).all():
            missing = sorted(set(np.unique(experts).tolist()) - set(block.resident))
            raise ExpertNotResident(f"tokens route to expert(s) {missing[:8]}, which were not loaded")


def _on_mesh(weights: ModelWeights, expert_parallel, dtype: tf.DType) -> ModelWeights:
    """Every MoE block's weights placed for expert parallelism (routed experts sharded over the mesh)."""
    def place(layer):
        if isinstance(layer.ffn, StackedMoE):
            return dataclasses.replace(layer, ffn=expert_parallel.prepare(layer.ffn, dtype))
        return layer

    mtp = tuple(dataclasses.replace(module, block=place(module.block)) for module in weights.mtp)
    return dataclasses.replace(weights, layers=tuple(place(layer) for layer in weights.layers), mtp=mtp)


# A prompt attends (outside XLA, in the naive form) in this many query blocks, each against the keys up to its
# last query (impl.attention.naive_attention): 5/8 of the products of one block.
PROMPT_QUERY_BLOCKS = 4


class Program:
    """The XLA-compiled steps of one model structure (config, numerics, dtype, attention form, weight tree).

    Weights are arguments, not captured, so every session of the same structure shares these functions
    and their compilations: a second model of the same config compiles nothing.
    """

    def __init__(self, config: ModelConfig, numerics: Numerics, dtype: tf.DType, attention_form: AttentionForm,
                 structure, expert_parallel=None, logits: str = "all", prefill_form: AttentionForm | None = None,
                 trim_last_block: bool = False):
        self.config = config
        self.numerics = numerics
        self.dtype = dtype
        self.attention_form = attention_form
        self.structure = structure
        self.scale = softmax_scale(config)
        self.expert_parallel = expert_parallel
        self.logits = logits  # "all" positions, or the "last" one only (generation needs no more)
        self.prefill_form = attention_form if prefill_form is None else prefill_form
        self.trim_last_block = trim_last_block  # see Transformer
        if expert_parallel is None:
            def compiled(step):  # an inference step inside XLA: its few-row products may take the matvec kernel
                def traced(*args):
                    with matvec.kernel_scope():
                        return step(*args)
                return tf.function(traced, jit_compile=True, autograph=False)
            # The prefill is a graph but not XLA: XLA needs static shapes, and a prompt's experts are fastest
            # as ragged groups (impl.moe.grouped_experts); its large matmuls run as fast outside XLA.
            self.prefill = tf.function(self._prefill, autograph=False)
        else:  # the MoE blocks run on a DTensor mesh: the steps run eagerly around them, one op at a time
            def compiled(step):
                return step
            self.prefill = self._prefill
        self.decode = compiled(self._decode)
        self.next_logits = compiled(self._next_logits)
        self.verify = compiled(self._verify)
        self.mtp = compiled(self._mtp)

    def unflatten(self, leaves: list) -> ModelWeights:
        return rebuild(self.structure, iter(leaves))

    def _rope(self, positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        angles = rotation_angles(self.config, positions)
        return tf.cast(tf.cos(angles), tf.float32), tf.cast(tf.sin(angles), tf.float32)

    def _attention(self, layer, h: tf.Tensor, cache: LatentCache, cos: tf.Tensor, sin: tf.Tensor, mask: tf.Tensor,
                   store: Store, form: AttentionForm, query_blocks: int = 1,
                   last_only: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """h + attn(attn_norm(h)), and that normed by ffn_norm (the FFN's input). `last_only`: queries, and so
        both results, at the last position only; keys and cache entries still at every position."""
        config, numerics, weights = self.config, self.numerics, layer.attn
        x = rms_norm(h, layer.attn_norm, config.rms_norm_eps)
        queried, q_cos, q_sin = x, cos, sin
        if last_only:
            h, queried, q_cos, q_sin, mask = h[:, -1:], x[:, -1:], cos[-1:], sin[-1:], mask[-1:]
        q_nope, q_rope = attention.project_queries(queried, weights, config, numerics)
        q_rope = apply_rope(q_rope, q_cos[None, :, None], q_sin[None, :, None])
        kv_latent, rope_key = attention.project_latent(x, weights, config, numerics)
        keys_latent, keys_rope = store(cache, kv_latent, apply_rope(rope_key, cos[None], sin[None]))
        heads = attention.attend(q_nope, q_rope, keys_latent, keys_rope, weights, config, numerics, mask,
                                 self.scale, form, query_blocks)
        h = h + attention.output(heads, weights, numerics)
        return h, rms_norm(h, layer.ffn_norm, config.rms_norm_eps)

    def _block(self, h: tf.Tensor, layer, cache: LatentCache, cos: tf.Tensor, sin: tf.Tensor, mask: tf.Tensor,
               store: Store, gate_inputs: list | None = None, prefill: bool = False,
               last_only: bool = False) -> tuple[tf.Tensor, tf.Tensor | None]:
        """h + attn(attn_norm(h)), then + ffn(ffn_norm(.)); also the chosen experts of a MoE block, whose router
        input [T, dim] goes to `gate_inputs` when given (training's balance loss). `prefill`: the step runs
        outside XLA (Program), in the prefill's attention form, its MoE experts as ragged groups. `last_only`: the
        block's output (and chosen experts) at the last position only (see _attention)."""
        config, numerics = self.config, self.numerics
        form = self.prefill_form if prefill else self.attention_form
        h, x = self._attention(layer, h, cache, cos, sin, mask, store, form, PROMPT_QUERY_BLOCKS if prefill else 1,
                               last_only)
        if isinstance(layer.ffn, StackedMoE):
            flat_x = tf.reshape(x, [-1, config.dim])
            if gate_inputs is not None:
                gate_inputs.append(flat_x)
            flat, chosen = (moe(flat_x, layer.ffn, config, numerics, outside_xla=prefill)
                            if self.expert_parallel is None else self.expert_parallel(flat_x, layer.ffn))
            return h + tf.reshape(flat, h.shape), chosen
        return h + swiglu_ffn(x, layer.ffn, numerics, "dense_ffn"), None

    def _forward(self, weights: ModelWeights, tokens: tf.Tensor, positions: tf.Tensor, mask: tf.Tensor,
                 caches: tuple[LatentCache, ...], store: Store, gate_inputs: list | None = None,
                 prefill: bool = False):
        cos, sin = self._rope(positions)
        h = tf.gather(weights.embed, tokens)
        hidden, experts = [], []
        for index, (layer, cache) in enumerate(zip(weights.layers, caches)):
            last_only = prefill and self.trim_last_block and index == len(weights.layers) - 1
            h, chosen = self._block(h, layer, cache, cos, sin, mask, store, gate_inputs, prefill, last_only)
            hidden.append(h)
            if chosen is not None:
                experts.append(chosen)
        normed = rms_norm(h, weights.norm, self.config.rms_norm_eps)
        logits = head_logits(normed if self.logits == "all" else normed[:, -1:], weights.head)
        return tf.cast(logits, tf.float32), tuple(hidden), experts, mtp_source(h, normed)

    @staticmethod
    def _slots(start: tf.Tensor, batch: int, count: int) -> tf.Tensor:
        """(sequence, position) of `count` positions from `start` for every sequence: [batch * count, 2]."""
        rows = tf.repeat(tf.range(batch), count)
        return tf.stack([rows, tf.tile(start + tf.range(count), [batch])], axis=1)

    @staticmethod
    def _writer(slots: tf.Tensor, capacity: int) -> Store:
        """Writes the entries of the (sequence, position) `slots` into a cache of `capacity` positions; the keys
        returned are every sequence's whole cache (the attention looks at the first positions its mask covers)."""
        rows = slots[:, 0] * capacity + slots[:, 1]

        def store(cache: LatentCache, kv_latent: tf.Tensor, rope_key: tf.Tensor):
            return cache.write(rows, kv_latent, rope_key)
        return store

    def _prefill(self, leaves: list, tokens: tf.Tensor, caches: tuple[LatentCache, ...], history: tf.Variable):
        length = tokens.shape[1]
        padding = [[0, 0], [0, history.shape[1] - length], [0, 0]]

        def store(cache: LatentCache, kv_latent: tf.Tensor, rope_key: tf.Tensor):
            cache.fill(tf.pad(kv_latent, padding), tf.pad(rope_key, padding))
            return kv_latent, rope_key

        logits, hidden, experts, source = self._forward(self.unflatten(leaves), tokens, tf.range(length),
                                                        attention.causal_mask(0, length, length), caches, store,
                                                        prefill=True)
        if not self.trim_last_block:  # trimmed, a model has no MTP modules to read the history
            history.assign(tf.pad(source, padding))
        return logits, hidden, experts

    def _decode(self, leaves: list, tokens: tf.Tensor, position: tf.Tensor, window: int,
                caches: tuple[LatentCache, ...], history: tf.Variable):
        """Feed tokens [B, q] at positions position.. over the cache's first `window` positions (every filled one)."""
        batch, count = tokens.shape
        slots = self._slots(position, batch, count)
        mask = attention.causal_mask(position, count, window)
        logits, hidden, experts, source = self._forward(self.unflatten(leaves), tokens, position + tf.range(count), mask,
                                                        caches, self._writer(slots, history.shape[1]))
        history.scatter_nd_update(slots, tf.reshape(source, [-1, source.shape[-1]]))
        return logits, hidden, experts

    def _next_logits(self, leaves: list, tokens: tf.Tensor, position: tf.Tensor, window: int,
                     caches: tuple[LatentCache, ...], history: tf.Variable):
        """_decode for generation: the logits, and the experts chosen in the blocks that hold only some of theirs
        (in the order of _partial_blocks; the host refuses a token routed to a missing one); no block outputs."""
        logits, _, experts = self._decode(leaves, tokens, position, window, caches, history)
        return logits, tuple(chosen for chosen, partial in zip(experts, _moe_blocks(self.unflatten(leaves)))
                             if partial.resident is not None)

    def _verify(self, leaves: list, tokens: tf.Tensor, position: tf.Tensor, window: int,
                caches: tuple[LatentCache, ...], history: tf.Variable):
        """Decode [next, drafts...] and, in the same step, the model's predictions and the accepted prefix."""
        logits, _, _ = self._decode(leaves, tokens, position, window, caches, history)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return predicted, accepted_prefix(tokens[:, 1:], predicted[:, :-1])

    def _mtp(self, leaves: list, stream: tf.Tensor, start: tf.Tensor, count: int, options: MTPOptions,
             caches: tuple[LatentCache, ...], history: tf.Variable):
        """Every depth over `count` positions start..; stream [B, w] = t(start), t(start+1), ... (drafts fill the
        rest)."""
        positions = start + tf.range(count)
        cos, sin = self._rope(positions)
        mask = attention.causal_mask(start, count, history.shape[1])
        store = self._writer(self._slots(start, stream.shape[0], count), history.shape[1])
        state = tf.gather(history, positions, axis=1)
        hidden, logits, experts, drafts = [], [], [], []
        for depth, (module, cache) in enumerate(zip(self.unflatten(leaves).mtp, caches), start=1):
            tokens = tokens_ahead(stream, depth, count)
            if tokens.shape[1] < count:
                tokens = tf.concat([tokens, tf.stack(drafts, axis=1)[:, : count - tokens.shape[1]]], axis=1)
            x = mtp_input(mtp_embedding(module.embed, tokens, positions, options), state, module, self.config,
                          options)
            y, chosen = self._block(x, module.block, cache, cos, sin, mask, store)
            normed, depth_logits = mtp_head(y, module, self.config)
            hidden.append(tf.cast(y, tf.float32))
            logits.append(depth_logits)
            experts.append(chosen)
            drafts.append(tf.argmax(depth_logits[:, -1], axis=-1, output_type=tf.int32))
            state = chained(y, normed, options)
        return hidden, logits, experts, tf.stack(drafts, axis=1)


def attention_window(needed: int, capacity: int) -> int:
    """How many of the cache's `capacity` positions a step attends over when the first `needed` are filled:
    `needed` rounded up to a multiple of half its power of two (WINDOW_QUANTUM at least), so that a step reads at
    most half again the filled positions and a sequence compiles two windows per doubling of its length (each
    window a compilation of its own). Attending over the whole capacity would make a step's cost grow with the
    capacity asked for rather than with the sequence (benchmarks/results/window.md)."""
    if needed <= WINDOW_QUANTUM:
        return min(capacity, WINDOW_QUANTUM)
    half_octave = 2 ** (needed.bit_length() - 2)
    return min(capacity, -(-needed // half_octave) * half_octave)


@functools.lru_cache(maxsize=32)
def program(config: ModelConfig, numerics: Numerics, dtype: tf.DType, attention_form: AttentionForm,
            structure, expert_parallel=None, logits: str = "all", prefill_form: AttentionForm | None = None,
            trim_last_block: bool = False) -> Program:
    """The shared compiled steps of a model structure (planting a mutant clears this cache: conformance.mutation)."""
    return Program(config, numerics, dtype, attention_form, structure, expert_parallel, logits, prefill_form,
                   trim_last_block)


class Transformer:
    """DeepSeek-V3 in TensorFlow, holding one batch's state: caches, the tokens fed, the normed outputs."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                 dtype: str = "float32", attention_form: AttentionForm = "absorbed", expert_mesh=None,
                 logits: str = "all", prefill_form: AttentionForm | None = None, trim_last_block: bool = False):
        """`expert_mesh` (impl.expert_parallel.ExpertMesh): run every MoE block expert-parallel over its devices;
        `logits`: "all" positions' logits, or the "last" one only (prefill for generation); `prefill_form`: the
        prefill's attention form when it differs from the other steps' (serving engines expand the latents for
        a long prompt, the naive form, and decode in the absorbed form, which reads the latent cache only);
        `trim_last_block` (with logits "last", for a model without MTP modules, which read every position's final
        state): the prefill computes what the last logits and the caches need, no more: the last block's queries,
        attention output and FFN at the last position only (its keys and cache entries at every position), so
        the prefill's block outputs and chosen experts of that block cover the last position only."""
        if trim_last_block and (logits != "last" or weights.mtp):
            raise ValueError("trim_last_block needs logits='last' and a model without MTP modules")
        self.config = config
        self.dtype = tf.as_dtype(dtype)
        self.weights = to_tf(weights, self.dtype)
        expert_parallel = None
        if expert_mesh is not None:
            from .expert_parallel import ExpertParallelMoE

            expert_parallel = ExpertParallelMoE(expert_mesh, config, numerics)
            self.weights = _on_mesh(self.weights, expert_parallel, self.dtype)
        self.leaves = leaves(self.weights)
        self.program = program(config, numerics, self.dtype, attention_form, structure_of(self.weights),
                               expert_parallel, logits, prefill_form, trim_last_block)
        self.caches: tuple[LatentCache, ...] = ()
        self.mtp_caches: tuple[LatentCache, ...] = ()
        self.history: tf.Variable | None = None  # the main model's state for the MTP modules [B, capacity, dim]
        self.tokens = np.zeros((0, 0), np.int64)  # every token fed to the main model, on the host
        self.mtp_length = 0
        self._bound: dict = {}  # the bound step per (step, argument shapes), for the current caches

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def _numpy(self, result) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        logits, hidden, experts = result
        experts = tuple(e.numpy() for e in experts)
        _check_resident(experts, _moe_blocks(self.weights))
        return logits.numpy(), tuple(tf.cast(h, tf.float32).numpy() for h in hidden), experts

    def _reserve(self, batch: int, capacity: int) -> None:
        """Caches for `batch` sequences of up to `capacity` positions (kept when they already fit exactly)."""
        if self.history is not None and tuple(self.history.shape[:2]) == (batch, capacity):
            return
        layers = len(self.weights.layers) + len(self.weights.mtp)
        per_position = (self.config.kv_lora_rank + self.config.qk_rope_head_dim + self.config.dim) * self.dtype.size
        needed = layers * batch * capacity * per_position
        if needed > CACHE_BUDGET_BYTES:
            raise InputError(f"caches for {batch} sequence(s) of {capacity} positions need {needed:,} bytes, more "
                             f"than the budget of {CACHE_BUDGET_BYTES:,}: lower max_position_embeddings or the "
                             "positions asked for")
        self.caches = self.mtp_caches = ()
        self._bound = {}
        self.caches = tuple(LatentCache.allocate(self.config, batch, self.dtype, capacity) for _ in self.weights.layers)
        self.mtp_caches = tuple(LatentCache.allocate(self.config, batch, self.dtype, capacity)
                                for _ in self.weights.mtp)
        self.history = tf.Variable(tf.zeros([batch, capacity, self.config.dim], self.dtype), trainable=False)

    def _step(self, name: str, *args):
        """Run a compiled step on this model's weights, caches and history, bound once per (step, argument shapes)
        (impl.bound: binding every weight on every call costs milliseconds of Python a decode step)."""
        caches = self.mtp_caches if name == "mtp" else self.caches
        step = getattr(self.program, name)
        if not hasattr(step, "get_concrete_function"):  # expert parallel: the steps run eagerly
            return step(self.leaves, *args, caches, self.history)
        key = (name, *(tuple(a.shape) if isinstance(a, tf.Tensor) else a for a in args))
        if key not in self._bound:
            self._bound[key] = BoundStep(step, (self.leaves, *args, caches, self.history), args)
        return self._bound[key](args)

    @property
    def capacity(self) -> int:
        return self.history.shape[1] if self.history is not None else 0

    def prefill(self, tokens: np.ndarray, capacity: int | None = None):
        """Logits [B,S,V], block outputs, chosen experts per MoE block; the caches then hold the prompt.

        `capacity`: positions the caches must hold in all (prompt and later steps); default
        max_position_embeddings.
        """
        tokens = check_tokens(tokens, self.config)
        capacity = self.config.max_seq_len if capacity is None else capacity
        if not tokens.shape[1] <= capacity <= self.config.max_seq_len:
            raise InputError(f"cache capacity {capacity} must lie between the prompt length {tokens.shape[1]} and "
                             f"max_position_embeddings={self.config.max_seq_len}")
        self._reserve(tokens.shape[0], capacity)
        self.tokens, self.mtp_length = tokens, 0
        return self._numpy(self._step("prefill", tf.constant(tokens, tf.int32)))

    def _check_next(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens [B, q] to feed after the cached ones, checked against the batch and the capacity."""
        if not self.caches:
            raise InputError("decode called before prefill")
        tokens = np.asarray(tokens)
        tokens = check_tokens(tokens.reshape(len(tokens), -1), self.config, self.length)
        if tokens.shape[0] != self.history.shape[0]:
            raise InputError(f"got {tokens.shape[0]} sequences, the cache holds {self.history.shape[0]}")
        if self.length + tokens.shape[1] > self.capacity:
            raise InputError(f"the cache holds {self.capacity} positions: prefill with a larger capacity")
        return tokens

    def _window(self, count: int) -> int:
        """The cache positions a step feeding `count` tokens attends over (see attention_window)."""
        return attention_window(self.length + count, self.capacity)

    def _feed(self, step: str, tokens: np.ndarray):
        """Run `step` ("decode" or "next_logits") on tokens [B] or [B, q] at the next positions; they are fed."""
        tokens = self._check_next(tokens)
        result = self._step(step, tf.constant(tokens, tf.int32), tf.constant(self.length, tf.int32),
                            self._window(tokens.shape[1]))
        self.tokens = np.concatenate([self.tokens, tokens], axis=1)
        return result

    def decode(self, tokens: np.ndarray):
        """Feed one token per sequence [B] (or q of them, [B, q]) at the next positions."""
        return self._numpy(self._feed("decode", tokens))

    def next_logits(self, tokens: np.ndarray) -> np.ndarray:
        """decode for generation: the logits [B, q, V] only. The block outputs and chosen experts stay inside the
        step: fewer outputs to hand back and convert. A token routed to an expert that is not loaded is refused as in
        decode."""
        logits, experts = self._feed("next_logits", tokens)
        _check_resident(tuple(e.numpy() for e in experts), _partial_blocks(self.weights))
        return logits.numpy()

    def mtp(self, following: np.ndarray, options: MTPOptions = MTPOptions()):
        """The MTP depths over the positions they have not seen; following [B, j] the tokens after the last
        fed one. Returns per depth hidden [B,n,dim] and logits [B,n,V], the experts, and the drafts [B, D]."""
        if not self.weights.mtp:
            raise InputError("this config has no MTP module (num_nextn_predict_layers is 0)")
        if self.mtp_length == self.length:
            raise InputError("the MTP modules have seen every position: feed the main model first")
        following = check_tokens(np.asarray(following).reshape(self.tokens.shape[0], -1), self.config, self.length)
        stream = np.concatenate([self.tokens[:, self.mtp_length:], following], axis=1)
        hidden, logits, experts, drafts = self._step("mtp", tf.constant(stream, tf.int32),
                                                     tf.constant(self.mtp_length, tf.int32),
                                                     self.length - self.mtp_length, options)
        # An entry computed from a draft token is recomputed once that token is known.
        self.mtp_length = self.length if following.shape[1] >= len(self.weights.mtp) else self.length - 1
        experts = tuple(e.numpy() for e in experts)
        _check_resident(experts, [module.block.ffn for module in self.weights.mtp])
        return (tuple(h.numpy() for h in hidden), tuple(l.numpy() for l in logits), experts, drafts.numpy())

    def verify(self, following: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, int]:
        """Feed the next token and the drafts in one compiled step; keep the accepted ones (see the module)."""
        if self.program.logits != "all":
            raise InputError("verifying drafts needs the logits of every position: build with logits='all'")
        length = self.length
        fed = self._check_next(np.concatenate([np.asarray(following).reshape(-1, 1), drafts], axis=1))
        predicted, accepted = self._step("verify", tf.constant(fed, tf.int32), tf.constant(length, tf.int32),
                                         self._window(fed.shape[1]))
        predicted, accepted = predicted.numpy(), int(accepted)
        self.tokens = np.concatenate([self.tokens, fed], axis=1)
        self.truncate(length + accepted + 1)
        return np.concatenate([drafts[:, :accepted], predicted[:, accepted:accepted + 1]], axis=1), accepted

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on: later steps overwrite those cache slots, and the masks
        never show a slot at or beyond the current length."""
        self.tokens = self.tokens[:, :length]
        self.mtp_length = min(self.mtp_length, length)

    def cache_bytes_per_token_per_layer(self) -> int:
        """Measured from the allocated cache tensors of one layer."""
        if not self.caches:
            raise InputError("no cache allocated yet: run prefill first")
        return self.caches[0].bytes_per_token()
