"""The runners of the built-in backends, and greedy generation over any runner."""

from __future__ import annotations

import numpy as np

from .backends import MTPStep, Routing, Runner, StepOutput, Trainer, TrainStep, Unsupported
from .format.config import ModelConfig
from .format.inputs import InputError
from .format.mtp import MTPOptions
from .format.numerics import AttentionForm, Numerics
from .format.weights import ModelWeights


class NonFiniteOutput(RuntimeError):
    """A backend produced NaN or Inf logits from valid, finite inputs."""


class ReferenceRunner(Runner):
    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention: AttentionForm):
        from reference.model import Transformer

        self.config = config
        self.model = Transformer(config, weights, numerics, np.dtype(dtype), attention)

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None, capacity: int | None = None) -> StepOutput:
        result = self.model.prefill(tokens, forced_experts)
        return StepOutput(result.logits, result.hidden, result.experts)

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        result = self.model.decode(tokens, forced_experts)
        return StepOutput(result.logits, result.hidden, result.experts)

    def mtp(self, following: np.ndarray, options: MTPOptions = MTPOptions(), forced_experts: Routing = None) -> MTPStep:
        result = self.model.mtp(following, options, forced_experts)
        return MTPStep(result.hidden, result.logits, result.experts, result.drafts)

    def verify(self, following: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, int]:
        return self.model.verify(following, drafts)


class TFRunner(Runner):
    """The TensorFlow implementation (impl/), imported on first use. It routes by itself."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention: AttentionForm, expert_devices: int = 0):
        """`expert_devices` > 0: every MoE block expert-parallel over that many logical CPU devices."""
        from impl.model import Transformer

        mesh = None
        if expert_devices:
            from impl.devices import expert_mesh

            mesh = expert_mesh(expert_devices)
        self.config = config
        self.model = Transformer(config, weights, numerics, dtype, attention, expert_mesh=mesh)

    @staticmethod
    def _step(result, forced_experts: Routing) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("the tf backend routes by itself: forced routing is a reference-only input",
                              "forced-routing")
        return StepOutput(*result)

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None, capacity: int | None = None) -> StepOutput:
        return self._step(self.model.prefill(tokens, capacity), forced_experts)

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        return self._step(self.model.decode(tokens), forced_experts)

    def mtp(self, following: np.ndarray, options: MTPOptions = MTPOptions(), forced_experts: Routing = None) -> MTPStep:
        if forced_experts is not None:
            raise Unsupported("the tf backend routes by itself: forced routing is a reference-only input",
                              "forced-routing")
        return MTPStep(*self.model.mtp(following, options))

    def verify(self, following: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, int]:
        return self.model.verify(following, drafts)


class TFTrainer(Trainer):
    """The TensorFlow training step (impl/training.py)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, settings, dtype: str):
        from impl.training import Trainer as Steps

        self.trainer = Steps(config, weights, settings, dtype=dtype)

    def step(self, tokens: np.ndarray) -> TrainStep:
        out = self.trainer.step(tokens)
        return TrainStep({part: float(out[part]) for part in ("main", "mtp", "balance")},
                         self.trainer.gradient_tree(out["gradients"]), np.asarray(out["loads"]), out["learning_rate"])

    def weights(self) -> ModelWeights:
        from impl.training import export

        return export(self.trainer)


def _finite(logits: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(logits).all():
        bad = int(np.count_nonzero(~np.isfinite(logits)))
        raise NonFiniteOutput(f"{bad} non-finite logit(s) {where}")
    return logits


def greedy(runner: Runner, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy continuation [B, steps]; NonFiniteOutput if any logits it chooses from are not finite."""
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    logits = _finite(runner.prefill(prompt, capacity=prompt.shape[1] + max(steps - 1, 0)).logits_last,
                     "after the prompt")
    generated = []
    for step in range(steps):
        token = np.argmax(logits, axis=-1)
        generated.append(token)
        if step + 1 < steps:
            logits = _finite(runner.decode(token).logits_last, f"at decode step {step}")
    return np.stack(generated, axis=1) if generated else np.zeros((len(prompt), 0), np.int64)
