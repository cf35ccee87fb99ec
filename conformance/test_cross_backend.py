"""Each backend against the float64 reference on generated models, prefill and decode, on equal routing.

The candidate runs first and its expert choices are forced on the reference: in lower precision a near
tie may route a token differently, which is legitimate, and must neither fail the numerics comparison
nor hide a real difference. Routing itself is held by test_routing.py and the goldens. Models cover
q_lora 0 or not, sigmoid or softmax, 1 to 8 groups, strongly negative biases, YaRN on and off, fp8
weights, batches above 1, and prompts that end at the last positions of max_seq_len.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conformance.backends import make_runner
from conformance.checks import expect_close
from conformance.strategies import model_examples, models, token_batches
from reference.linear import Numerics

DECODE_STEPS = 2


def _compare(backend, dtype, config, weights, data, numerics, policy_key):
    if backend == "reference" and dtype == "bfloat16":
        pytest.skip("the reference computes in float64 or float32")
    near_end = data.draw(st.booleans(), label="prompt ends at max_seq_len")
    longest = config.max_seq_len - DECODE_STEPS
    prompt = data.draw(token_batches(config, max_batch=3, max_len=longest, min_len=longest if near_end else 1))
    following = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1))).integers(
        0, config.vocab_size, (len(prompt), DECODE_STEPS))
    candidate = make_runner(backend, config, weights, numerics, dtype)
    reference = make_runner("reference", config, weights, numerics, "float64")
    step = candidate.prefill(prompt)
    got, expected = [step.logits], [reference.prefill(prompt, step.experts).logits]
    for t in range(DECODE_STEPS):
        step = candidate.decode(following[:, t])
        got.append(step.logits)
        expected.append(reference.decode(following[:, t], step.experts).logits)
    expect_close(f"{backend} in {dtype} vs float64 reference on equal routing, logits of {prompt.shape[1]} prompt "
                 f"positions and {DECODE_STEPS} decode steps (batch {len(prompt)})",
                 np.concatenate(got, axis=1), np.concatenate(expected, axis=1), policy_key)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=model_examples())
@given(model=models(), data=st.data())
def test_matches_reference_on_dequantized_path(backend, dtype, model, data):
    config, weights = model
    _compare(backend, dtype, config, weights, data, Numerics(), f"cross.{dtype}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=model_examples())
@given(model=models(fp8_weights=True, fp8_aligned=True), data=st.data())
def test_matches_reference_on_fp8_activation_path(backend, dtype, model, data):
    config, weights = model
    numerics = Numerics("fp8", data.draw(st.sampled_from([None, "ue8m0"])))
    _compare(backend, dtype, config, weights, data, numerics, f"cross.fp8-path.{dtype}")
