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
from typing import Callable

import numpy as np

from reference.attention import AttentionForm
from reference.config import ModelConfig
from reference.linear import Numerics
from reference.model import Transformer
from reference.weights import ModelWeights

BACKENDS = ("reference",)
DEFAULT_DTYPE = {"reference": "float64", "tf": "float32"}


class BackendError(ValueError):
    """An unknown backend or a setting it cannot run."""


@dataclass(frozen=True)
class PrefillOutput:
    logits: np.ndarray  # [B, S, V]
    hidden: tuple[np.ndarray, ...]  # each block's output [B, S, dim]

    @property
    def logits_last(self) -> np.ndarray:
        return self.logits[:, -1]


class Runner(ABC):
    """One model on one backend, holding the cache of the current batch."""

    backend: str
    config: ModelConfig

    @abstractmethod
    def prefill(self, tokens: np.ndarray) -> PrefillOutput:
        """Start a new batch with prompt tokens [B, S]."""

    @abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per sequence [B]; return the logits [B, V] after it."""

    def generate(self, prompt: np.ndarray, steps: int) -> np.ndarray:
        """Greedy continuation [B, steps]."""
        logits = self.prefill(prompt).logits_last
        generated = []
        for step in range(steps):
            token = np.argmax(logits, axis=-1)
            generated.append(token)
            if step + 1 < steps:
                logits = self.decode(token)
        return np.stack(generated, axis=1) if generated else np.zeros((len(prompt), 0), np.int64)


class ReferenceRunner(Runner):
    backend = "reference"

    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention: AttentionForm):
        self.config = config
        self.model = Transformer(config, weights, numerics, np.dtype(dtype), attention)
        self.caches = None

    def prefill(self, tokens: np.ndarray) -> PrefillOutput:
        result = self.model.prefill(tokens)
        self.caches = result.caches
        return PrefillOutput(result.logits, result.hidden)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self.caches is None:
            raise BackendError("decode called before prefill")
        result = self.model.decode(tokens, self.caches)
        self.caches = result.caches
        return result.logits_last


def _tf_runner(config, weights, numerics, dtype, attention) -> Runner:
    from impl.runner import TFRunner

    return TFRunner(config, weights, numerics, dtype, attention)


_FACTORIES: dict[str, Callable[..., Runner]] = {"reference": ReferenceRunner, "tf": _tf_runner}


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
