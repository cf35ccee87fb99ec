"""Deliberately broken backends, written as a user would write a backend: against the public `Backend` API only,
each wrapping the built-in reference runner (`conformance.backends.REFERENCE.make_runner`).

Each stands for a way a port goes wrong without crashing: it skips work it cannot do, runs nothing, returns
garbage or NaN for one sequence of a batch, ignores the group limit, or hard-codes rope_theta. The verdicts
of `check-golden` and `verify-checkpoint` on them are tested in test_broken_backends.py; `FAITHFUL`, the same
wrapper changing nothing, must pass.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends import REFERENCE, Backend, Runner, StepOutput, Unsupported
from dsv3_conformance.format.mtp import MTPOptions


class Wrapper(Runner):
    """The reference's runner behind the public interface, with `damage` applied to every step's outputs."""

    def __init__(self, config, weights, numerics, dtype, attention_form):
        self.config = config
        self.inner = REFERENCE.make_runner(self.inner_config(config), weights, numerics, dtype, attention_form)

    def inner_config(self, config):
        return config

    def damage(self, output: StepOutput) -> StepOutput:
        return output

    def prefill(self, tokens, forced_experts=None, capacity=None):
        return self.damage(self.inner.prefill(tokens, forced_experts, capacity))

    def decode(self, tokens, forced_experts=None):
        return self.damage(self.inner.decode(tokens, forced_experts))

    def mtp(self, following, options=MTPOptions(), forced_experts=None):
        return self.inner.mtp(following, options, forced_experts)

    def verify(self, following, drafts):
        return self.inner.verify(following, drafts)


class NoMTP(Wrapper):
    """Has no MTP modules: mtp and verify are the interface's defaults, which raise Unsupported."""

    mtp = Runner.mtp
    verify = Runner.verify


class Nothing(Runner):
    """Runs nothing: every step is declared unsupported."""

    def __init__(self, config, weights, numerics, dtype, attention_form):
        self.config = config

    def prefill(self, tokens, forced_experts=None, capacity=None):
        raise Unsupported("this backend runs nothing")

    def decode(self, tokens, forced_experts=None):
        raise Unsupported("this backend runs nothing")


def _second_sequence(array: np.ndarray, replace) -> np.ndarray:
    array = np.array(array, np.float64)
    if array.shape[0] > 1:
        array[1] = replace(array[1])
    return array


class SecondSequenceGarbage(Wrapper):
    """Sequence 1 of every batch replaced by noise of its own scale: logits and block outputs."""

    def damage(self, output):
        rng = np.random.default_rng(0)

        def noise(row):
            return rng.standard_normal(row.shape) * row.std()

        return StepOutput(_second_sequence(output.logits, noise),
                          tuple(_second_sequence(h, noise) for h in output.hidden), output.experts)


class SecondSequenceNaN(Wrapper):
    """Sequence 1 of every batch NaN: logits and block outputs."""

    def damage(self, output):
        def nan(row):
            return np.full_like(row, np.nan)

        return StepOutput(_second_sequence(output.logits, nan), tuple(_second_sequence(h, nan) for h in output.hidden),
                          output.experts)


class NoGroupLimit(Wrapper):
    """Routes over every expert group: topk_group taken as n_group."""

    def inner_config(self, config):
        return config.replace(n_limited_groups=config.n_expert_groups)


class HardCodedTheta(Wrapper):
    """rope_theta fixed at 10000 whatever the config says."""

    def inner_config(self, config):
        return config.replace(rope_theta=10000.0)


def _backend(name: str, runner, quantization: str | None = None) -> Backend:
    return Backend(name, runner, default_dtype="float64", dtypes=("float64", "float32"), quantization=quantization,
                   description=(runner.__doc__ or "").splitlines()[0])


FAITHFUL = _backend("faithful", Wrapper)
NO_MTP = _backend("no-mtp", NoMTP)
NOTHING = _backend("nothing", Nothing)
GARBAGE = _backend("second-sequence-garbage", SecondSequenceGarbage)
NAN = _backend("second-sequence-nan", SecondSequenceNaN)
NO_GROUP_LIMIT = _backend("no-group-limit", NoGroupLimit)
HARD_CODED_THETA = _backend("hard-coded-theta", HardCodedTheta)


class NoDecode:
    """A runner that is not one: it has prefill but no decode."""

    def __init__(self, config, weights, numerics, dtype, attention_form):
        self.config = config

    def prefill(self, tokens, forced_experts=None, capacity=None):
        raise AssertionError("never called: the harness refuses this runner first")


NO_DECODE = _backend("no-decode", NoDecode)
MISDECLARED = Backend("misdeclared", Wrapper, default_dtype="float16", dtypes="float32", attention_forms=("flash",))


class Sharpened(Wrapper):
    """Logits multiplied by 1.25 (a softmax scale applied twice, say): every next-token distribution too sharp."""

    def damage(self, output):
        return StepOutput(np.asarray(output.logits) * 1.25, output.hidden, output.experts)


def _quantized(name: str, runner) -> Backend:
    """Declares q8_0 weights: its logits are judged as next-token distributions under `quant.q8_0`."""
    return _backend(name, runner, quantization="q8_0")


QUANTIZED_FAITHFUL = _quantized("quantized-faithful", Wrapper)
QUANTIZED_GARBAGE = _quantized("quantized-second-sequence-garbage", SecondSequenceGarbage)
QUANTIZED_NAN = _quantized("quantized-second-sequence-nan", SecondSequenceNaN)
QUANTIZED_SHARPENED = _quantized("quantized-sharpened", Sharpened)
QUANTIZED_NO_GROUP_LIMIT = _quantized("quantized-no-group-limit", NoGroupLimit)
