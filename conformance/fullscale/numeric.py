"""Numeric verification of a checkpoint layer by layer, in bounded memory.

For each chosen layer the layer's tensors alone are read; for a MoE layer only the routed experts its tokens
can route to: the float64 reference computes the layer's routing on the input hidden states first (its
top-k, and the experts in a near tie with the k-th, which a float32 backend may pick instead), then exactly
those experts are loaded. Each backend runs the block on the same input hidden states, two sequences at
once (a backend that damages one sequence of a batch is seen), and is judged in two steps:
- routing: every token whose experts differ from the reference's must be a near tie, a group-limited top-k
  of the float64 choice scores read with the slack of `routing.margin.<dtype>`; any other is misrouted and
  fails the layer (a wrong group limit, a wrong choice), as does a token routed to an expert outside the
  candidates (then its weights were never loaded);
- numerics: the block output against the reference's, the reference forced to the backend's expert choices
  where they differ (near ties move a token by O(1) legitimately), under the policy's cross entry.
A layer a backend cannot run (`Unsupported`) is not compared: the verdict is then INCOMPLETE, never PASSED.
The transformers oracle joins with `oracle=True` where every expert of a layer is resident.

A block runs through each backend's ordinary runner, as a one-block model whose embedding table holds the
input hidden states [B*T, dim] and whose tokens are their row numbers: the block sees exactly those states
at positions 0..T-1 of each sequence. Input hidden states of layer k come from streaming the reference
through the layers below k (from the embedding of seeded random tokens), or, with `random_hidden`, from a
seeded draw. The MTP layer (index num_hidden_layers + d) runs through each backend's own MTP modules
(`Runner.mtp`): a model whose one main block adds nothing (zero output projections) feeds the module the
main stream's state, which the module's own hnorm, enorm, eh_proj, block and shared head then process; its
embedding and head hold the rows of the stream's real tokens. Peak resident memory is measured per layer
(the kernel's high-water mark, reset before each layer).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.backends import REFERENCE, Backend, Unsupported, resolve_backend
from dsv3_conformance.checks.routing import misrouted
from dsv3_conformance.format.checkpoint import Checkpoint, load_layer, load_mtp, load_tensor
from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.fp8 import scale_shape
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.weights import (AttentionWeights, ExpertNotResident, FFNWeights, LayerWeights,
                                             LinearWeight, ModelWeights, MoEWeights, MTPWeights, TensorSpec,
                                             tree_nbytes)
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.verdict import FAILED, INCOMPLETE, PASSED, Missing, allowed

# Experts resident beyond a token's top-k: those whose choice score is within this of the k-th (a float32
# backend may break such a near tie the other way; float32 rounds scores near 1 by 6e-8).
NEAR_TIE = 1e-5
SEQUENCES = 2


def reset_peak() -> None:
    """Reset the kernel's resident-set high-water mark of this process (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def give_back_memory(checkpoint: Checkpoint) -> None:
    """Return what a step freed to the kernel: the checkpoint's mapped pages, and the C heap's free memory
    (glibc keeps freed blocks otherwise, and the next layer's peak would start from this one's)."""
    import ctypes

    checkpoint.release()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_gib() -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match[1]) / 2**20 if match else float("nan")


@dataclass
class LayerRow:
    layer: int
    kind: str
    experts_loaded: str = "-"
    bytes_read: int = 0
    seconds: float = 0.0
    peak_gib: float = 0.0
    results: dict[str, str] = field(default_factory=dict)  # backend -> what was measured
    failed: list[str] = field(default_factory=list)  # backends that failed this layer
    missing: list[Missing] = field(default_factory=list)
    compared: int = 0  # backends (and the oracle) that ran this layer

    def status(self, allow: tuple[str, ...] = ()) -> str:
        if self.failed:
            return FAILED
        return INCOMPLETE if any(not allowed(m, allow) for m in self.missing) else PASSED

    def row(self, allow: tuple[str, ...] = ()) -> dict:
        return {"layer": self.layer, "kind": self.kind, "experts loaded": self.experts_loaded,
                "bytes read": f"{self.bytes_read / 2**20:,.0f} MiB", **self.results,
                "seconds": f"{self.seconds:.1f}", "peak resident": f"{self.peak_gib:.2f} GiB",
                "status": {PASSED: "pass", FAILED: "FAIL", INCOMPLETE: "not compared"}[self.status(allow)]}


def _float64(tree):
    from dsv3_conformance.format.weights import map_arrays

    return map_arrays(tree, lambda a: a if a.dtype.itemsize == 1 else a.astype(np.float64))


def routing_scores(layer: LayerWeights, hidden: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The float64 choice scores (s + bias) [B*T, E] of the MoE block `layer` for input hidden states [B, T, dim],
    computed by the reference."""
    from dsv3_conformance.reference.attention import LatentCache, mla
    from dsv3_conformance.reference.moe import affinities
    from dsv3_conformance.reference.norm import rms_norm

    x = hidden.astype(np.float64)
    cache = LatentCache.allocate(config, len(x), np.float64)
    attended, _ = mla(rms_norm(x, layer.attn_norm.astype(np.float64), config.rms_norm_eps), _float64(layer.attn),
                      config, Numerics(), cache, 0, "absorbed")
    normed = rms_norm(x + attended, layer.ffn_norm.astype(np.float64), config.rms_norm_eps).reshape(-1, config.dim)
    gate = _float64(layer.ffn.gate)
    scores = affinities(normed, gate, config)
    return scores if gate.bias is None else scores + gate.bias


def candidate_experts(choice: np.ndarray, config: ModelConfig) -> set[int]:
    """The experts tokens may route to given their choice scores [N, E]: each token's top k inside its kept groups,
    and any expert within NEAR_TIE of its k-th choice score."""
    from dsv3_conformance.reference.moe import limit_to_groups

    limited = limit_to_groups(choice, config)
    kth = -np.sort(-limited, axis=-1)[:, config.n_activated_experts - 1: config.n_activated_experts]
    return {int(e) for e in np.nonzero(limited >= kth - NEAR_TIE)[1]}


def block_model(config: ModelConfig, layer: LayerWeights, hidden: np.ndarray) -> tuple[ModelConfig, ModelWeights]:
    """A one-block model whose embedding holds `hidden` [B, T, dim]: token b*T + t feeds exactly state [b, t]."""
    moe = isinstance(layer.ffn, MoEWeights)
    rows = hidden.shape[0] * hidden.shape[1]
    one = config.replace(n_layers=1, n_dense_layers=0 if moe else 1, n_mtp_layers=0, vocab_size=rows,
                         name=f"{config.name} block")
    head = np.zeros((rows, config.dim), np.float32)
    return one, ModelWeights(embed=np.asarray(hidden).reshape(rows, -1), layers=(layer,),
                             norm=np.ones(config.dim, np.float32), head=head)


def _ids(hidden: np.ndarray) -> np.ndarray:
    return np.arange(hidden.shape[0] * hidden.shape[1]).reshape(hidden.shape[:2])


def run_block(backend: Backend, config: ModelConfig, layer: LayerWeights, hidden: np.ndarray,
              forced: np.ndarray | None = None, checkpoint: Checkpoint | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The block's output [B, T, dim] on `backend`, and the experts it chose [B*T, k]; `checkpoint`'s pages are given
    back once the backend has built its own copy of the weights."""
    one, weights = block_model(config, layer, hidden)
    runner = backend.make_runner(one, weights)
    if checkpoint is not None:
        give_back_memory(checkpoint)
    output = runner.prefill(_ids(hidden), [forced] if forced is not None else None, capacity=hidden.shape[1])
    if output.hidden is None:
        raise Unsupported(f"backend {backend.name} gives no block outputs", "hidden")
    return np.asarray(output.hidden[0], np.float64), (output.experts[0] if output.experts else None)


# --- the MTP layer, through each backend's own MTP modules ------------------------------------------------------

def _zeros(config: ModelConfig, rows: int, columns: int) -> LinearWeight:
    if config.fp8_weights:
        return LinearWeight(np.zeros((rows, columns), ml_dtypes.float8_e4m3fn),
                            np.ones(scale_shape((rows, columns)), np.float32))
    return LinearWeight(np.zeros((rows, columns), np.float32))


def _pass_through_layer(config: ModelConfig) -> LayerWeights:
    """A dense block that adds nothing: its output projections are zero, so out = x exactly."""
    c = config
    q_out = c.n_heads * c.qk_head_dim
    ones = np.ones
    attention = AttentionWeights(
        q_proj=None if c.q_lora_rank else _zeros(c, q_out, c.dim),
        q_a_proj=_zeros(c, c.q_lora_rank, c.dim) if c.q_lora_rank else None,
        q_a_norm=ones(c.q_lora_rank, np.float32) if c.q_lora_rank else None,
        q_b_proj=_zeros(c, q_out, c.q_lora_rank) if c.q_lora_rank else None,
        kv_a_proj=_zeros(c, c.kv_lora_rank + c.qk_rope_head_dim, c.dim), kv_a_norm=ones(c.kv_lora_rank, np.float32),
        kv_b_proj=_zeros(c, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        o_proj=_zeros(c, c.dim, c.n_heads * c.v_head_dim))
    ffn = FFNWeights(_zeros(c, c.inter_dim, c.dim), _zeros(c, c.inter_dim, c.dim), _zeros(c, c.dim, c.inter_dim))
    return LayerWeights(ones(c.dim, np.float32), attention, ones(c.dim, np.float32), ffn)


def mtp_model(config: ModelConfig, module: MTPWeights, main_norm: np.ndarray, hidden: np.ndarray,
              stream: np.ndarray) -> tuple[ModelConfig, ModelWeights, np.ndarray]:
    """A model whose MTP module is `module` and whose main model hands it rms_norm(hidden) * main_norm at every
    position: the main embedding holds `hidden` [B, T, dim] (token b*T + t), its one block adds nothing. The module's
    embedding and head hold the rows of the real tokens `stream` [B, T+1]: module token j = b*T + t (t >= 1) is the
    real t(b, t), and (b+1)*T the real t(b, T) after sequence b. Returns the config, the weights and the tokens
    following each sequence [B, 1]."""
    batch, length = hidden.shape[:2]
    rows = batch * length + 1
    real = np.zeros(rows, np.int64)
    for b in range(batch):
        real[b * length + 1: (b + 1) * length] = stream[b, 1:length]
        real[(b + 1) * length] = stream[b, length]
    one = config.replace(n_layers=1, n_dense_layers=1, n_mtp_layers=1, vocab_size=rows, name=f"{config.name} MTP")
    embed = np.zeros((rows, config.dim), np.float32)
    embed[: batch * length] = hidden.reshape(batch * length, -1)
    module = MTPWeights(module.enorm, module.hnorm, module.eh_proj, module.block, module.head_norm,
                        np.asarray(module.embed[real], np.float32), np.asarray(module.head[real], np.float32))
    weights = ModelWeights(embed=embed, layers=(_pass_through_layer(one),), norm=main_norm,
                           head=np.zeros((rows, config.dim), np.float32), mtp=(module,))
    following = ((np.arange(batch) + 1) * length)[:, None]
    return one, weights, following


def run_mtp(backend: Backend, model: tuple, forced: np.ndarray | None = None,
            checkpoint: Checkpoint | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The MTP module's block output [B, T, dim], its logits over the stream's tokens [B, T, B*T+1] and its chosen
    experts on `backend`."""
    config, weights, following = model
    runner = backend.make_runner(config, weights)
    if checkpoint is not None:
        give_back_memory(checkpoint)
    ids = np.arange(weights.embed.shape[0] - 1).reshape(len(following), -1)
    runner.prefill(ids, capacity=ids.shape[1] + 1)
    step = runner.mtp(following, forced_experts=[forced] if forced is not None else None)
    return (np.asarray(step.hidden[0], np.float64), np.asarray(step.logits[0], np.float64),
            step.experts[0] if step.experts and step.experts[0] is not None else None)


# --- one layer ---------------------------------------------------------------------------------------------------

def _margin(backend: Backend) -> float:
    return tolerance(f"routing.margin.{'float64' if backend.default_dtype == 'float64' else 'float32'}").value


def _policy(backend: Backend) -> str:
    return "self.float64" if backend.default_dtype == "float64" else "cross.float32"


@dataclass(frozen=True)
class Layer:
    """What every backend runs for one layer: `run(backend, forced)` -> outputs (each [B, T, .]) and experts."""

    run: object
    names: tuple[str, ...]  # what the outputs are
    choice: np.ndarray | None  # the reference's float64 choice scores [B*T, E] (MoE blocks)
    config: ModelConfig


def _judge(row: LayerRow, backend: Backend, layer: Layer, expected: tuple, expected_experts) -> None:
    name = backend.name
    try:
        *got, experts = layer.run(backend, None)
    except Unsupported as reason:
        row.results[name] = f"not run: {reason}"[:160]
        row.missing.append(Missing(f"layer {row.layer} on {name}", reason.part or "layers", str(reason)))
        return
    except ExpertNotResident as reason:  # routed outside the reference's choices and their near ties
        row.compared += 1
        row.results[name] = f"misrouted: {reason}"[:160]
        row.failed.append(name)
        return
    row.compared += 1
    notes, forced = [], None
    if experts is not None and expected_experts is not None:
        differ = np.flatnonzero((np.sort(experts, -1) != np.sort(expected_experts, -1)).any(-1))
        if differ.size:
            wrong = misrouted(layer.choice[differ], experts[differ], layer.config, _margin(backend))
            if wrong:
                token, why = next(iter(wrong.items()))
                row.results[name] = (f"misrouted: {len(wrong)} of {len(experts)} tokens (token {int(differ[token])}: "
                                     f"{why})")[:200]
                row.failed.append(name)
                return
            notes.append(f"{differ.size} near tie(s) routed differently, compared on its routing")
            forced = experts
    want = expected if forced is None else layer.run(REFERENCE, forced)[:-1]
    key = _policy(backend)
    errors = [rel_err(g, w) for g, w in zip(got, want)]
    passed = all(error <= tolerance(key).value for error in errors)  # NaN never passes
    measured = ", ".join(f"{what} rel_err {error:.2e}" for what, error in zip(layer.names, errors))
    row.results[name] = f"{measured} ({key} {tolerance(key).value:.0e})" + "".join(f"; {n}" for n in notes)
    if not passed:
        row.failed.append(name)


def _oracle(row: LayerRow, config: ModelConfig, weights: LayerWeights, hidden: np.ndarray, expected: np.ndarray,
            expected_experts: np.ndarray | None) -> None:
    def missing(reason: str) -> None:
        row.results["oracle"] = f"not run: {reason}"[:120]
        row.missing.append(Missing(f"layer {row.layer} on the oracle", "oracle", reason))

    if isinstance(weights.ffn, MoEWeights) and any(expert is None for expert in weights.ffn.experts):
        return missing("only some experts are resident")
    try:
        from dsv3_conformance.golden.oracle import OracleRunner, OracleUnavailable
    except ImportError as error:
        return missing(str(error))
    try:
        one, model = block_model(config, weights, hidden)
        forced = [expected_experts] if expected_experts is not None else None
        output = OracleRunner(one, model).prefill(_ids(hidden), forced)
    except (OracleUnavailable, Unsupported) as reason:
        return missing(str(reason))
    error = rel_err(np.asarray(output.hidden[0], np.float64), expected)
    row.compared += 1
    row.results["oracle"] = f"rel_err {error:.2e} (oracle.float32)"
    if not error <= tolerance("oracle.float32").value:
        row.failed.append("oracle")


def _mtp_input(module: MTPWeights, config: ModelConfig, normed: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """eh_proj([enorm(E[t+1]); hnorm(h)]) of an MTP module (reference, float64): the input of its block, from which
    the reference chooses the experts to load."""
    from dsv3_conformance.reference.norm import rms_norm

    embedding = np.asarray(module.embed[next_tokens], np.float64)
    joined = np.concatenate([rms_norm(embedding, module.enorm.astype(np.float64), config.rms_norm_eps),
                             rms_norm(normed, module.hnorm.astype(np.float64), config.rms_norm_eps)], axis=-1)
    return joined @ module.eh_proj.weight.astype(np.float64).T


def _load_mtp(checkpoint: Checkpoint, config: ModelConfig, layer: int, hidden: np.ndarray,
              stream: np.ndarray) -> tuple[Layer, MTPWeights, str]:
    """The MTP module stored as `layer`, its block with only the experts its tokens may route to."""
    from dsv3_conformance.reference.norm import rms_norm

    norm = load_tensor(checkpoint, config, TensorSpec("model.norm.weight", (config.dim,)))
    module = load_mtp(checkpoint, config, layer - config.n_layers, resident=(), check_finite=False)
    inputs = _mtp_input(module, config, rms_norm(hidden, norm.astype(np.float64), config.rms_norm_eps), stream[:, 1:])
    choice = routing_scores(module.block, inputs, config) if isinstance(module.block.ffn, MoEWeights) else None
    loaded = "-"
    if choice is not None:
        resident = candidate_experts(choice, config)
        module = dataclasses.replace(module, block=load_layer(checkpoint, config, layer, resident=resident))
        loaded = f"{len(resident)}/{config.n_routed_experts}"
    model = mtp_model(config, module, norm, hidden, stream)

    def run(backend: Backend, forced):
        return run_mtp(backend, model, forced, checkpoint)

    return Layer(run, ("hidden", "logits"), choice, config), module, loaded


def verify_layers(checkpoint: Checkpoint, config: ModelConfig, layers: list[int], tokens: int, backends: list[str],
                  random_hidden: bool = False, seed: int = 0, oracle: bool = False,
                  progress: bool = True) -> list[LayerRow]:
    """One row per chosen layer (module docstring); layers may include num_hidden_layers + d (MTP depth d + 1)."""
    chosen = sorted(set(layers))
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, config.vocab_size, (SEQUENCES, tokens + 1))
    others = [b for b in (resolve_backend(spec) for spec in backends) if b.name != REFERENCE.name]
    rows = []
    hidden = None
    last_main = min(max(chosen), config.n_layers - 1)
    walk = chosen if random_hidden else list(range(0, last_main + 1)) + [lay for lay in chosen if lay >= config.n_layers]
    for index in tqdm(walk, desc="layers", unit="layer", disable=not progress):
        reset_peak()
        start = time.perf_counter()
        if random_hidden or hidden is None:
            hidden = (rng.standard_normal((SEQUENCES, tokens, config.dim)) if random_hidden or index >= config.n_layers
                      else np.asarray(load_tensor(checkpoint, config, TensorSpec(
                          "model.embed_tokens.weight", (config.vocab_size, config.dim)),
                          check_finite=False)[stream[:, :-1]], np.float64))
        if index >= config.n_layers:
            layer, weights, loaded = _load_mtp(checkpoint, config, index, hidden, stream)
            kind = "MTP module"
        else:
            layer, weights, loaded = _load_main(checkpoint, config, index, hidden)
            kind = "MoE" if layer.choice is not None else "dense"
        row = LayerRow(index, kind, loaded, tree_nbytes(weights))
        *expected, expected_experts = layer.run(REFERENCE, None)
        give_back_memory(checkpoint)  # the pages the reference read, before a backend makes its own copy
        if index in chosen:
            for backend in others:
                _judge(row, backend, layer, tuple(expected), expected_experts)
                give_back_memory(checkpoint)
            if oracle and index < config.n_layers:
                _oracle(row, config, weights, hidden, expected[0], expected_experts)
        if index < config.n_layers:
            hidden = expected[0]
        del weights, layer
        for backend in others:  # this layer's one-block models never run again: their compiled programs go
            if backend.release is not None:
                backend.release()
        give_back_memory(checkpoint)
        row.seconds = time.perf_counter() - start
        row.peak_gib = peak_gib()
        if index in chosen:
            rows.append(row)
    return rows


def _load_main(checkpoint: Checkpoint, config: ModelConfig, index: int, hidden: np.ndarray) -> tuple[Layer, LayerWeights, str]:
    """Main layer `index`, with only the experts its tokens may route to when it is a MoE layer."""
    without = load_layer(checkpoint, config, index, resident=())
    choice = routing_scores(without, hidden, config) if isinstance(without.ffn, MoEWeights) else None
    if choice is None:
        weights, loaded = without, "-"
    else:
        resident = candidate_experts(choice, config)
        weights, loaded = load_layer(checkpoint, config, index, resident=resident), \
            f"{len(resident)}/{config.n_routed_experts}"

    def run(backend: Backend, forced):
        return run_block(backend, config, weights, hidden, forced, checkpoint)

    return Layer(run, ("block output",), choice, config), weights, loaded
