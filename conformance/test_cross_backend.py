"""Each backend against the float64 reference on generated models, prefill and decode, on equal routing.

The candidate runs first and its expert choices are forced on the reference: in lower precision a near
tie may route a token differently, which is legitimate, and must neither fail the numerics comparison
nor hide a real difference. Routing itself is held by test_routing.py and the goldens. Models cover
q_lora 0 or not, sigmoid or softmax, 1 to 8 groups, strongly negative biases, YaRN on and off, fp8
weights, batches above 1, and prompts that end at the last positions of max_seq_len.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from conformance.backends import make_runner
from conformance.checks import expect_same_run
from conformance.strategies import model_examples, models, prompt_and_continuation
from reference.linear import Numerics


def _compare(backend, dtype, config, weights, data, numerics, policy_key):
    if backend == "reference" and dtype == "bfloat16":
        pytest.skip("the reference computes in float64 or float32")
    prompt, following = data.draw(prompt_and_continuation(config))
    expect_same_run(f"{backend} in {dtype} vs float64 reference on equal routing",
                    make_runner(backend, config, weights, numerics, dtype),
                    make_runner("reference", config, weights, numerics, "float64"), prompt, following, policy_key)


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
