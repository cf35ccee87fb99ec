"""Multi-token prediction (SEMANTICS.md section 4): the modules against the reference, their cache, their
options, and greedy speculative decoding, which must return exactly the greedy tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from dsv3_conformance.backends import REFERENCE, Unsupported
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.weights import LinearWeight
from dsv3_conformance.backends import greedy
from dsv3_conformance.backends import speculative_generate
from dsv3_conformance.tolerances import tolerance
from dsv3_conformance.verdict import expect, expect_close, expect_equal, self_consistency_key
from dsv3_conformance.checks.cross import require_dtype
from dsv3_conformance.checks.registry import check, examples
from dsv3_conformance.checks.strategies import build_weights, configs, model_examples, models

COMPONENT = "multi-token prediction"


def _stream(data, config, length: int) -> np.ndarray:
    """A prompt followed by the D tokens after it, [B, length + D]."""
    batch = data.draw(st.integers(1, 2))
    seed = data.draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length + config.n_mtp_layers))


def _run_mtp(runner, stream: np.ndarray, length: int, options: MTPOptions = MTPOptions(), forced=None):
    main = runner.prefill(stream[:, :length], capacity=length + 1)
    return main, runner.mtp(stream[:, length:], options, forced)


@check("mtp:speculative-equals-greedy", COMPONENT)
@examples(model=models(mtp=True), data=st.data(), max_examples=model_examples())
def speculative_decoding_equals_greedy(backend, model, data):
    """Drafting with the MTP modules and verifying in one step returns exactly the greedy tokens."""
    config, weights = model
    length = data.draw(st.integers(1, config.max_seq_len // 2))
    depth = data.draw(st.integers(1, config.n_mtp_layers))
    # Steps whose every verification fits in max_seq_len even without rollback (see speculative.py).
    steps = data.draw(st.integers(1, min(10, (config.max_seq_len - length) // (depth + 1))))
    prompt = _stream(data, config, length)[:, :length]
    plain = greedy(backend.make_runner(config, weights), prompt, steps)
    drafted, stats = speculative_generate(backend.make_runner(config, weights), prompt, steps, depth)
    expect_equal(f"speculative decoding (depth {depth}, {stats.accepted}/{stats.drafted} drafts accepted) vs greedy "
                 f"decoding, {steps} tokens", drafted, plain)


@check("mtp:cross[float32]", COMPONENT)
@examples(model=models(mtp=True), data=st.data(), max_examples=model_examples())
def mtp_matches_the_reference(backend, model, data):
    """Every MTP depth's hidden states and logits over a prompt vs the float64 reference on equal routing."""
    require_dtype(backend, "float32")
    config, weights = model
    length = data.draw(st.integers(1, config.max_seq_len - config.n_mtp_layers - 1))
    stream = _stream(data, config, length)
    main, got = _run_mtp(backend.make_runner(config, weights, dtype="float32"), stream, length)
    if not got.experts or got.hidden is None:
        raise Unsupported(f"{backend.name} reports no chosen experts or no block outputs of its MTP modules, which "
                          "this comparison needs", "experts" if not got.experts else "hidden")
    reference = REFERENCE.make_runner(config, weights)
    reference.prefill(stream[:, :length], main.experts)
    wanted = reference.mtp(stream[:, length:], MTPOptions(), got.experts)
    for depth in range(config.n_mtp_layers):
        for what, a, b in (("hidden", got.hidden, wanted.hidden), ("logits", got.logits, wanted.logits)):
            expect_close(f"MTP depth {depth + 1} {what}, {length} positions", a[depth], b[depth], "cross.float32")


@check("mtp:incremental", COMPONENT)
@examples(model=models(mtp=True), data=st.data(), max_examples=model_examples())
def mtp_over_a_prompt_equals_mtp_step_by_step(backend, model, data):
    """The modules' own caches: all positions at once equal a short prompt followed by one position at a time."""
    config, weights = model
    depths = config.n_mtp_layers
    length = data.draw(st.integers(2, config.max_seq_len - depths - 1))
    split = data.draw(st.integers(1, length - 1))
    stream = _stream(data, config, length)
    _, whole = _run_mtp(backend.make_runner(config, weights), stream, length)
    runner = backend.make_runner(config, weights)
    runner.prefill(stream[:, :split], capacity=length + 1)
    steps = [runner.mtp(stream[:, split:split + depths])]
    for position in range(split, length):
        runner.decode(stream[:, position])
        steps.append(runner.mtp(stream[:, position + 1:position + 1 + depths]))
    for depth in range(depths):
        expect_close(f"MTP depth {depth + 1} logits: {length} positions at once vs {split} then one at a time",
                     np.concatenate([step.logits[depth] for step in steps], axis=1), whole.logits[depth],
                     self_consistency_key(backend.default_dtype))


def _swap_halves(module):
    weight = module.eh_proj.weight
    half = weight.shape[1] // 2
    return dataclasses.replace(module, eh_proj=LinearWeight(np.concatenate([weight[:, half:], weight[:, :half]], 1)))


def _zero_rows(module, token: np.ndarray):
    embed = module.embed.copy()
    embed[token] = 0
    return dataclasses.replace(module, embed=embed)


def _unit_head_norm(module):
    return dataclasses.replace(module, head_norm=np.ones_like(module.head_norm))


@st.composite
def _distinct_streams(draw, config, length):
    """One sequence whose tokens are all different, so that zeroing a token's embedding row zeroes one position."""
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).permutation(config.vocab_size)[None, : length + config.n_mtp_layers]


@check("mtp:options", COMPONENT)
@examples(config=configs(mtp=True), data=st.data(), max_examples=model_examples())
def options_mean_what_they_say(backend, config, data):
    """Each option equals the default on transformed weights, and differs from it on the original ones:
    hidden-first concatenation = swapped halves of eh_proj; zeroing position 0 = zero embedding rows of the
    first tokens; chaining the un-normed output = a unit shared_head.norm (with a negligible eps)."""
    config = config.replace(rms_norm_eps=1e-30)
    weights = build_weights(config, seed=data.draw(st.integers(0, 2**31 - 1)))
    length = data.draw(st.integers(2, min(config.vocab_size - config.n_mtp_layers, config.max_seq_len) - 2))
    stream = data.draw(_distinct_streams(config, length))
    key = self_consistency_key(backend.default_dtype)
    default = _run_mtp(backend.make_runner(config, weights), stream, length)[1].logits
    first = [stream[0, depth] for depth in range(1, config.n_mtp_layers + 1)]
    cases = [("hidden-first concatenation", MTPOptions(concat="hidden-first"), [_swap_halves(m) for m in weights.mtp]),
             ("zero embedding at position 0", MTPOptions(zero_first_position=True),
              [_zero_rows(m, t) for m, t in zip(weights.mtp, first)])]
    if config.n_mtp_layers > 1:
        cases.append(("un-normed chaining", MTPOptions(chain="unnormed"), [_unit_head_norm(weights.mtp[0]),
                                                                         *weights.mtp[1:]]))
    for what, options, modules in cases:
        with_option = _run_mtp(backend.make_runner(config, weights), stream, length, options)[1].logits
        transformed = dataclasses.replace(weights, mtp=tuple(modules))
        if what == "un-normed chaining":  # the transform alone must be neutral for the default
            default_transformed = _run_mtp(backend.make_runner(config, transformed), stream, length)[1].logits
            unnormed = _run_mtp(backend.make_runner(config, transformed), stream, length, options)[1].logits
            expect_close(f"{what} with a unit head norm vs normed chaining", np.concatenate(unnormed, 1),
                         np.concatenate(default_transformed, 1), key)
        else:
            equivalent = _run_mtp(backend.make_runner(config, transformed), stream, length)[1].logits
            expect_close(f"{what} vs the default on transformed weights", np.concatenate(with_option, 1),
                         np.concatenate(equivalent, 1), key)
        difference = np.abs(np.concatenate(with_option, 1) - np.concatenate(default, 1)).max()
        expect(difference > tolerance(key).value, f"{what}: the option changes nothing (max difference {difference:.2e})")
