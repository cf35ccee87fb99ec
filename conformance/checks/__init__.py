"""The suite's checks, registered by key (see registry.py); importing this package registers them all."""

from conformance.checks import cross, distributed, fp8, golden, model, mtp, oracle, routing, scale, training  # noqa: F401  (registration)
from conformance.checks.registry import CHECKS, SCALES, Check

__all__ = ["CHECKS", "SCALES", "Check"]
