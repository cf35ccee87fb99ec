"""Properties of the whole forward pass on generated configs, for each backend.

naive == absorbed attention; prefill logits == step-by-step decode logits; batch rows independent.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from conformance.backends import DEFAULT_DTYPE, make_runner
from conformance.checks import expect_close, self_consistency_key
from conformance.strategies import model_examples, models, token_batches
from reference.linear import Numerics


@settings(max_examples=model_examples())
@given(model=models(), data=st.data())
def test_naive_attention_equals_absorbed(backend, model, data):
    config, weights = model
    tokens = data.draw(token_batches(config))
    absorbed = make_runner(backend, config, weights).prefill(tokens)
    naive = make_runner(backend, config, weights, attention="naive").prefill(tokens)
    expect_close("naive vs absorbed MLA, logits at every position", naive.logits, absorbed.logits,
                 self_consistency_key(DEFAULT_DTYPE[backend]))


def _prefill_vs_decode(backend, config, weights, tokens, numerics):
    full = make_runner(backend, config, weights, numerics).prefill(tokens).logits
    split = tokens.shape[1] // 2 or 1
    runner = make_runner(backend, config, weights, numerics)
    stepped = [runner.prefill(tokens[:, :split]).logits]
    stepped += [runner.decode(tokens[:, t]).logits for t in range(split, tokens.shape[1])]
    expect_close(f"prefill of {tokens.shape[1]} tokens vs prefill of {split} then one-token decodes, all logits",
                 np.concatenate(stepped, axis=1), full, self_consistency_key(DEFAULT_DTYPE[backend], numerics.gemm_impl))


@settings(max_examples=model_examples())
@given(model=models(), data=st.data())
def test_prefill_equals_stepwise_decode(backend, model, data):
    config, weights = model
    _prefill_vs_decode(backend, config, weights, data.draw(token_batches(config)), Numerics())


@settings(max_examples=model_examples())
@given(model=models(fp8_weights=True, fp8_aligned=True), data=st.data())
def test_prefill_equals_stepwise_decode_fp8_activations(backend, model, data):
    """Activation quantization is per token, so caching must not change it either."""
    config, weights = model
    tokens = data.draw(token_batches(config, max_batch=2, max_len=12))
    _prefill_vs_decode(backend, config, weights, tokens, Numerics("fp8", data.draw(st.sampled_from([None, "ue8m0"]))))


@settings(max_examples=model_examples())
@given(model=models(), data=st.data())
def test_batch_rows_are_independent(backend, model, data):
    config, weights = model
    tokens = data.draw(token_batches(config, max_batch=3))
    batched = make_runner(backend, config, weights).prefill(tokens).logits
    row = data.draw(st.integers(0, len(tokens) - 1))
    alone = make_runner(backend, config, weights).prefill(tokens[row:row + 1]).logits
    expect_close(f"row {row} of a batch of {len(tokens)} vs the same row alone", batched[row:row + 1], alone,
                 self_consistency_key(DEFAULT_DTYPE[backend]))
