"""The backends the harness runs, behind one stateful runner interface.

A runner is built from a config and a weight tree; `prefill` starts a sequence batch, `decode` feeds one
more token per sequence. The TensorFlow backend is imported only when asked for (TensorFlow takes
seconds to import).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Sequence

import numpy as np

from reference.attention import AttentionForm
from reference.config import ModelConfig
from reference.linear import Numerics
from reference.model import Transformer
from reference.weights import ModelWeights

BACKENDS = ("reference", "tf")
DEFAULT_DTYPE = {"reference": "float64", "tf": "float32"}


class BackendError(ValueError):
    """An unknown backend or a setting it cannot run."""


@dataclass(frozen=True)
class StepOutput:
    """What a prefill or decode step produced."""

    logits: np.ndarray  # [B, S, V]
    hidden: tuple[np.ndarray, ...]  # each block's output [B, S, dim]
    experts: tuple[np.ndarray, ...]  # each MoE block's chosen experts [B*S, k]

    @property
    def logits_last(self) -> np.ndarray:
        return self.logits[:, -1]


Routing = Sequence[np.ndarray] | None


class Runner(ABC):
    """One model on one backend, holding the cache of the current batch."""

    backend: str
    config: ModelConfig

    @abstractmethod
    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        """Start a new batch with prompt tokens [B, S]."""

    @abstractmethod
    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        """Feed one token per sequence [B] after the cached ones."""

    def generate(self, prompt: np.ndarray, steps: int) -> np.ndarray:
        """Greedy continuation [B, steps]."""
        logits = self.prefill(prompt).logits_last
        generated = []
        for step in range(steps):
            token = np.argmax(logits, axis=-1)
            generated.append(token)
            if step + 1 < steps:
                logits = self.decode(token).logits_last
        return np.stack(generated, axis=1) if generated else np.zeros((len(prompt), 0), np.int64)


class ReferenceRunner(Runner):
    backend = "reference"

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention: AttentionForm):
        self.config = config
        self.model = Transformer(config, weights, numerics, np.dtype(dtype), attention)
        self.caches = None

    def _step(self, result) -> StepOutput:
        self.caches = result.caches
        return StepOutput(result.logits, result.hidden, result.experts)

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        return self._step(self.model.prefill(tokens, forced_experts))

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        if self.caches is None:
            raise BackendError("decode called before prefill")
        return self._step(self.model.decode(tokens, self.caches, forced_experts))


class TFRunner(Runner):
    """The TensorFlow implementation (impl/), imported on first use."""

    backend = "tf"

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention: AttentionForm):
        from impl.model import TFTransformer

        self.config = config
        self.model = TFTransformer(config, weights, numerics, dtype, attention)

    @staticmethod
    def _step(result, forced_experts: Routing) -> StepOutput:
        if forced_experts is not None:
            raise BackendError("the tf backend routes by itself: forced routing is a reference-only input")
        return StepOutput(*result)

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        return self._step(self.model.prefill(tokens), forced_experts)

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        return self._step(self.model.decode(tokens), forced_experts)


_FACTORIES: dict[str, Callable[..., Runner]] = {"reference": ReferenceRunner, "tf": TFRunner}


def make_runner(backend: str, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                dtype: str | None = None, attention: AttentionForm = "absorbed") -> Runner:
    if backend not in _FACTORIES:
        raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return _FACTORIES[backend](config, weights, numerics, dtype or DEFAULT_DTYPE[backend], attention)



_COMPONENTS = {"reference": "reference.components", "tf": "impl.numpy_api"}


def components(backend: str) -> ModuleType:
    """The backend's component functions, NumPy in and out, under the names of `reference.components`."""
    if backend not in _COMPONENTS:
        raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return importlib.import_module(_COMPONENTS[backend])
