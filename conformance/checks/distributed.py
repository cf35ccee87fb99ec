"""The distributed parts of a backend that declares them (`Backend.capabilities`): the pipelined training step
against the micro-batches run in sequence (conformance/pipeline/execution.py), and the expert-parallel MoE layer
against one device (conformance/ep/properties.py). Each runs in a process of its own, which starts TensorFlow with
the logical devices it needs and carries the mutants planted here (isolated.py). The reference is their oracle."""

from __future__ import annotations

from dsv3_conformance.backends import REFERENCE, Unsupported
from dsv3_conformance.verdict import CheckFailed
from dsv3_conformance.checks.isolated import run_isolated
from dsv3_conformance.checks.registry import register

COMPONENT = "distributed"


def _needs(capability: str):
    def applies(backend) -> str | None:
        return "the reference is this check's oracle" if backend == REFERENCE else None

    def require(backend) -> None:
        if capability not in backend.capabilities:
            raise Unsupported(f"backend {backend.name} declares no {capability} (Backend.capabilities)", capability)
    return applies, require


_PIPELINE, _needs_pipeline = _needs("pipeline")
_EP, _needs_ep = _needs("expert-parallel")


def pipelined_step_equals_the_sequential_step(backend) -> None:
    """DualPipe, DualPipeV, 1F1B and ZB1P steps vs the sequential run: losses, outputs, stage gradients, and every
    weight gradient against its micro-batch and stage."""
    _needs_pipeline(backend)
    failed = [row for row in run_isolated("dsv3_conformance.pipeline.execution", backend) if row["status"] != "pass"]
    if failed:
        row = failed[0]
        raise CheckFailed(f"{len(failed)} comparison(s) failed; {row['method']} on {row['ranks']} ranks, "
                          f"{row['micro-batches']} micro-batches: {row['compared']}: {row['measured']}")


def expert_parallel_layer_equals_one_device(backend) -> None:
    """The expert-parallel MoE layer on 1, 2, 4 and 8 devices vs one device, forward and gradients (ep.float64)."""
    _needs_ep(backend)
    result = run_isolated("dsv3_conformance.ep.properties", backend, "--examples", "2")
    failures = {size: record["failure"] for size, record in result["properties"].items() if record["failure"]}
    if failures:
        size, detail = next(iter(failures.items()))
        raise CheckFailed(f"on {size} devices: {detail}")


register("pipeline:gradients", COMPONENT, pipelined_step_equals_the_sequential_step, applies=_PIPELINE)
register("ep:layer", COMPONENT, expert_parallel_layer_equals_one_device, applies=_EP)
