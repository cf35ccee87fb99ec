"""`dsv3-conformance bench`: the implementations side by side on one workload, with the machine's floors.

Every implementation (benchmarks/peers.py) is built on the same weights and runs the same prompts in this
process; after one warm-up call each, the rounds interleave the implementations (round r times each one in
turn, starting with the r-th, so that none always runs first after the floors' probes; the cores idle 0.3 s
before each timed call, so no implementation's spinning worker threads slow the next), and the median over
rounds is reported with its spread (min, max). In every round the machine's
floors are measured too, and their medians reported: at the start of the round, the prefill floor (every matrix
product of the prefill timed in NumPy at its own shape, its weights read from memory, the times summed: a prefill
made of products cannot run faster, and it weighs each shape by its FLOPs, where one square matmul rate holds
small-row products such as a prefill's experts to a rate they cannot reach) and the fp32 matmul rate (NumPy,
2048^3, shown for comparison); the read bandwidth (a BLAS matrix-vector product over 400 MB) beside every decode
measurement, just before and just after its steps, the faster of the two kept (the stricter floor). This shared machine's
bandwidth swings by half from one second to the next (docs/performance-log.md), so a decode is held against the
floor of its own moment: an implementation's decode_floor_fraction is the median over rounds of (floor of the
round / its decode of the round), not a ratio of medians taken seconds apart. Each
workload's work is counted: prefill FLOPs (2 x activated parameters per token, the head at the last position
only, plus causal attention scores; for bench-small and tiny only what the last logits and the caches need, which
TF computes and no more: see prefill_flops) and the bytes of weights a decode step must read as they are stored
(every tensor but the embedding and the routed experts, plus those the step's tokens use: at most k per
token per MoE layer). Memory per implementation: what it holds once built (weights, caches) and its peak
while running (held plus the most its warm-up calls added, sampled every 2 ms; compilation included).
Each round also records the share of CPU time the hypervisor gave to other machines while it ran (steal,
from /proc/stat), printed beside the machine: a neighbour taking the cores shows there, one taking memory
bandwidth in the floors. Ratios are taken against each peer and against the floors; `--gate` checks them against
benchmarks/gates.json and fails the command when one is missed.

Workloads:
- bench-small: 8 layers, hidden 1024, 64 experts (top-6), vocabulary 32000; prefill of 512 tokens at batch 1,
  32 decode steps, and at batch 8 a prefill of 16 tokens and decode steps; TF's prefill computes the last block at
  the last position only (trim_last_block of impl.model.Transformer: the prefill of generation, which needs the last logits and the
  caches); so does tiny's. The single-layer workloads measure a layer over every position, untrimmed;
- tiny: the CI workload, 2 layers, hidden 256, 16 experts; prefill 128 tokens, 16 decode steps;
- layer-dense: one full-width dense layer of the 671B config (hidden 7168, 128 heads, FFN 18432), float32;
  prefill of 64 tokens, decode at batch 1 and 8;
- layer-moe-fp8: one full-width MoE layer of the 671B config with its weights in fp8 (e4m3, 128x128 block
  scales), computed in float32 on the dequantized weights (the official code's default path): 8 routed
  experts of width 2048 and the shared one per token, as in the release, but a pool of 64 experts in 8 groups
  instead of 256 (256 take 11.3 GB in fp8, and each implementation holds its own copy beside the source
  arrays: four copies do not fit a 24 GB machine; a token's work and a decode step's bytes are the release's).
  transformers is left out: it runs fp8 checkpoints on GPUs only, on a CPU it needs them dequantized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dsv3_conformance.format.config import ModelConfig, deepseek_v3_671b, tiny
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.weights import ModelWeights
from dsv3_conformance.fullscale.params import count_parameters

from .peers import PEERS, make_peer
from .timing import RESULTS

GATES = Path(__file__).parent / "gates.json"

WORKLOADS = {
    "bench-small": dict(config=tiny(vocab_size=32000, dim=1024, inter_dim=2816, moe_inter_dim=256, n_layers=8,
                                    n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=1,
                                    n_activated_experts=6, n_expert_groups=8, n_limited_groups=3, route_scale=2.5,
                                    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                    v_head_dim=64, rope_scaling=None, max_seq_len=1024, name="bench-small"),
                        prompt=512, decode=32, decode_batch=8, rounds=6, trim_last_block=True),
    "tiny": dict(config=tiny(vocab_size=4096, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=2, n_dense_layers=1,
                             n_heads=4, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                             n_limited_groups=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                             qk_rope_head_dim=32, v_head_dim=32, rope_scaling=None, max_seq_len=256, name="bench-tiny"),
                 prompt=128, decode=16, decode_batch=8, rounds=3, trim_last_block=True),
    # One full-width dense layer of the 671B config (float32; vocabulary cut to 4096 so the embedding and the
    # head stay small, YaRN off so every peer runs the same rotation): 64 tokens of prefill, decode at batch 1
    # and batch 8.
    "layer-dense": dict(config=deepseek_v3_671b().replace(n_layers=1, n_dense_layers=1, n_mtp_layers=0,
                                                          vocab_size=4096, max_seq_len=1024, rope_scaling=None,
                                                          fp8_weights=False, name="layer-dense-671b"),
                        prompt=64, decode=8, decode_batch=8, rounds=2),
    "layer-moe-fp8": dict(config=deepseek_v3_671b().replace(n_layers=1, n_dense_layers=0, n_mtp_layers=0,
                                                            n_routed_experts=64, vocab_size=4096, max_seq_len=1024,
                                                            rope_scaling=None, name="layer-moe-fp8-671b"),
                          prompt=64, decode=8, decode_batch=8, rounds=2, unsupported={"hf": "fp8 on GPUs only"}),
}


def bench_weights(config: ModelConfig, seed: int = 0) -> ModelWeights:
    """Weights normal / sqrt(fan_in), gate biases normal(-0.2, 0.5) (float32); with fp8 weights, e4m3 values and
    block scales of that magnitude (conformance.fullscale.synthetic)."""
    from dsv3_conformance.format.weights import assemble
    from dsv3_conformance.fullscale.synthetic import make_tensor

    rng = np.random.default_rng(seed)

    def fetch(spec):
        if spec.role in ("fp8", "scale"):
            return make_tensor(spec, seed)
        if spec.name.endswith("e_score_correction_bias"):
            return rng.normal(-0.2, 0.5, spec.shape).astype(np.float32)
        if spec.name.endswith(("norm.weight", "layernorm.weight")):
            return np.ones(spec.shape, np.float32)
        return (rng.standard_normal(spec.shape, np.float32) / np.sqrt(spec.shape[-1])).astype(np.float32)
    return assemble(fetch, config, include_mtp=False)


# --- the machine's floors, and the work of a workload ------------------------------------------------------

def _fastest(call, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call."""
    call()
    return min(_time(call) for _ in range(repeats))


def matmul_rate(size: int = 2048, repeats: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), np.float32)
    return 2 * size ** 3 / _fastest(lambda: a @ a, repeats)


class Gemm(NamedTuple):
    """`copies` products x [rows, inner] @ w [inner, outer] of a prefill that together do `flops` (fewer than the
    shape's where only the causal half of a square is needed); `cold`: each w is a weight read from memory once
    (not an activation already in the caches)."""
    rows: int
    inner: int
    outer: int
    copies: int
    flops: float
    cold: bool = True


def prefill_gemms(config: ModelConfig, length: int, trimmed: bool = False) -> list[Gemm]:
    """The matrix products of a prefill at batch 1 for the last position's logits, as prefill_flops counts them
    (the FLOPs of the two agree but for the norms' weights: tests/harness/test_bench.py): per block the query,
    kv and output projections, the causal attention's scores and values per head, and the dense FFN or the MoE's
    gate, shared experts and routed experts (length x k / E rows each, the mean); the head at the last position.
    `trimmed`: the last block at the last position only, its kv projection still at every position."""
    heads, qk = config.n_heads, config.qk_nope_head_dim + config.qk_rope_head_dim
    causal = length * (length + 1) / 2

    def gemm(rows, inner, outer, copies=1, cold=True):
        return Gemm(rows, inner, outer, copies, 2.0 * rows * inner * outer * copies, cold)

    def block(index: int, rows: int) -> list[Gemm]:
        pairs = causal if rows == length else length  # (query, key) pairs: every query's, or the last one's
        query = ([gemm(rows, config.dim, config.q_lora_rank), gemm(rows, config.q_lora_rank, heads * qk)]
                 if config.q_lora_rank else [gemm(rows, config.dim, heads * qk)])
        attention = query + [
            gemm(length, config.dim, config.kv_lora_rank + config.qk_rope_head_dim),
            gemm(rows, config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim)),
            Gemm(rows, qk, length, heads, 2.0 * heads * qk * pairs, cold=False),
            Gemm(rows, length, config.v_head_dim, heads, 2.0 * heads * config.v_head_dim * pairs, cold=False),
            gemm(rows, heads * config.v_head_dim, config.dim)]
        if index < config.n_dense_layers:
            return attention + [gemm(rows, config.dim, config.inter_dim, 2), gemm(rows, config.inter_dim, config.dim)]
        shared = config.n_shared_experts * config.moe_inter_dim
        routed = rows * config.n_activated_experts  # (token, expert) pairs
        per_expert, experts = ((routed // config.n_routed_experts, config.n_routed_experts)
                               if routed >= config.n_routed_experts else (1, routed))
        flops = 2.0 * routed * config.dim * config.moe_inter_dim
        return attention + [
            gemm(rows, config.dim, config.n_routed_experts), gemm(rows, config.dim, shared, 2),
            gemm(rows, shared, config.dim),
            Gemm(per_expert, config.dim, config.moe_inter_dim, 2 * experts, 2 * flops),
            Gemm(per_expert, config.moe_inter_dim, config.dim, experts, flops)]

    gemms = [g for index in range(config.n_layers)
             for g in block(index, 1 if trimmed and index == config.n_layers - 1 else length)]
    return gemms + [gemm(1, config.dim, config.vocab_size)]


# No product's measurement does more than GEMM_FLOPS of work: its cold weights are as many matrices as fill the read
# matrix (read_matrix: larger than the caches), unless fewer reach GEMM_FLOPS, for shapes bound by compute, where a
# matrix read from the caches runs as fast.
GEMM_FLOPS = 4e9


def gemm_rate(gemm: Gemm, pool: np.ndarray, repeats: int = 2) -> float:
    """FLOP/s of NumPy's float32 products at `gemm`'s shape, x [rows, inner] @ w [count, inner, outer], the fastest of
    `repeats` after one untimed call; w is a view of `pool` (read_matrix), count matrices of it for cold weights
    (read from memory: the pool is larger than the caches) or one for an activation (hot)."""
    one = 2.0 * gemm.rows * gemm.inner * gemm.outer
    count = pool.size // (gemm.inner * gemm.outer) if gemm.cold else 1
    count = max(1, min(count, int(GEMM_FLOPS // one)))
    w = pool.reshape(-1)[: count * gemm.inner * gemm.outer].reshape(count, gemm.inner, gemm.outer)
    x = np.ones((gemm.rows, gemm.inner), np.float32)
    np.matmul(x, w)
    return count * one / min(_time(lambda: np.matmul(x, w), settle_s=0.0) for _ in range(repeats))


def prefill_gemm_floor(config: ModelConfig, length: int, pool: np.ndarray, trimmed: bool = False) -> float:
    """Seconds a prefill's products take at NumPy's rate for each one's own shape (gemm_rate), summed over
    prefill_gemms: the prefill floor. The cores idle SETTLE_S first; a shape is measured once however often it
    occurs."""
    gemms = prefill_gemms(config, length, trimmed)
    time.sleep(SETTLE_S)
    rates = {}
    for g in gemms:
        key = (g.rows, g.inner, g.outer, g.cold)
        if key not in rates:
            rates[key] = gemm_rate(g, pool)
    return sum(g.flops / rates[(g.rows, g.inner, g.outer, g.cold)] for g in gemms)


def read_matrix(megabytes: int = 400) -> np.ndarray:
    """The matrix read_bandwidth reads, and whose memory gemm_rate's cold weights view: `megabytes`, at least twice
    the last-level cache, too large for any cache. A run allocates it once, before the warm-up, so that it shows in
    no implementation's peak memory."""
    size = max(megabytes << 20, 2 * _last_level_cache_bytes())
    return np.ones((size // 4096, 1024), np.float32)


def read_bandwidth(matrix: np.ndarray, repeats: int = 3) -> float:
    """Bytes/s of a float32 matrix-vector product over `matrix` (read_matrix): the operation a decode step is made
    of, run by the BLAS on every core; the fastest of `repeats` back to back, after one untimed call that follows
    SETTLE_S of idle cores. (A plain numpy sum is single-threaded and reads at about half this rate, below what
    the official code reaches, so it would not be a floor.)"""
    vector = np.ones(matrix.shape[1], np.float32)
    _time(lambda: matrix @ vector)
    return matrix.nbytes / min(_time(lambda: matrix @ vector, settle_s=0.0) for _ in range(repeats))


def _activated_below_head(config: ModelConfig) -> int:
    """Parameters a token multiplies with in the blocks (activated, without the embedding and the head)."""
    return count_parameters(config.replace(n_mtp_layers=0)).activated - config.vocab_size * config.dim


def prefill_flops(config: ModelConfig, batch: int, length: int, trimmed: bool = False) -> float:
    """FLOPs of a prefill for the last position's logits: 2 per activated parameter and token, the head at the
    last position only, plus the causal attention's scores and values. `trimmed`: only the work those logits and
    the caches need, as TF's trim_last_block does it (the peers compute every position): the last block's
    queries, attention output and FFN at the last position, its kv projection still at every position."""
    per_query = config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 2
    causal = length * (length + 1) / 2  # the (query, key) pairs a block scores
    activated = _activated_below_head(config)
    flops = 2 * activated * length + 2 * config.vocab_size * config.dim + config.n_layers * per_query * causal
    if trimmed:
        last_block = activated - _activated_below_head(config.replace(n_layers=config.n_layers - 1))
        kv_projection = config.dim * (config.kv_lora_rank + config.qk_rope_head_dim)
        flops -= 2 * (last_block - kv_projection) * (length - 1) + per_query * (causal - length)
    return batch * flops


def decode_bytes(weights: ModelWeights, config: ModelConfig, batch: int) -> float:
    """Bytes of weights a decode step must read, as stored (fp8 weights with their scales): every tensor but the
    embedding (a lookup) and the routed experts, plus min(E, batch * k) routed experts per MoE layer."""
    from dsv3_conformance.format.weights import MoEWeights, tree_nbytes

    used = min(config.n_routed_experts, batch * config.n_activated_experts)
    total = tree_nbytes((weights.norm, weights.head))
    for layer in weights.layers:
        if isinstance(layer.ffn, MoEWeights):
            expert = next(e for e in layer.ffn.experts if e is not None)
            total += tree_nbytes((layer.attn_norm, layer.attn, layer.ffn_norm, layer.ffn.gate, layer.ffn.shared))
            total += used * tree_nbytes(expert)
        else:
            total += tree_nbytes(layer)
    return float(total)


# --- running ----------------------------------------------------------------------------------------------

def _resident_gib() -> float:
    import re

    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 2**20


class PeakResident:
    """The highest resident memory (GiB) seen while the block runs, sampled every `every_s` by a thread: what a
    call allocates on top of what the implementation holds (activations, a compiler's working memory), which
    the holding alone does not show. Sampled only around the warm-up calls: the sampling thread would take the
    interpreter's lock from the timed ones."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.start, self.peak, self._stop = every_s, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _resident_gib())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakResident:
        self.start = self.peak = _resident_gib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_gib())

    @property
    def rise(self) -> float:
        """GiB the peak lay above the resident memory at the start."""
        return self.peak - self.start


def machine() -> dict:
    """The CPU the numbers were measured on. Virtual machines of one CPU name differ in what moves these numbers
    (three 2-core "Intel Xeon Processor" machines measured decode ratios from 1.08 to 1.46), so the last-level
    cache and whether the cores have 512-bit vectors are recorded too, where Linux states them."""
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), None)
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    last = caches[-1] if caches else None
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(),
            "platform": platform.platform(),
            "last_level_cache": None if last is None else (last / "size").read_text().strip(),
            "avx512": None if flags is None else "avx512f" in flags}


def _last_level_cache_bytes() -> int:
    """The last-level cache's size as Linux states it ("32768K"), 0 where it does not."""
    size = machine()["last_level_cache"] or "0"
    return int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from the first line of /proc/stat (user nice system idle
    iowait irq softirq steal ...; guest time is counted in user already), None where Linux does not state them.
    Steal is the time the hypervisor ran other machines while this one had work to do; neighbours that take
    memory bandwidth instead show in the floors measured in the same round, not here."""
    if not stat.exists():
        return None
    fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:9]]
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPU time between two `cpu_times` readings that went to other machines."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


# Idle seconds before each timed call: the BLAS and OpenMP worker threads of the implementation timed before
# spin on the cores for a while after its last call, and would slow whichever runs next.
SETTLE_S = 0.3


def _time(call, settle_s: float = SETTLE_S) -> float:
    time.sleep(settle_s)
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(workload: str, peers: list[str], official: Path | None = None, rounds: int | None = None) -> dict:
    from tqdm.auto import tqdm

    spec = WORKLOADS[workload]
    config, rounds = spec["config"], rounds or spec["rounds"]
    trimmed = spec.get("trim_last_block", False)
    left_out = {name: why for name, why in spec.get("unsupported", {}).items() if name in peers}
    peers = [name for name in peers if name not in left_out]
    weights = bench_weights(config)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, config.vocab_size, (1, spec["prompt"]))
    following = rng.integers(0, config.vocab_size, (max(1, spec["decode_batch"]), spec["decode"]))
    batch_prompt = rng.integers(0, config.vocab_size, (spec["decode_batch"], 16))
    built, memory = {}, {}
    for name in peers:
        before = _resident_gib()
        built[name] = make_peer(name, config, weights, official, trimmed)
        memory[name] = _resident_gib() - before  # what the implementation holds (weights, caches), measured
    matrix = read_matrix()
    probes = {"matmul_flops_per_s": matmul_rate,
              "prefill_floor_s": lambda: prefill_gemm_floor(config, spec["prompt"], matrix, trimmed)}
    probed = {key: [] for key in probes}

    def prefill(peer):
        return {"prefill_s": _time(lambda: peer.prefill(prompt))}

    def decode(peer):
        peer.prefill(prompt)
        before = read_bandwidth(matrix)
        seconds = _time(lambda: [peer.decode(following[:1, t]) for t in range(spec["decode"])]) / spec["decode"]
        return {"decode_ms": seconds, "read_bytes_per_s": max(before, read_bandwidth(matrix))}

    def decode_batch(peer):
        prefill_s = _time(lambda: peer.prefill(batch_prompt))
        return {"prefill_batch_s": prefill_s,
                "decode_batch_ms": _time(lambda: [peer.decode(following[:, t]) for t in range(4)]) / 4}

    measures = (prefill, decode, decode_batch)
    samples = {name: {key: [] for key in ("prefill_s", "decode_ms", "read_bytes_per_s", "prefill_batch_s",
                                          "decode_batch_ms")}
               for name in peers}
    peak = {}
    for name in peers:  # warm-up: compilation and first-call costs, and the peak memory of the calls
        with PeakResident() as sampled:
            for measure in measures:
                measure(built[name])
        peak[name] = memory[name] + sampled.rise
    steal = []  # per round: the share of CPU time the hypervisor gave to other machines
    for round_ in tqdm(range(rounds), desc=f"bench {workload}", unit="round"):
        before = cpu_times()
        for key, probe in probes.items():  # the machine's floors in every round, beside what they bound
            probed[key].append(probe())
        for name in peers[round_ % len(peers):] + peers[:round_ % len(peers)]:  # who runs first rotates
            for measure in measures:
                for key, value in measure(built[name]).items():
                    samples[name][key].append(value)
        steal.append(steal_fraction(before, cpu_times()))
    floors = {key: None if None in values else statistics.median(values) for key, values in probed.items()}
    read = [bandwidth for name in peers for bandwidth in samples[name]["read_bytes_per_s"]]
    floors.update(read_bytes_per_s=statistics.median(read), read_bytes_per_s_spread=[min(read), max(read)])
    flops = prefill_flops(config, 1, spec["prompt"], trimmed)
    needed = decode_bytes(weights, config, 1)
    results = {}
    for name in peers:
        s = samples[name]
        prefill_s = statistics.median(s["prefill_s"])
        decode_s = statistics.median(s["decode_ms"])
        batch_s = statistics.median(s["decode_batch_ms"])
        at_floor = floor_fractions(needed, s["read_bytes_per_s"], s["decode_ms"])
        results[name] = {"prefill_s": prefill_s, "decode_ms": decode_s * 1e3, "decode_batch8_ms": batch_s * 1e3,
                         "prefill_batch8_s": statistics.median(s["prefill_batch_s"]),
                         "prefill_spread_s": [min(s["prefill_s"]), max(s["prefill_s"])],
                         "decode_spread_ms": [1e3 * min(s["decode_ms"]), 1e3 * max(s["decode_ms"])],
                         "prefill_tokens_per_s": spec["prompt"] / prefill_s, "decode_tokens_per_s": 1 / decode_s,
                         "prefill_flops_per_s": flops / prefill_s, "decode_bytes_per_s": needed / decode_s,
                         "decode_floor_fraction": statistics.median(at_floor),
                         "decode_floor_fraction_per_round": at_floor,
                         "read_bytes_per_s_per_round": s["read_bytes_per_s"],
                         "memory_gib": memory[name], "peak_memory_gib": peak[name]}
    floors.update(prefill_flops=flops, decode_bytes=needed, decode_floor_ms=1e3 * needed / floors["read_bytes_per_s"])
    return {"workload": workload, "config": config.name, "machine": machine(),
            "date": datetime.now(timezone.utc).date().isoformat(), "steal_per_round": steal,
            "prompt": spec["prompt"], "decode_steps": spec["decode"], "rounds": rounds, "results": results,
            "left_out": left_out, "floors": floors, "ratios": ratios(results, floors)}


def floor_fractions(needed: float, bandwidths: list[float], seconds: list[float]) -> list[float]:
    """Each round's decode step (`seconds`) against the read floor of that round: the `needed` bytes at the
    bandwidth probed beside it. Their median is the decode_floor_fraction (not the ratio of the medians, which
    would set a floor read in a fast second against a step timed in a slow one)."""
    return [needed / bandwidth / step for bandwidth, step in zip(bandwidths, seconds, strict=True)]


def ratios(results: dict, floors: dict) -> dict:
    """Speed ratios of tf against each peer (above 1: tf is faster) and against the floors."""
    if "tf" not in results:
        return {}
    tf = results["tf"]
    out = {}
    for name, other in results.items():
        if name != "tf":
            out[f"prefill_vs_{name}"] = other["prefill_s"] / tf["prefill_s"]
            out[f"decode_vs_{name}"] = other["decode_ms"] / tf["decode_ms"]
            out[f"prefill_batch8_vs_{name}"] = other["prefill_batch8_s"] / tf["prefill_batch8_s"]
            out[f"decode_batch8_vs_{name}"] = other["decode_batch8_ms"] / tf["decode_batch8_ms"]
    peers = [results[n]["prefill_s"] for n in ("official", "hf", "llamacpp") if n in results]
    if peers:
        out["prefill_vs_best_peer"] = min(peers) / tf["prefill_s"]
    out["prefill_floor_fraction"] = floors["prefill_floor_s"] / tf["prefill_s"]
    out["prefill_matmul_fraction"] = tf["prefill_flops_per_s"] / floors["matmul_flops_per_s"]  # not gated
    out["decode_floor_fraction"] = tf["decode_floor_fraction"]
    # as runs before the pairing took it (not gated): the median floor over the median step
    out["decode_floor_fraction_of_medians"] = floors["decode_floor_ms"] / tf["decode_ms"]
    return out


def check_gates(result: dict) -> list[dict]:
    gates = json.loads(GATES.read_text()).get(result["workload"], {})
    rows = []
    for key, threshold in gates.items():
        value = result["ratios"].get(key)
        rows.append({"gate": f"{key} >= {threshold}", "measured": None if value is None else round(value, 3),
                     "passed": value is not None and value >= threshold})
    return rows


def table(result: dict) -> str:
    from tabulate import tabulate

    rows = [{"implementation": name, "prefill (s)": f"{r['prefill_s']:.3f}",
             "prefill spread": "{:.3f}-{:.3f}".format(*r["prefill_spread_s"]),
             "decode b=1 (ms/token)": f"{r['decode_ms']:.1f}", "prefill b=8 (s)": f"{r['prefill_batch8_s']:.3f}",
             "decode b=8 (ms/step)": f"{r['decode_batch8_ms']:.1f}",
             "prefill GFLOP/s": f"{r['prefill_flops_per_s'] / 1e9:.1f}", "decode GB/s": f"{r['decode_bytes_per_s'] / 1e9:.1f}",
             "decode at floor": f"{r['decode_floor_fraction']:.2f}",
             "held (GiB)": f"{r['memory_gib']:.2f}", "peak (GiB)": f"{r['peak_memory_gib']:.2f}"}
            for name, r in result["results"].items()]
    f, m = result["floors"], result["machine"]
    labels = {"last_level_cache": "last-level cache", "avx512": "512-bit vectors"}
    recorded = "".join(f", {label} {m[key]}" for key, label in labels.items() if m.get(key) is not None)
    steal = [share for share in result.get("steal_per_round", ()) if share is not None]
    contended = (f"; CPU time taken by other machines (steal) per round {100 * min(steal):.1f}-{100 * max(steal):.1f}%"
                 if steal else "")
    return (f"machine: {m['cpu']}, {m['cores']} cores{recorded}{contended}\n"
            + tabulate(rows, headers="keys", disable_numparse=True) +
            f"\nfloors: each product at its own shape -> prefill >= {f['prefill_floor_s']:.3f} s (matmul 2048^3 "
            f"{f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s); read {f['read_bytes_per_s'] / 1e9:.1f} GB/s (beside each "
            f"decode: {f['read_bytes_per_s_spread'][0] / 1e9:.1f}-{f['read_bytes_per_s_spread'][1] / 1e9:.1f}) -> "
            f"decode >= {f['decode_floor_ms']:.1f} ms\n"
            + "".join(f"left out: {name} ({why})\n" for name, why in result.get("left_out", {}).items())
            + "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))


def write(result: dict, gates: list[dict]) -> Path:
    from tabulate import tabulate

    RESULTS.mkdir(exist_ok=True)
    name = f"bench-{result['workload']}"
    (RESULTS / f"{name}.json").write_text(json.dumps({**result, "gates": gates}, indent=2) + "\n")
    lines = [f"# Side by side: {result['workload']}", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "```", table(result), "```", "", "## Gates (benchmarks/gates.json)", "",
             tabulate(gates, headers="keys", tablefmt="github") if gates else "(none for this workload)"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.json"


def _bench(args: argparse.Namespace) -> int:
    peers = [p for p in PEERS if p != "official" or args.official_repo]
    if args.peers:
        peers = [p.strip() for p in args.peers.split(",")]
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise BadInput(f"--peers: unknown implementation {unknown[0]!r} (expected some of {', '.join(PEERS)})")
        if "official" in peers and not args.official_repo:
            raise BadInput("--peers: official needs --official-repo PATH (a DeepSeek-V3 checkout)")
    import importlib.util

    modules = {"hf": "transformers", "llamacpp": "llama_cpp"}  # a peer whose package is absent is left out
    peers = [p for p in peers if p not in modules or importlib.util.find_spec(modules[p]) is not None]
    result = run(args.workload, peers, Path(args.official_repo) if args.official_repo else None, args.rounds)
    gates = check_gates(result) if args.gate else []
    print(table(result))
    for row in gates:
        print(f"gate {row['gate']}: {row['measured']} {'pass' if row['passed'] else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "gates": gates}, indent=2) + "\n")
    if args.write:
        print(f"wrote {write(result, gates)}", file=sys.stderr)
    return 1 if any(not row["passed"] for row in gates) else 0


def add_command(commands, integer) -> None:
    parser = commands.add_parser("bench", help="the implementations side by side on a workload, with floors")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="bench-small")
    parser.add_argument("--official-repo", help="a DeepSeek-V3 checkout: adds the official inference/model.py")
    parser.add_argument("--peers", help=f"comma-separated subset of {', '.join(PEERS)}")
    parser.add_argument("--rounds", type=integer(1))
    parser.add_argument("--gate", action="store_true", help="check the ratios against benchmarks/gates.json")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/bench-<workload>.*")
    parser.set_defaults(run=_bench)


def report_section(golden_dir, backends: list[str], out: Path):
    """The last written results of each workload (benchmarks/results/bench-*.json), with a bar plot."""
    from dsv3_conformance.report.plots import plt
    from dsv3_conformance.report.section import Section

    from dsv3_conformance.report.section import stored_note

    rows, results, notes = [], [], []
    for path in sorted(RESULTS.glob("bench-*.json")):
        result = json.loads(path.read_text())
        results.append(result)
        notes.append(stored_note(result, path))
        for name, r in result["results"].items():
            rows.append({"workload": result["workload"], "implementation": name, "prefill (s)": f"{r['prefill_s']:.3f}",
                         "decode b=1 (ms)": f"{r['decode_ms']:.1f}", "decode b=8 (ms)": f"{r['decode_batch8_ms']:.1f}"})
        rows += [{"workload": result["workload"], "implementation": f"gate {g['gate']}", "prefill (s)": g["measured"],
                  "status": "pass" if g["passed"] else "MISSED"} for g in result.get("gates", [])]
    figures = {}
    if results:
        figure, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
        for (left, right), result in zip(axes, results):
            names = list(result["results"])
            left.bar(names, [result["results"][n]["prefill_s"] for n in names])
            left.axhline(result["floors"]["prefill_floor_s"], color="black", linestyle="--", label="prefill floor")
            right.bar(names, [result["results"][n]["decode_ms"] for n in names])
            right.axhline(result["floors"]["decode_floor_ms"], color="black", linestyle="--", label="bandwidth floor")
            left.set(title=f"{result['workload']}: prefill {result['prompt']} tokens (s)")
            right.set(title=f"{result['workload']}: decode, batch 1 (ms/token)")
            for axis in (left, right):
                heights = [bar.get_height() for bar in axis.patches]
                if max(heights) > 20 * min(heights):  # fp8 decode: a 25x gap would flatten the fast bars
                    axis.set_yscale("log")
                axis.legend(fontsize=7)
        figure.tight_layout()
        figures["Side-by-side benchmark"] = out / "bench.png"
        figure.savefig(figures["Side-by-side benchmark"], dpi=100)
        plt.close(figure)
    intro = ("Implementations side by side on the same weights and prompts, with the machine's floors measured in the "
             "same run (benchmarks/bench.py): the last results written by `dsv3-conformance bench --write`, on the "
             "machine that wrote them. Informational here; `dsv3-conformance bench --gate` fails on a missed gate.")
    return Section("Performance", intro, rows, figures, stored="; ".join(notes))
