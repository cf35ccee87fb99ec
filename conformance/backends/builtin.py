"""The built-in backends: the NumPy reference (`reference`), the TensorFlow implementation (`tf`) and its
expert-parallel variant (`tf-ep`), each a `Backend` whose runner wraps that implementation's model. Each
implementation is imported only when its runner is made (TensorFlow only for the tf backends)."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends.interface import (Backend, MTPStep, Routing, Runner, StepOutput, Trainer, TrainStep,
                                                 Unsupported)
from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.numerics import AttentionForm, Numerics
from dsv3_conformance.format.weights import ModelWeights


class ReferenceRunner(Runner):
    def __init__(self, config: ModelConfig, weights: ModelWeights, numerics: Numerics, dtype: str,
                 attention_form: AttentionForm):
        from dsv3_conformance.reference.model import Transformer

        self.config = config
        self.model = Transformer(config, weights, numerics, np.dtype(dtype), attention_form)

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
                 attention_form: AttentionForm, expert_devices: int = 0):
        """`expert_devices` > 0: every MoE block expert-parallel over that many logical CPU devices."""
        from dsv3_conformance.impl.model import Transformer

        mesh = None
        if expert_devices:
            from dsv3_conformance.impl.devices import expert_mesh

            mesh = expert_mesh(expert_devices)
        self.config = config
        self.model = Transformer(config, weights, numerics, dtype, attention_form, expert_mesh=mesh)

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
        from dsv3_conformance.impl.training import Trainer as Steps

        self.trainer = Steps(config, weights, settings, dtype=dtype)

    def step(self, tokens: np.ndarray) -> TrainStep:
        out = self.trainer.step(tokens)
        return TrainStep({part: float(out[part]) for part in ("main", "mtp", "balance")},
                         self.trainer.gradient_tree(out["gradients"]), np.asarray(out["loads"]), out["learning_rate"])

    def weights(self) -> ModelWeights:
        from dsv3_conformance.impl.training import export

        return export(self.trainer)


# Devices of the expert-parallel variant of the tf backend (logical CPUs unless the process configured others).
EXPERT_PARALLEL_DEVICES = 4


def _tf_expert_parallel_runner(config, weights, numerics, dtype, attention_form) -> Runner:
    return TFRunner(config, weights, numerics, dtype, attention_form, expert_devices=EXPERT_PARALLEL_DEVICES)


def _modules(package: str, **roles: str) -> dict[str, str]:
    """role -> the module of `package` that plays it."""
    return {role: f"{package}.{module}" for role, module in roles.items()}


_REFERENCE_PACKAGE, _TF_PACKAGE = "dsv3_conformance.reference", "dsv3_conformance.impl"
REFERENCE = Backend(
    "reference", ReferenceRunner, f"{_REFERENCE_PACKAGE}.components", default_dtype="float64",
    dtypes=("float64", "float32"),
    mutation_targets=_modules(_REFERENCE_PACKAGE, moe="moe", rope="rope", attention="attention", fp8="fp8",
                              norm="norm", model="model", mtp="mtp", ffn="ffn"),
    description="NumPy reference (reference/), float64 by default")


def _tf_release() -> None:
    """The compiled programs the tf backend caches by config and weight structure."""
    import gc

    from dsv3_conformance.impl.model import program

    program.cache_clear()
    gc.collect()


TF = Backend(
    "tf", TFRunner, f"{_TF_PACKAGE}.components", default_dtype="float32", dtypes=("float32", "bfloat16"),
    mutation_targets=_modules(_TF_PACKAGE, moe="moe", rope="rope", attention="attention", fp8="fp8", norm="layers",
                              model="model", mtp="mtp", ffn="layers", training="training", pipeline="pipeline",
                              ep="expert_parallel", kernel="matvec"),
    array_namespace="tensorflow.experimental.numpy", trainer=TFTrainer,
    capabilities=_modules(_TF_PACKAGE, **{"pipeline": "pipeline", "expert-parallel": "expert_parallel"}),
    release=_tf_release,
    description="TensorFlow implementation (impl/), XLA-compiled steps (the prefill a graph outside XLA), "
                "float32 by default")
TF_EXPERT_PARALLEL = Backend(
    "tf-ep", _tf_expert_parallel_runner, f"{_TF_PACKAGE}.components", default_dtype="float32", dtypes=("float32",),
    description=f"the tf backend with every MoE block expert-parallel over {EXPERT_PARALLEL_DEVICES} devices "
                "(impl/expert_parallel.py, DTensor); its steps run eagerly around the mesh")
BUILTIN = {backend.name: backend for backend in (REFERENCE, TF, TF_EXPERT_PARALLEL)}
# The suite's default: the two independent implementations (tf-ep is tf's math, distributed).
DEFAULT_BACKENDS = (REFERENCE.name, TF.name)


