"""Generation over any runner: greedy decoding, and greedy speculative decoding with the MTP modules
(SEMANTICS.md section 4).

Greedy decoding refuses non-finite logits (`NonFiniteOutput`: a backend's failure, reported as such). In
speculative decoding the MTP modules draft the next `depth` tokens after the greedy choice; the main model
verifies the choice and every draft in one forward step and keeps the drafts it would have chosen itself; the
runner rolls back the rest. The tokens returned are exactly those of greedy decoding: the suite checks it on
generated configs, prompts and depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv3_conformance.backends.interface import Runner
from dsv3_conformance.format.inputs import InputError
from dsv3_conformance.format.mtp import MTPOptions


class NonFiniteOutput(RuntimeError):
    """A backend produced NaN or Inf logits from valid, finite inputs."""


def _finite(logits: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(logits).all():
        bad = int(np.count_nonzero(~np.isfinite(logits)))
        raise NonFiniteOutput(f"{bad} non-finite logit(s) {where}")
    return logits


def greedy(runner: Runner, prompt: np.ndarray, steps: int, capacity: int | None = None) -> np.ndarray:
    """Greedy continuation [B, steps]; NonFiniteOutput if any logits it chooses from are not finite. `capacity`:
    positions to size the caches for (default: what the generation reaches)."""
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    capacity = capacity or prompt.shape[1] + max(steps - 1, 0)
    logits = _finite(runner.prefill(prompt, capacity=capacity).logits_last, "after the prompt")
    generated = []
    for step in range(steps):
        token = np.argmax(logits, axis=-1)
        generated.append(token)
        if step + 1 < steps:
            logits = _finite(runner.decode(token).logits_last, f"at decode step {step}")
    return np.stack(generated, axis=1) if generated else np.zeros((len(prompt), 0), np.int64)


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
