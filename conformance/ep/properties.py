"""Property checks of the expert-parallel layer (impl/expert_parallel.py) against the single-device MoE.

For generated routings (uniform, all tokens to one expert, experts that receive nothing, skewed loads) and
meshes of N in {1, 2, 4, 8} devices, the routed experts' output and the gradients with respect to the
tokens, the gating weights and every expert weight equal those of `impl.moe.routed_experts` on one device,
in float64 within the policy entry `ep.float64` (bit for bit is not promised: DTensor's einsums and the
single-device tiles sum the 'dim' products in different orders).

Run as `python -m dsv3_conformance.ep.properties [--mutant KEY ...]` (TensorFlow must start with 8 logical CPU
devices, so in a process of its own: conformance.checks.isolated); prints one JSON object: per mesh size, the
examples run, the worst errors and any failure. `--mutant` plants a mutant of the catalogue first (ep-half-capacity
and ep-ungated break this layer).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.verdict import CheckFailed

MESH_SIZES = (1, 2, 4, 8)
KINDS = ("uniform", "one-expert", "some-experts-empty", "skewed")


@st.composite
def routings(draw) -> dict:
    experts = draw(st.sampled_from([8, 16]))
    k = draw(st.integers(1, 4))
    tokens = draw(st.integers(1, 24))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if kind == "one-expert":
        chosen = np.full((tokens, k), draw(st.integers(0, experts - 1)))
    elif kind == "some-experts-empty":
        pool = rng.choice(experts, size=max(1, experts // 4), replace=False)
        chosen = rng.choice(pool, size=(tokens, k))
    elif kind == "skewed":
        weights = rng.pareto(1.0, experts) + 1e-3
        chosen = rng.choice(experts, size=(tokens, k), p=weights / weights.sum())
    else:
        chosen = rng.integers(0, experts, (tokens, k))
    return {"experts": experts, "k": k, "kind": kind, "chosen": chosen.astype(np.int32),
            "gating": rng.random((tokens, k)), "x": rng.standard_normal((tokens, 16)), "seed": int(rng.integers(2**31))}


def fixed_example(kind: str, experts: int = 16, k: int = 3, tokens: int = 13, seed: int = 5) -> dict:
    """One routing of `kind`, always run besides the generated ones (13 tokens: uneven over every mesh)."""
    rng = np.random.default_rng(seed)
    chosen = {"one-expert": np.full((tokens, k), experts - 1),
              "some-experts-empty": rng.choice([1, 2, 9], size=(tokens, k)),
              "skewed": np.where(rng.random((tokens, k)) < 0.8, 0, rng.integers(0, experts, (tokens, k))),
              "uniform": rng.integers(0, experts, (tokens, k))}[kind]
    return {"experts": experts, "k": k, "kind": kind, "chosen": chosen.astype(np.int32),
            "gating": rng.random((tokens, k)), "x": rng.standard_normal((tokens, 16)), "seed": seed}


def _pad(array: np.ndarray, sources: int) -> np.ndarray:
    per = -(-len(array) // sources)
    padded = np.concatenate([array, np.zeros((per * sources - len(array), *array.shape[1:]), array.dtype)])
    return padded.reshape(sources, per, *array.shape[1:])


def compare(example: dict, mesh) -> tuple[float, float]:
    """(forward rel_err, worst gradient rel_err) of the EP layer on `mesh` vs one device; raises CheckFailed."""
    import tensorflow as tf

    from dsv3_conformance.impl import expert_parallel
    from dsv3_conformance.impl.model import to_tf
    from dsv3_conformance.impl.moe import routed_experts
    from dsv3_conformance.impl.trees import leaves, rebuild, structure_of

    config = tiny(dim=16, moe_inter_dim=8, n_routed_experts=example["experts"], n_expert_groups=1,
                  n_limited_groups=1, n_activated_experts=example["k"], n_layers=1, n_dense_layers=0, name="ep")
    block = build_weights(config, seed=example["seed"]).layers[0].ffn
    stacked = to_tf(block, tf.float64).experts
    x, gating, chosen = (tf.constant(example[name]) for name in ("x", "gating", "chosen"))
    probe = tf.constant(np.random.default_rng(example["seed"] + 1).standard_normal(example["x"].shape))

    weights = leaves(stacked)
    with tf.GradientTape() as tape:
        tape.watch([x, gating, *weights])
        single = routed_experts(x, gating, chosen, stacked, config, Numerics())
        loss = tf.reduce_sum(single * probe)
    single_grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, [x, gating, *weights])]

    sources = mesh.size
    sharded = expert_parallel.shard_experts(mesh, stacked, tf.float64)
    structure = structure_of(sharded)
    layer = expert_parallel.expert_parallel_experts

    @tf.function(autograph=False)
    def distributed(x, gating, chosen, probe, tensors):
        with tf.GradientTape() as tape:
            tape.watch([x, gating, *tensors])
            out = layer(mesh, x, gating, chosen, rebuild(structure, iter(tensors)), Numerics())
            loss = tf.reduce_sum(out * probe)
        return out, tape.gradient(loss, [x, gating, *tensors])

    put = lambda array: mesh.put(tf.constant(_pad(np.asarray(array), sources)), axis=0)  # noqa: E731
    out, grads = distributed(put(example["x"]), put(example["gating"]), put(example["chosen"]), put(probe.numpy()),
                             leaves(sharded))
    tokens = len(example["x"])
    got = mesh.get(out).numpy().reshape(-1, 16)[:tokens]
    forward = rel_err(got, single.numpy())
    worst = 0.0
    names = ["x", "gating", "gate_proj", "up_proj", "down_proj"]
    for name, got_grad, want in zip(names, grads, single_grads):
        got_grad = mesh.get(got_grad).numpy()
        got_grad = got_grad.reshape(-1, *got_grad.shape[2:])[:tokens] if name in ("x", "gating") else \
            got_grad.reshape(want.shape)
        error = rel_err(got_grad, want.numpy())
        worst = max(worst, error)
        if error > tolerance("ep.float64").value:
            raise CheckFailed(f"gradient of {name}: rel_err {error:.3e} on {sources} devices ({example['kind']})")
    if forward > tolerance("ep.float64").value:
        raise CheckFailed(f"forward: rel_err {forward:.3e} on {sources} devices ({example['kind']})")
    return forward, worst


def run(examples: int | None = None) -> dict:
    from dsv3_conformance.impl.devices import logical_cpus
    from dsv3_conformance.impl.expert_parallel import ExpertMesh

    from dsv3_conformance import profiles

    profiles.load()
    devices = logical_cpus(max(MESH_SIZES))
    summary = {}
    for size in MESH_SIZES:
        mesh = ExpertMesh(devices[:size])
        record = {"examples": 0, "forward": 0.0, "gradients": 0.0, "kinds": [], "failure": None}

        @settings(max_examples=examples or max(4, settings.default.max_examples // 4))
        @given(routings())
        def property_holds(example):
            forward, gradients = compare(example, mesh)
            record["examples"] += 1
            record["forward"] = max(record["forward"], forward)
            record["gradients"] = max(record["gradients"], gradients)
            record["kinds"] = sorted(set(record["kinds"]) | {example["kind"]})

        try:
            for kind in KINDS:
                property_holds.hypothesis.inner_test(fixed_example(kind))
            property_holds()
        except CheckFailed as failure:
            record["failure"] = failure.detail
        summary[str(size)] = record
    return summary


def node_limit_is_asserted() -> dict:
    """A router that ignores the group limit, through the EP block on 4 devices: the dispatch must refuse it.
    (Run last: a failed assertion poisons the eager executor's later operations.)"""
    import tensorflow as tf

    from dsv3_conformance.impl import expert_parallel
    from dsv3_conformance.impl.devices import logical_cpus
    from dsv3_conformance.impl.model import to_tf

    config = tiny(dim=16, moe_inter_dim=8, n_routed_experts=16, n_expert_groups=4, n_limited_groups=1,
                  n_activated_experts=4, n_layers=1, n_dense_layers=0, name="ep-node-limit")
    block = to_tf(build_weights(config, seed=3).layers[0].ffn, tf.float32)
    layer = expert_parallel.ExpertParallelMoE(expert_parallel.ExpertMesh(logical_cpus(8)[:4]), config, Numerics())
    original = expert_parallel.route
    expert_parallel.route = lambda x, gate, c: original(x, gate, c.replace(n_expert_groups=1, n_limited_groups=1))
    try:
        error, log = _with_runtime_log(lambda: layer(tf.constant(np.random.default_rng(4).standard_normal((32, 16)),
                                                                 tf.float32), layer.prepare(block, tf.float32)))
    finally:
        expert_parallel.route = original
    if error is None:
        return {"asserted": False, "message": "the dispatch accepted tokens reaching more than topk_group nodes"}
    # The assertion fails on the devices holding such tokens; the error that reaches Python is either it or, when a
    # collective on another device was cancelled first, a CancelledError naming none of it (seen once in CI under
    # load). TensorFlow's runtime logs the failed assertion either way.
    said = f"a token reached more than topk_group={config.n_limited_groups} nodes"
    lines = [line for line in (error.message + "\n" + log).splitlines() if said in line]
    return {"asserted": bool(lines), "message": (lines or error.message.splitlines())[0][-300:]}


def _with_runtime_log(call) -> tuple:
    """call() with this process's file descriptor 2 (where TensorFlow's runtime logs) captured: (the
    tf.errors.OpError it raised or None, the log)."""
    import tensorflow as tf

    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            call()
            error = None
        except tf.errors.OpError as raised:
            error = raised
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return error, log.read().decode(errors="replace")


if __name__ == "__main__":
    from dsv3_conformance.checks.isolated import add_arguments, planted_from

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--examples", type=int)
    args = parser.parse_args()
    _, planting = planted_from(args)
    with planting:
        print(json.dumps({"properties": run(args.examples), "node_limit": node_limit_is_asserted()}))
