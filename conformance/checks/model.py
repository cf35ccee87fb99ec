"""Properties of the whole forward pass on generated configs (SEMANTICS.md section 2).

naive == absorbed attention; prefill logits == step-by-step decode logits; batch rows independent.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.verdict import expect_close, self_consistency_key
from dsv3_conformance.checks.registry import check, examples
from dsv3_conformance.checks.strategies import model_examples, models, token_batches

COMPONENT = "attention and cache"


@check("properties:naive-absorbed", COMPONENT)
@examples(model=models(), data=st.data(), max_examples=model_examples(), requires=dict(attention_form="naive"))
def naive_attention_equals_absorbed(backend, model, data):
    """Naive MLA (latents expanded per head) and absorbed MLA give the same logits."""
    config, weights = model
    tokens = data.draw(token_batches(config))
    absorbed = backend.make_runner(config, weights, attention_form="absorbed").prefill(tokens)
    naive = backend.make_runner(config, weights, attention_form="naive").prefill(tokens)
    expect_close("naive vs absorbed MLA, logits at every position", naive.logits, absorbed.logits,
                 _policy(backend))


def _policy(backend, gemm_impl: str = "bf16") -> str:
    """Two evaluations on one backend: its self-consistency bound, or for quantized weights (whose kernels may
    round activations differently for a batch and for one token) its quantization policy."""
    return f"quant.{backend.quantization}" if backend.quantization else self_consistency_key(backend.default_dtype,
                                                                                               gemm_impl)


def _prefill_vs_decode(backend, config, weights, tokens, numerics):
    full = backend.make_runner(config, weights, numerics).prefill(tokens).logits
    split = tokens.shape[1] // 2 or 1
    runner = backend.make_runner(config, weights, numerics)
    stepped = [runner.prefill(tokens[:, :split]).logits]
    stepped += [runner.decode(tokens[:, t]).logits for t in range(split, tokens.shape[1])]
    expect_close(f"prefill of {tokens.shape[1]} tokens vs prefill of {split} then one-token decodes, all logits",
                 np.concatenate(stepped, axis=1), full, _policy(backend, numerics.gemm_impl))


@check("properties:prefill-decode", COMPONENT)
@examples(model=models(), data=st.data(), max_examples=model_examples())
def prefill_equals_stepwise_decode(backend, model, data):
    """Logits of one prefill equal those of a shorter prefill followed by one-token decode steps."""
    config, weights = model
    _prefill_vs_decode(backend, config, weights, data.draw(token_batches(config)), Numerics())


@check("properties:prefill-decode-fp8", COMPONENT)
@examples(model=models(fp8_weights=True, fp8_aligned=True), data=st.data(), max_examples=model_examples(),
          requires=dict(gemm_impl="fp8"))
def prefill_equals_stepwise_decode_fp8_activations(backend, model, data):
    """Activation quantization is per token, so caching must not change it either."""
    config, weights = model
    tokens = data.draw(token_batches(config, max_batch=2, max_len=12))
    _prefill_vs_decode(backend, config, weights, tokens, Numerics("fp8", data.draw(st.sampled_from([None, "ue8m0"]))))


@check("properties:batch-rows", COMPONENT)
@examples(model=models(), data=st.data(), max_examples=model_examples())
def batch_rows_are_independent(backend, model, data):
    """A sequence's logits do not depend on the other sequences of its batch."""
    config, weights = model
    tokens = data.draw(token_batches(config, max_batch=3))
    batched = backend.make_runner(config, weights).prefill(tokens).logits
    row = data.draw(st.integers(0, len(tokens) - 1))
    alone = backend.make_runner(config, weights).prefill(tokens[row:row + 1]).logits
    expect_close(f"row {row} of a batch of {len(tokens)} vs the same row alone", batched[row:row + 1], alone,
                 _policy(backend))
