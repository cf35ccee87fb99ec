"""A backend's fingerprint: its outputs on fixed inputs, compared bit for bit.

It answers two questions. Does a mutant change the backend at all (an equivalent mutant tests
nothing)? And after mutants were planted and removed, does the whole backend compute exactly what it
did before (nothing leaked)? The inputs touch every mutation target: the router on biased grouped and
softmax gates, the fp8 components, small models with YaRN active and eps and theta off the released values, a
V2-style gate, and fp8 weights on both numerics paths, in both attention forms, prefill and decode; two MTP
modules over a prompt and in a speculative generation; forced expert choices over two MoE blocks; decode at
the native kernel's widths; a training step; and the pipelined step and the expert-parallel layer (in a
process of their own). An output that disappears (Unsupported where it was produced) is a change too.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from dsv3_conformance.reference.fp8 import quantize_weight

from dsv3_conformance.backends import Backend, Unsupported
from dsv3_conformance.checks.isolated import run_isolated
from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.format.config import YarnScaling, tiny, tiny_fp8, tiny_v2
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.weights import GateWeights
from dsv3_conformance.backends import speculative_generate

Output = tuple[str, np.ndarray]


def _gate_inputs() -> list[tuple[str, object, np.ndarray, GateWeights]]:
    rng = np.random.default_rng(7)
    cases = []
    for name, config in (("sigmoid-grouped", tiny(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2,
                                                  n_activated_experts=4)), ("softmax", tiny_v2())):
        x = rng.standard_normal((64, config.dim))
        weight = rng.standard_normal((config.n_routed_experts, config.dim)) / np.sqrt(config.dim)
        bias = rng.normal(-2.0, 1.0, config.n_routed_experts) if config.gate_bias else None
        cases.append((name, config, x, GateWeights(weight, bias)))
    return cases


def _component_outputs(backend: Backend) -> Iterator[Output]:
    for name, config, x, gate in _gate_inputs():
        weights, experts = backend.component("route")(x, gate, config)
        yield f"route[{name}].weights", weights
        yield f"route[{name}].experts", experts
    probe = np.array([500.0, -500.0, 448.0, 1.0625, 1.1875, 3e-3, 0.0, np.nan], np.float32)
    yield "to_e4m3", backend.component("to_e4m3")(probe)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((4, 256)) * np.array([[1e-6], [0.7], [3.0], [300.0]])).astype(np.float32)
    x[0] = 0.0
    x[1, :128] *= np.float32(0.5) / np.abs(x[1, :128]).max()
    x[1, 0] = np.float32(0.875) + np.float32(2.0 ** -24)  # amax/448 just above 2^-9: the two ue8m0 roundings differ
    for scale_fmt in (None, "ue8m0", "ue8m0-log2f"):
        x_q, x_scale = backend.component("quantize_activation")(x, scale_fmt)
        yield f"quantize_activation[{scale_fmt}]", np.asarray(x_q).view(np.uint8)
        yield f"activation_scales[{scale_fmt}]", x_scale
        for rows in (300, 256):
            w_q, w_scale = quantize_weight(rng.standard_normal((rows, 256)))
            yield f"fp8_gemm[{scale_fmt}, {rows}]", backend.component("fp8_gemm")(x_q, x_scale, w_q, w_scale)


# Models whose outputs every model-level mutation target changes: YaRN active with a 16-wide rope part
# (so the ramp has interior pairs), rms_norm_eps and rope_theta away from the released values, strongly negative
# gate biases, softmax gates, fp8 weights.
_YARN = tiny(qk_rope_head_dim=16, max_seq_len=128, rope_scaling=YarnScaling(factor=40.0, original_seq_len=64),
             rms_norm_eps=1e-3, rope_theta=500.0, name="probe-yarn")
_FLOAT_MODELS: list[tuple[str, object, Numerics, str]] = [
    ("yarn-absorbed", _YARN, Numerics(), "absorbed"),
    ("yarn-naive", _YARN, Numerics(), "naive"),
    ("v2", tiny_v2(name="probe-v2"), Numerics(), "absorbed"),
]
_FP8_MODELS: list[tuple[str, object, Numerics, str]] = [
    ("fp8-path-ue8m0", tiny_fp8(name="probe-fp8"), Numerics("fp8", "ue8m0"), "absorbed"),
    ("fp8-path-ue8m0-naive", tiny_fp8(name="probe-fp8"), Numerics("fp8", "ue8m0"), "naive"),
    ("fp8-dequantized", tiny_fp8(name="probe-fp8"), Numerics(), "absorbed"),
]


def _models(backend: Backend, models) -> Iterator[Output]:
    for name, config, numerics, form in models:
        weights = build_weights(config, seed=9, bias_mean=-2.0)
        prompt = np.random.default_rng(10).integers(0, config.vocab_size, (2, 5))
        try:
            runner = backend.make_runner(config, weights, numerics, attention_form=form)
            steps = [runner.prefill(prompt, capacity=7)]
            steps += [runner.decode(token) for token in np.array([[1, 2], [3, 4]])]
        except Unsupported:
            continue
        for index, step in enumerate(steps):
            yield f"{name}.step{index}.logits", step.logits
            for layer, hidden in enumerate(step.hidden):
                yield f"{name}.step{index}.hidden{layer}", hidden
            for layer, experts in enumerate(step.experts):
                yield f"{name}.step{index}.experts{layer}", experts


_MTP = tiny(n_mtp_layers=2, name="probe-mtp")


def _mtp_outputs(backend: Backend) -> Iterator[Output]:
    """Both MTP depths over a prompt, then a speculative generation (drafts, verification, rollback); each
    output is yielded as soon as it exists, so that a mutant changing an early one stops the probe there."""
    weights = build_weights(_MTP, seed=11, bias_mean=-2.0)
    stream = np.random.default_rng(12).integers(0, _MTP.vocab_size, (2, 8))
    try:
        runner = backend.make_runner(_MTP, weights)
    except Unsupported:
        return
    yield "mtp.main.logits", runner.prefill(stream[:, :6], capacity=7).logits
    try:
        step = runner.mtp(stream[:, 6:])
    except Unsupported:
        return
    for depth in range(_MTP.n_mtp_layers):
        yield f"mtp.depth{depth}.hidden", step.hidden[depth]
        yield f"mtp.depth{depth}.logits", step.logits[depth]
    yield "mtp.drafts", step.drafts
    tokens, stats = speculative_generate(backend.make_runner(_MTP, weights), stream[:, :6], 8, 2)
    yield "speculative.tokens", tokens
    yield "speculative.accepted", np.array([stats.accepted, stats.main_steps])


_TWO_MOE = tiny(n_layers=3, n_dense_layers=1, name="probe-two-moe")


def _forced_outputs(backend: Backend) -> Iterator[Output]:
    """A model with two MoE blocks run again with its own expert choices forced (where the backend takes them)."""
    weights = build_weights(_TWO_MOE, seed=14, bias_mean=-2.0)
    prompt = np.random.default_rng(15).integers(0, _TWO_MOE.vocab_size, (2, 5))
    runner = backend.make_runner(_TWO_MOE, weights)
    try:
        yield "forced.logits", runner.prefill(prompt, runner.prefill(prompt).experts).logits
    except Unsupported:
        return


def _kernel_outputs(backend: Backend) -> Iterator[Output]:
    """Decode steps at widths the tf backend's native kernel takes."""
    from dsv3_conformance.checks.cross import KERNEL_WIDTHS

    try:
        runner = backend.make_runner(KERNEL_WIDTHS, build_weights(KERNEL_WIDTHS, seed=16), dtype="float32")
    except Unsupported:
        return
    runner.prefill(np.arange(12).reshape(2, 6), capacity=8)
    for token in ([1, 2], [3, 4]):
        yield f"kernel-widths.decode{token[0]}", runner.decode(np.array(token)).logits


def _training_outputs(backend: Backend) -> Iterator[Output]:
    """A training step: losses, gradients, loads and the weights after."""
    from dsv3_conformance.checks.training import CONFIGS, SETTINGS
    from dsv3_conformance.reference.training import arrays

    if backend.trainer is None:
        return
    config = CONFIGS["mtp2-bias-q-lora-0"]
    trainer = backend.trainer(config, build_weights(config, seed=17), SETTINGS, "float32")
    done = trainer.step(np.random.default_rng(18).integers(0, config.vocab_size, (2, 6)))
    yield "training.losses", np.array([done.losses[part] for part in sorted(done.losses)])
    yield "training.loads", np.asarray(done.loads)
    for path, gradient in arrays(done.gradients):
        yield f"training.gradient{path}", gradient
    for path, value in arrays(trainer.weights()):
        yield f"training.weights{path}", value


def _pipeline_outputs(backend: Backend) -> Iterator[Output]:
    """What the pipelined step measures against the sequential step (in a process of its own, carrying the planted
    mutants)."""
    if "pipeline" in backend.capabilities:
        rows = run_isolated("dsv3_conformance.pipeline.execution", backend)
        yield "pipeline", np.frombuffer(json.dumps(rows).encode(), np.uint8)


def _expert_parallel_outputs(backend: Backend) -> Iterator[Output]:
    """What the expert-parallel layer measures against one device (in a process of its own)."""
    if "expert-parallel" in backend.capabilities:
        measured = run_isolated("dsv3_conformance.ep.properties", backend, "--examples", "1")["properties"]
        yield "expert-parallel", np.frombuffer(json.dumps(measured).encode(), np.uint8)


def _components(backend: Backend) -> Iterator[Output]:
    try:
        yield from _component_outputs(backend)
    except Unsupported:
        return


# The probe in sections, cheapest first. A mutant is probed in the sections its targets' roles reach (what it
# replaces is all it can change), a control there too: the fingerprint of a section is made only where needed.
SECTIONS = {"components": _components, "mtp": _mtp_outputs, "models": lambda b: _models(b, _FLOAT_MODELS),
            "fp8-models": lambda b: _models(b, _FP8_MODELS), "forced": _forced_outputs, "kernel": _kernel_outputs,
            "training": _training_outputs, "pipeline": _pipeline_outputs, "expert-parallel": _expert_parallel_outputs}
ROLE_SECTIONS = {"moe": ("components", "models", "forced"), "rope": ("models",), "norm": ("models",),
                 "ffn": ("models",), "attention": ("models", "fp8-models"), "fp8": ("components", "fp8-models"),
                 "mtp": ("mtp",), "model": ("models", "mtp", "forced"), "kernel": ("kernel",),
                 "training": ("training",), "pipeline": ("pipeline",), "ep": ("expert-parallel",)}


def sections_of(roles) -> list[str]:
    """The sections the given mutation roles reach (all, for a role not listed), in SECTIONS' order."""
    reached = {section for role in roles for section in ROLE_SECTIONS.get(role, tuple(SECTIONS))}
    return [name for name in SECTIONS if name in reached]


def outputs(backend: Backend, sections=None) -> Iterator[Output]:
    """Every probe output of `backend` in the given sections (default all), in that order."""
    for name in sections or SECTIONS:
        yield from SECTIONS[name](backend)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def fingerprint(backend: Backend, sections=None) -> dict[str, dict[str, np.ndarray]]:
    """Every probe output of `backend` in the given sections (default all), by section."""
    return {section: {name: np.array(value) for name, value in outputs(backend, [section])}
            for section in sections or SECTIONS}


def first_difference(backend: Backend, reference: dict[str, dict[str, np.ndarray]],
                     sections=None) -> str | None:
    """The first probe output of `backend` in the given sections (default all) that differs from the fingerprint
    `reference` in any bit (None: all equal).

    A probe that now raises where the unmutated backend did not is a difference too, and so is an output that
    disappeared (declared Unsupported where the unmutated backend produced it).
    """
    for section in sections or SECTIONS:
        expected, seen = reference[section], []
        try:
            for name, value in outputs(backend, [section]):
                if name not in expected or not _same(value, expected[name]):
                    return name
                seen.append(name)
        except Exception as error:
            return f"raised {type(error).__name__} after {seen[-1] if seen else 'nothing'} ({section})"
        gone = [name for name in expected if name not in seen]
        if gone:
            return f"{gone[0]} disappeared"
    return None

