"""Numeric verification of a checkpoint layer by layer, in bounded memory.

For each chosen layer the layer's tensors alone are read; for a MoE layer only the routed experts its tokens
can route to: the float64 reference computes the layer's routing on the input hidden states first (its
top-k, and the experts in a near tie with the k-th, which a float32 backend may pick instead), then exactly
those experts are loaded. Each backend runs the block on the same input
hidden states and is compared with the reference under the policy: a backend that routes by itself is
compared with the reference forced to its choice (as the suite's cross checks do), and the tokens it routes
differently are counted. The transformers oracle's decoder layer joins where every expert is resident (it
would otherwise materialize all of them in float32).

A block runs through each backend's ordinary runner, as a one-block model whose embedding table holds the
input hidden states [T, dim] and whose tokens are 0..T-1: the block sees exactly those states at positions
0..T-1. Input hidden states of layer k come from streaming the reference through the layers below k (from
the embedding of seeded random tokens), or, with `random_hidden`, from a seeded draw. The MTP layer
(index num_hidden_layers) runs as its module does: its input projection eh_proj([enorm(E[t+1]);
hnorm(h)]) on the main stream's final-normed output, then its block. Peak resident memory is measured per
layer (the kernel's high-water mark, reset before each layer).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..backends import REFERENCE, Backend, Unsupported, resolve_backend
from ..format.checkpoint import Checkpoint, load_layer, load_tensor
from ..format.config import ModelConfig
from ..format.numerics import Numerics
from ..format.weights import (ExpertNotResident, LayerWeights, LinearWeight, ModelWeights, MoEWeights, TensorSpec,
                              tree_nbytes)
from ..metrics import rel_err
from ..tolerances import tolerance

# Experts resident beyond a token's top-k: those whose choice score is within this of the k-th (a float32
# backend may break such a near tie the other way; float32 rounds scores near 1 by 6e-8).
NEAR_TIE = 1e-5


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
    results: dict[str, str] = field(default_factory=dict)
    passed: bool = True

    def row(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "experts loaded": self.experts_loaded,
                "bytes read": f"{self.bytes_read / 2**20:,.0f} MiB", **self.results,
                "seconds": f"{self.seconds:.1f}", "peak resident": f"{self.peak_gib:.2f} GiB",
                "status": "pass" if self.passed else "FAIL"}


def candidate_experts(layer: LayerWeights, hidden: np.ndarray, config: ModelConfig) -> set[int]:
    """The experts the tokens of `hidden` [T, dim] may route to in `layer` (reference, float64): each token's
    top k inside its kept groups, and any expert within NEAR_TIE of its k-th choice score."""
    from reference.attention import LatentCache, mla
    from reference.moe import affinities, limit_to_groups
    from reference.norm import rms_norm

    x = hidden[None].astype(np.float64)
    cache = LatentCache.allocate(config, 1, np.float64)
    attended, _ = mla(rms_norm(x, layer.attn_norm.astype(np.float64), config.rms_norm_eps), _float64(layer.attn),
                      config, Numerics(), cache, 0, "absorbed")
    normed = rms_norm(x + attended, layer.ffn_norm.astype(np.float64), config.rms_norm_eps).reshape(-1, config.dim)
    gate = _float64(layer.ffn.gate)
    scores = affinities(normed, gate, config)
    limited = limit_to_groups(scores if gate.bias is None else scores + gate.bias, config)
    kth = -np.sort(-limited, axis=-1)[:, config.n_activated_experts - 1: config.n_activated_experts]
    return {int(e) for e in np.nonzero(limited >= kth - NEAR_TIE)[1]}


def _float64(tree):
    from ..format.weights import map_arrays

    return map_arrays(tree, lambda a: a if a.dtype.itemsize == 1 else a.astype(np.float64))


def block_model(config: ModelConfig, layer: LayerWeights, hidden: np.ndarray) -> tuple[ModelConfig, ModelWeights]:
    """A one-block model whose embedding holds `hidden` [T, dim]: tokens 0..T-1 feed exactly those states."""
    moe = isinstance(layer.ffn, MoEWeights)
    tokens = hidden.shape[0]
    one = config.replace(n_layers=1, n_dense_layers=0 if moe else 1, n_mtp_layers=0, vocab_size=tokens,
                         name=f"{config.name} block")
    head = np.zeros((tokens, config.dim), np.float32)
    return one, ModelWeights(embed=np.asarray(hidden), layers=(layer,), norm=np.ones(config.dim, np.float32),
                             head=head)


def run_block(backend: Backend, config: ModelConfig, layer: LayerWeights, hidden: np.ndarray,
              forced: np.ndarray | None = None, checkpoint: Checkpoint | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The block's output [T, dim] on `backend`, and the experts it chose; `checkpoint`'s pages are given back
    once the backend has built its own copy of the weights."""
    one, weights = block_model(config, layer, hidden)
    runner = backend.make_runner(one, weights)
    if checkpoint is not None:
        give_back_memory(checkpoint)
    output = runner.prefill(np.arange(hidden.shape[0])[None], [forced] if forced is not None else None,
                            capacity=hidden.shape[0])
    return np.asarray(output.hidden[0][0], np.float64), (output.experts[0] if output.experts else None)


def _load(checkpoint: Checkpoint, config: ModelConfig, layer: int, hidden: np.ndarray) -> tuple[LayerWeights, str]:
    """The layer, with only the experts its tokens may route to when it is a MoE layer."""
    if not config.is_moe_layer(layer):
        return load_layer(checkpoint, config, layer), "-"
    without = load_layer(checkpoint, config, layer, resident=())
    resident = candidate_experts(without, hidden, config)
    weights = load_layer(checkpoint, config, layer, resident=resident)
    return weights, f"{len(resident)}/{config.n_routed_experts}"


def _compare(row: LayerRow, backend: Backend, config: ModelConfig, layer: LayerWeights, hidden: np.ndarray,
             expected: np.ndarray, expected_experts: np.ndarray | None, checkpoint: Checkpoint) -> None:
    key = "cross.float32" if backend.default_dtype != "float64" else "self.float64"
    try:
        got, experts = run_block(backend, config, layer, hidden, checkpoint=checkpoint)
    except (Unsupported, ExpertNotResident) as reason:
        row.results[backend.name] = f"not run: {reason}"[:120]
        return
    want = expected
    note = ""
    if experts is not None and expected_experts is not None and not np.array_equal(np.sort(experts, -1),
                                                                                   np.sort(expected_experts, -1)):
        differ = int((np.sort(experts, -1) != np.sort(expected_experts, -1)).any(-1).sum())
        note = f", {differ} token(s) routed differently (compared on its routing)"
        want, _ = run_block(REFERENCE, config, layer, hidden, forced=experts, checkpoint=checkpoint)
    error = rel_err(got, want)
    passed = error <= tolerance(key).value
    row.results[backend.name] = f"rel_err {error:.2e} ({key} {tolerance(key).value:.0e}){note}"
    row.passed &= passed


def _oracle(row: LayerRow, config: ModelConfig, layer: LayerWeights, hidden: np.ndarray, expected: np.ndarray,
            expected_experts: np.ndarray | None) -> None:
    if isinstance(layer.ffn, MoEWeights) and any(expert is None for expert in layer.ffn.experts):
        row.results["oracle"] = "not run: only some experts are resident"
        return
    try:
        from ..oracle import OracleRunner, OracleUnavailable
    except ImportError as error:
        row.results["oracle"] = f"not run: {error}"
        return
    try:
        one, weights = block_model(config, layer, hidden)
        forced = [expected_experts] if expected_experts is not None else None
        output = OracleRunner(one, weights).prefill(np.arange(hidden.shape[0])[None], forced)
    except (OracleUnavailable, Unsupported) as reason:
        row.results["oracle"] = f"not run: {reason}"[:120]
        return
    error = rel_err(np.asarray(output.hidden[0][0], np.float64), expected)
    row.results["oracle"] = f"rel_err {error:.2e} (oracle.float32)"
    row.passed &= error <= tolerance("oracle.float32").value


def _mtp_input(checkpoint: Checkpoint, config: ModelConfig, layer: int, normed: np.ndarray,
               next_tokens: np.ndarray) -> np.ndarray:
    """eh_proj([enorm(E[t+1]); hnorm(h)]) of the MTP module stored as `layer` (reference, float64)."""
    from reference.norm import rms_norm

    prefix = f"model.layers.{layer}"
    d = config.dim

    def vector(name: str) -> np.ndarray:
        return load_tensor(checkpoint, config, TensorSpec(f"{prefix}.{name}.weight", (d,))).astype(np.float64)

    embedding = np.asarray(load_tensor(checkpoint, config, TensorSpec(f"{prefix}.embed_tokens.weight", (
        config.vocab_size, d)), check_finite=False)[next_tokens], np.float64)
    eh_proj = LinearWeight(load_tensor(checkpoint, config, TensorSpec(f"{prefix}.eh_proj.weight", (d, 2 * d))))
    joined = np.concatenate([rms_norm(embedding, vector("enorm"), config.rms_norm_eps),
                             rms_norm(normed, vector("hnorm"), config.rms_norm_eps)], axis=-1)
    return joined @ eh_proj.weight.astype(np.float64).T


def verify_layers(checkpoint: Checkpoint, config: ModelConfig, layers: list[int], tokens: int, backends: list[str],
                  random_hidden: bool = False, seed: int = 0, oracle: bool = True,
                  progress: bool = True) -> list[LayerRow]:
    """One row per chosen layer (module docstring); layers may include num_hidden_layers + k (MTP depth k)."""
    chosen = sorted(set(layers))
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, config.vocab_size, tokens + 1)
    others = [b for b in (resolve_backend(spec) for spec in backends) if b.name != REFERENCE.name]
    rows = []
    hidden = None
    last_main = min(max(chosen), config.n_layers - 1)
    walk = chosen if random_hidden else list(range(0, last_main + 1)) + [lay for lay in chosen if lay >= config.n_layers]
    for layer in tqdm(walk, desc="layers", unit="layer", disable=not progress):
        reset_peak()
        start = time.perf_counter()
        if layer >= config.n_layers:  # an MTP module: its input projection, then its block
            if random_hidden or hidden is None:
                hidden = rng.standard_normal((tokens, config.dim))
            norm = load_tensor(checkpoint, config, TensorSpec("model.norm.weight", (config.dim,))).astype(np.float64)
            from reference.norm import rms_norm

            inputs = _mtp_input(checkpoint, config, layer, rms_norm(hidden, norm, config.rms_norm_eps), stream[1:])
            kind = "MTP module"
        else:
            if random_hidden or hidden is None:
                hidden = (rng.standard_normal((tokens, config.dim)) if random_hidden else
                          np.asarray(load_tensor(checkpoint, config, TensorSpec(
                              "model.embed_tokens.weight", (config.vocab_size, config.dim)),
                              check_finite=False)[stream[:-1]], np.float64))
            inputs = hidden
            kind = "MoE" if config.is_moe_layer(layer) else "dense"
        weights, loaded = _load(checkpoint, config, layer, inputs)
        row = LayerRow(layer, kind, loaded, tree_nbytes(weights))
        expected, expected_experts = run_block(REFERENCE, config, weights, inputs)
        give_back_memory(checkpoint)  # the pages the reference read, before a backend makes its own copy
        if layer in chosen:
            for backend in others:
                _compare(row, backend, config, weights, inputs, expected, expected_experts, checkpoint)
                give_back_memory(checkpoint)
            if oracle:
                _oracle(row, config, weights, inputs, expected, expected_experts)
        if layer < config.n_layers:
            hidden = expected
        del weights
        give_back_memory(checkpoint)
        row.seconds = time.perf_counter() - start
        row.peak_gib = peak_gib()
        if layer in chosen:
            rows.append(row)
    return rows
