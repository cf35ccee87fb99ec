"""The interface every backend implements: what the harness checks, behind one record each.

A `Backend` bundles everything the suite needs from an implementation: a runner factory (a stateful
model: `prefill` starts a batch, `decode` feeds one more token per sequence, optionally the MTP modules),
its component functions (NumPy in and out: `route`, `to_e4m3`, `quantize_activation`, `fp8_gemm`), an
optional training step, the distributed capabilities it offers, and where the mutation catalogue may plant
bugs in it (module per role, and the array namespace those modules compute with). What a backend does not
implement it declares `Unsupported`: the harness then reports it as not compared, never as passed.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import ModelWeights
from dsv3_conformance.tolerances import POLICY

COMPONENT_NAMES = ("route", "to_e4m3", "quantize_activation", "fp8_gemm")
DTYPES = ("float32", "float64", "bfloat16")
GEMM_IMPLS = ("bf16", "fp8")
ATTENTION_FORMS = ("naive", "absorbed")
CAPABILITIES = ("pipeline", "expert-parallel")


class BackendError(BadInput):
    """A backend that cannot be found, or a setting that is not valid for any backend."""


class Unsupported(Exception):
    """The backend does not implement this setting (a dtype, a numerics path, a config feature).

    What it stops from running is not compared: the verdict is INCOMPLETE unless the user allows that part to
    be missing (conformance.verdict). `part` names it (verdict.PARTS) where the raiser knows; otherwise the
    harness names it by what it asked for.
    """

    def __init__(self, reason: str, part: str | None = None):
        super().__init__(reason)
        self.part = part


@dataclass(frozen=True)
class StepOutput:
    """What a prefill or decode step produced."""

    logits: np.ndarray  # [B, S, V]
    hidden: tuple[np.ndarray, ...] | None  # each block's output [B, S, dim]; None: the runner gives none
    experts: tuple[np.ndarray, ...]  # each MoE block's chosen experts [B*S, k]

    @property
    def logits_last(self) -> np.ndarray:
        return self.logits[:, -1]


@dataclass(frozen=True)
class MTPStep:
    """What the MTP modules produced over the new positions: per depth the block outputs before
    shared_head.norm [B, n, dim], the logits [B, n, V] and the chosen experts [B*n, k]; and the drafts
    [B, D], each depth's greedy token at the last position."""

    hidden: tuple[np.ndarray, ...] | None  # None: the runner gives none (not compared)
    logits: tuple[np.ndarray, ...]
    experts: tuple[np.ndarray, ...]
    drafts: np.ndarray


Routing = Sequence[np.ndarray] | None


@dataclass(frozen=True)
class TrainStep:
    """What one training step did: its losses (main, mtp, balance), the gradients before clipping (in the format
    layer's weight tree, zeros where a tensor is not trained), each MoE block's expert loads [blocks, E] (main
    layers, then MTP depths), and the learning rate it used."""

    losses: dict[str, float]
    gradients: ModelWeights
    loads: np.ndarray
    learning_rate: float


class Trainer(ABC):
    """A model and its optimizer state on one backend (the training checks' interface)."""

    @abstractmethod
    def step(self, tokens: np.ndarray) -> TrainStep:
        """One training step on tokens [B, S]: forward, losses, gradients, clipping, AdamW, the bias update."""

    @abstractmethod
    def weights(self) -> ModelWeights:
        """The current weights in the format layer's tree."""


class Runner(ABC):
    """One model on one backend, holding the cache of the current batch."""

    config: ModelConfig

    @abstractmethod
    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None, capacity: int | None = None) -> StepOutput:
        """Start a new batch with prompt tokens [B, S].

        `forced_experts` (one [B*S, k] array per MoE block) replaces the routing choice; runners that
        cannot take it raise `Unsupported`. `capacity`: positions the batch will reach in all, so a cache
        may be sized by it (default max_position_embeddings).
        """

    @abstractmethod
    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        """Feed one token per sequence [B] (or q of them, [B, q]) after the cached ones."""

    def mtp(self, following: np.ndarray, options: MTPOptions = MTPOptions(),
            forced_experts: Routing = None) -> MTPStep:
        """Run the MTP modules over the main positions they have not seen yet.

        `following` [B, j]: the tokens after the last fed one (j >= 1; the greedy choice, or known tokens);
        depths beyond j read the drafts of the depths before them. `forced_experts`: one array per depth.
        """
        raise Unsupported(f"{type(self).__name__} has no MTP modules", "mtp")

    def verify(self, following: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, int]:
        """Feed `following` [B] and `drafts` [B, d] in one forward step; keep the accepted drafts.

        Returns the new tokens [B, a+1] (a accepted drafts, then the main model's own next token) and a;
        the rejected positions are rolled back out of every cache.
        """
        raise Unsupported(f"{type(self).__name__} cannot verify drafted tokens", "speculative")


@dataclass(frozen=True)
class Backend:
    """Everything the harness needs to check one implementation."""

    name: str
    # (config, weights, numerics, dtype, attention_form) -> Runner
    runner: Callable[[ModelConfig, ModelWeights, Numerics, str, AttentionForm], Runner]
    # module path, or any object, holding the functions named in COMPONENT_NAMES (missing ones: Unsupported)
    components: str | Any | None = None
    default_dtype: str = "float32"
    dtypes: tuple[str, ...] = ("float32",)
    gemm_impls: tuple[str, ...] = ("bf16", "fp8")  # numerics paths for fp8 weights (format/numerics.py)
    attention_forms: tuple[str, ...] = ("naive", "absorbed")
    # mutation catalogue: role ("moe", "rope", "attention", "fp8", "model") -> module path
    mutation_targets: Mapping[str, str] = field(default_factory=dict)
    # the NumPy-like namespace the target modules compute with (mutants that need array ops use it)
    array_namespace: str = "numpy"
    description: str = ""
    # (config, weights, TrainSettings, dtype) -> Trainer, for the training checks; None: no training step
    trainer: Callable[..., Trainer] | None = None
    # capability -> module implementing it for the distributed checks ("pipeline": a pipelined training step over
    # devices, impl.pipeline's interface; "expert-parallel": an expert-parallel MoE layer, impl.expert_parallel's)
    capabilities: Mapping[str, str] = field(default_factory=dict)
    # Drops what the backend keeps compiled across runners; called between the layers of a checkpoint stream,
    # whose one-block models are never run again (None: it keeps nothing).
    release: Callable[[], None] | None = None
    # The weight type of a backend that runs quantized weights (say "q4_k"): its logits are judged as next-token
    # distributions under the tolerance entry `quant.<type>` (TOLERANCES.md section 12), not by rel_err bounds.
    quantization: str | None = None

    def contract_problems(self) -> list[str]:
        """What this backend's declaration gets wrong (checked when a backend is loaded by name)."""
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append("name must be a non-empty string")
        if not callable(self.runner):
            problems.append("runner must be callable: (config, weights, numerics, dtype, attention_form) -> Runner")
        for what, values, known in (("dtypes", self.dtypes, DTYPES), ("gemm_impls", self.gemm_impls, GEMM_IMPLS),
                                    ("attention_forms", self.attention_forms, ATTENTION_FORMS)):
            if isinstance(values, str) or not set(values) <= set(known):
                problems.append(f"{what} {values!r} must be a tuple of {', '.join(known)}")
        if self.default_dtype not in self.dtypes:
            problems.append(f"default_dtype {self.default_dtype!r} is not among dtypes {self.dtypes!r}")
        if self.trainer is not None and not callable(self.trainer):
            problems.append("trainer must be callable or None")
        if self.release is not None and not callable(self.release):
            problems.append("release must be callable or None")
        if self.quantization is not None and f"quant.{self.quantization}" not in POLICY:
            problems.append(f"quantization {self.quantization!r} has no policy: expected one of "
                            f"{sorted(key[6:] for key in POLICY if key.startswith('quant.'))}")
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            problems.append(f"capabilities {unknown} unknown: expected {', '.join(CAPABILITIES)}")
        if not all(isinstance(module, str) for module in (*self.mutation_targets.values(),
                                                          *self.capabilities.values())):
            problems.append("mutation_targets and capabilities map names to module paths (strings)")
        return problems

    def require(self, dtype: str | None = None, gemm_impl: str | None = None,
                attention_form: str | None = None) -> None:
        """Raise Unsupported unless the backend runs this dtype, numerics path and attention form."""
        for what, value, supported in (("dtype", dtype, self.dtypes), ("gemm_impl", gemm_impl, self.gemm_impls),
                                       ("attention form", attention_form, self.attention_forms)):
            if value is not None and value not in supported:
                part = {"fp8": "fp8", "bf16": "dequantized"}.get(value, value) if what == "gemm_impl" else value
                raise Unsupported(f"backend {self.name} has no {what} {value} (it has {', '.join(supported)})", part)

    def make_runner(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics = Numerics(),
                    dtype: str | None = None, attention_form: AttentionForm | None = None) -> Runner:
        """A runner; by default in the backend's default dtype and its own attention form (absorbed where it has
        both: the form that serves, with its latent cache)."""
        dtype = dtype or self.default_dtype
        attention_form = attention_form or ("absorbed" if "absorbed" in self.attention_forms else
                                            self.attention_forms[0])
        self.require(dtype, numerics.gemm_impl if config.fp8_weights else None, attention_form)
        runner = self.runner(config, weights, numerics, dtype, attention_form)
        lacking = [name for name in ("prefill", "decode") if not callable(getattr(runner, name, None))]
        if lacking:
            raise BackendError(f"backend {self.name}: its runner {type(runner).__name__} has no {' or '.join(lacking)}"
                               " (a Runner, dsv3_conformance.backends.Runner, implements prefill and decode)")
        return runner

    def component(self, name: str) -> Callable:
        """One of the component functions (NumPy in and out)."""
        holder = importlib.import_module(self.components) if isinstance(self.components, str) else self.components
        function = getattr(holder, name, None)
        if function is None:
            raise Unsupported(f"backend {self.name} does not expose the component {name!r}", "components")
        return function

    @property
    def packages(self) -> tuple[str, ...]:
        """The packages of the mutation targets, where a planted function is replaced wherever held: the deepest
        package holding every target (dsv3_conformance.impl for the tf backend), else each target's top level."""
        parents = [(module.rpartition(".")[0] or module).split(".") for module in self.mutation_targets.values()]
        common = os.path.commonprefix(parents) if parents else []
        return (".".join(common),) if common else tuple(sorted({parent[0] for parent in parents}))

    def owns(self, module: str) -> bool:
        """Whether `module` lies in one of the backend's packages."""
        return any(module == package or module.startswith(f"{package}.") for package in self.packages)
