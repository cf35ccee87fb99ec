"""Backends: the interface every implementation is checked through, the built-in ones, finding one by name, and
generation over any runner. The public names are these; a user's backend needs only them."""

from dsv3_conformance.backends.builtin import (BUILTIN, DEFAULT_BACKENDS, EXPERT_PARALLEL_DEVICES, REFERENCE, TF,
                                               TF_EXPERT_PARALLEL)
from dsv3_conformance.backends.generation import NonFiniteOutput, SpeculativeStats, greedy, speculative_generate
from dsv3_conformance.backends.interface import (COMPONENT_NAMES, Backend, BackendError, MTPStep, Routing, Runner,
                                                 StepOutput, Trainer, TrainStep, Unsupported)
from dsv3_conformance.backends.lookup import ENTRY_POINT_GROUP, resolve_backend, resolve_backends

__all__ = ["BUILTIN", "COMPONENT_NAMES", "DEFAULT_BACKENDS", "ENTRY_POINT_GROUP", "EXPERT_PARALLEL_DEVICES",
           "REFERENCE", "TF", "TF_EXPERT_PARALLEL", "Backend", "BackendError", "MTPStep", "NonFiniteOutput",
           "Routing", "Runner", "SpeculativeStats", "StepOutput", "TrainStep", "Trainer", "Unsupported", "greedy",
           "resolve_backend", "resolve_backends", "speculative_generate"]
