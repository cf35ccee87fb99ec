"""The multi-token-prediction section of the report: greedy speculative decoding on every golden case with MTP
modules, on every backend, checked to return the greedy tokens, with its draft acceptance."""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends import Unsupported, greedy, resolve_backend, speculative_generate
from dsv3_conformance.golden.cases import GoldenCase
from dsv3_conformance.golden.manifest import case_dirs
from dsv3_conformance.report.section import Section

REPORT_STEPS = 16


def report_section(golden_dir, backends: list[str], out):
    """Speculative decoding on every golden case with MTP modules: acceptance and main steps per token."""
    rows = []
    for path in case_dirs(golden_dir):
        case = GoldenCase.load(path)
        if not case.config.n_mtp_layers:
            continue
        weights = case.weights()
        prompt = case.files[0].tensors["tokens.prompt"]
        steps = min(REPORT_STEPS, case.config.max_seq_len - prompt.shape[1] - case.config.n_mtp_layers)
        for spec in backends:
            backend = resolve_backend(spec)
            for depth in range(1, case.config.n_mtp_layers + 1):
                try:
                    tokens, stats = speculative_generate(backend.make_runner(case.config, weights), prompt, steps, depth)
                    plain = greedy(backend.make_runner(case.config, weights), prompt, steps)
                except Unsupported as reason:
                    rows.append({"case": case.name, "backend": backend.name, "depth": depth, "status": f"not run: {reason}"})
                    continue
                rows.append({"case": case.name, "backend": backend.name, "draft depth": depth,
                             "tokens": f"{len(prompt)} x {steps}", "drafted": stats.drafted, "accepted": stats.accepted,
                             "acceptance": f"{stats.acceptance:.1%}",
                             "main steps per token": f"{stats.steps_per_token:.2f}",
                             "status": "pass" if np.array_equal(tokens, plain) else "FAIL (differs from greedy)"})
    intro = ("Greedy speculative decoding with the MTP modules (SEMANTICS.md section 4): drafts verified by the main "
             "model in one step; the tokens must equal greedy decoding. Golden weights are random, so acceptance is "
             "near chance here. Options tested by the suite's mtp:options check: hidden-first concatenation, a zeroed embedding at "
             "position 0, un-normed chaining between depths; the loss normalisation (1/T or valid positions) by "
             "tests/harness/test_mtp.py.")
    return Section("Multi-token prediction", intro, rows)
