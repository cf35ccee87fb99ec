"""The suite's checks, registered by key (see registry.py); importing this package registers them all."""

# Importing the check modules registers their checks.
from dsv3_conformance.checks import (  # noqa: F401
    cross, distributed, fp8, golden, model, mtp, oracle, quantization, routing, scale, training)
from dsv3_conformance.checks.registry import CHECKS, SCALES, Check

__all__ = ["CHECKS", "SCALES", "Check"]
