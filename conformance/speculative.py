"""Greedy speculative decoding over any runner with MTP modules (SEMANTICS.md section 4).

The MTP modules draft the next `depth` tokens after the greedy choice; the main model verifies the choice
and every draft in one forward step and keeps the drafts it would have chosen itself; the runner rolls
back the rest. The tokens returned are exactly those of greedy decoding (`runners.greedy`): the suite
checks it on generated configs, prompts and depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends import Runner
from .format.inputs import InputError
from .format.mtp import MTPOptions


@dataclass(frozen=True)
class SpeculativeStats:
    generated: int  # tokens per sequence
    main_steps: int  # forward steps of the main model: the prefill and one per verification
    drafted: int  # drafts proposed per sequence
    accepted: int  # drafts kept per sequence
    accepted_by_depth: tuple[int, ...] = ()  # drafts kept at each draft position (1st, 2nd, ...)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def steps_per_token(self) -> float:
        return self.main_steps / self.generated if self.generated else 0.0


def speculative_generate(runner: Runner, prompt: np.ndarray, steps: int, depth: int,
                         options: MTPOptions = MTPOptions()) -> tuple[np.ndarray, SpeculativeStats]:
    """Greedy continuation [B, steps] drafted `depth` tokens at a time by the MTP modules."""
    if steps < 0 or depth < 1:
        raise InputError(f"steps must be >= 0 and the draft depth >= 1, found {steps} and {depth}")
    if depth > runner.config.n_mtp_layers:
        raise InputError(f"a draft depth of {depth} needs {depth} MTP modules, the config has "
                         f"num_nextn_predict_layers={runner.config.n_mtp_layers}")
    # Room for every position a generation could feed, rolled back or not (a runner that failed to roll back
    # then computes wrong tokens instead of running out of cache).
    capacity = min(runner.config.max_seq_len, prompt.shape[1] + max(steps, 1) * (depth + 1))
    logits = runner.prefill(prompt, capacity=capacity).logits_last
    generated = [np.argmax(logits, axis=-1)[:, None]]
    main_steps, drafted, accepted = 1, 0, 0
    by_depth = np.zeros(depth, np.int64)
    while sum(part.shape[1] for part in generated) < steps:
        following = generated[-1][:, -1]
        drafts = runner.mtp(following[:, None], options).drafts[:, :depth]
        tokens, kept = runner.verify(following, drafts)
        generated.append(tokens)
        main_steps, drafted, accepted = main_steps + 1, drafted + depth, accepted + kept
        by_depth[:kept] += 1
    tokens = np.concatenate(generated, axis=1)[:, :steps] if steps else np.zeros((len(prompt), 0), np.int64)
    return tokens, SpeculativeStats(steps, main_steps if steps else 0, drafted, accepted, tuple(int(a) for a in by_depth))


# --- in the report ----------------------------------------------------------------------------------------

REPORT_STEPS = 16


def report_section(golden_dir, backends: list[str], out):
    """Speculative decoding on every golden case with MTP modules: acceptance and main steps per token."""
    from .backends import Unsupported, resolve_backend
    from .golden import GoldenCase
    from .manifest import case_dirs
    from .report import Section
    from .runners import greedy

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
             "tests/test_mtp.py.")
    return Section("Multi-token prediction", intro, rows)
