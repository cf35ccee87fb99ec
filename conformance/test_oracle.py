"""The PyTorch oracle (transformers' DeepseekV3ForCausalLM, float32, CPU) against each backend.

Both are fed the same weights; the oracle is forced to the backend's routing (see test_cross_backend.py
for why). Configs the oracle implements differently from the official code are not compared: each such
divergence is recorded in conformance/divergences.py, and checked here to still exist.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conformance.backends import make_runner
from conformance.checks import expect_same_run
from conformance.divergences import DIVERGENCES
from conformance.metrics import rel_err
from conformance.strategies import build_weights, model_examples, models, prompt_and_continuation
from conformance.tolerances import tolerance

pytest.importorskip("torch", reason="the PyTorch oracle needs the oracle extra: pip install -e '.[oracle]'")
pytest.importorskip("transformers", reason="the PyTorch oracle needs the oracle extra: pip install -e '.[oracle]'")
pytestmark = pytest.mark.oracle

from conformance.oracle import OracleRunner  # noqa: E402  (after the skip: it imports torch lazily anyway)


@settings(max_examples=model_examples())
@given(model=models(oracle_compatible=True), data=st.data())
def test_backend_matches_the_transformers_oracle(backend, model, data):
    config, weights = model
    prompt, following = data.draw(prompt_and_continuation(config, max_batch=2))
    expect_same_run(f"{backend} vs transformers DeepseekV3ForCausalLM (float32, CPU) on equal routing",
                    make_runner(backend, config, weights), OracleRunner(config, weights), prompt, following,
                    "oracle.float32")


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d.example], ids=lambda d: d.key)
def test_known_divergence_still_exists(divergence):
    """A recorded divergence must still show; if it no longer does, its record is out of date."""
    config = divergence.example()
    weights = build_weights(config, seed=11)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    official = make_runner("reference", config, weights).prefill(prompt).logits
    oracle = OracleRunner(config, weights, accept_divergences=True).prefill(prompt).logits
    error = rel_err(oracle, official)
    assert error > tolerance("oracle.float32").value, (
        f"divergence {divergence.key} is no longer observed (rel_err {error:.2e}): update conformance/divergences.py")


def test_oracle_refuses_diverging_configs():
    from conformance.oracle import OracleUnavailable
    from reference.config import tiny_v2

    config = tiny_v2()
    with pytest.raises(OracleUnavailable, match="hf-ignores-scoring-func, hf-assumes-correction-bias"):
        OracleRunner(config, build_weights(config, seed=0))
