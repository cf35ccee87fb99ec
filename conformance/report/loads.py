"""Expert load on the golden prompts: tokens per expert per MoE layer when the reference runs them (the report's
figure, and the loads the expert-parallel placement is planned from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_conformance.backends import REFERENCE
from dsv3_conformance.golden.cases import GoldenCase

LOAD_CASES = ("official/v3-tiny", "oracle/moe-groups")


def expert_loads(golden_dir: Path) -> dict[str, np.ndarray]:
    """Tokens per expert per MoE layer when the reference runs each load case's prompt and decoded tokens."""
    loads = {}
    for case_path in LOAD_CASES:
        case = GoldenCase.load(golden_dir / case_path)
        runner = REFERENCE.make_runner(case.config, case.weights())
        expected = case.files[0].tensors
        steps = [runner.prefill(expected["tokens.prompt"]).experts]
        steps += [runner.decode(token).experts for token in expected.get("tokens.decoded", np.zeros((0, 0))).T]
        counts = np.zeros((len(steps[0]), case.config.n_routed_experts), np.int64)
        for experts in steps:
            for layer, chosen in enumerate(experts):
                counts[layer] += np.bincount(chosen.ravel(), minlength=case.config.n_routed_experts)
        loads[f"{case.name} (k={case.config.n_activated_experts})"] = counts
    return loads
