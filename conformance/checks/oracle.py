"""Each backend against the PyTorch oracle (transformers' DeepseekV3ForCausalLM, float32, CPU).

Both are fed the same weights; the oracle is forced to the backend's routing (see cross.py for why).
Configs the oracle implements differently from the official code are not generated here: each such
divergence is recorded in conformance/divergences.py and checked to still exist by the suite.
"""

from __future__ import annotations

from hypothesis import strategies as st

from dsv3_conformance.checks.cross import expect_same_run
from dsv3_conformance.checks.registry import check, examples
from dsv3_conformance.checks.strategies import model_examples, models, prompt_and_continuation


@check("oracle:transformers", "PyTorch oracle", needs_oracle=True)
@examples(model=models(oracle_compatible=True), data=st.data(), max_examples=model_examples())
def matches_the_transformers_oracle(backend, model, data):
    """The backend vs transformers DeepseekV3ForCausalLM (float32, CPU), on equal routing."""
    from dsv3_conformance.golden.oracle import OracleRunner

    config, weights = model
    prompt, following = data.draw(prompt_and_continuation(config, max_batch=2))
    expect_same_run(f"{backend.name} vs transformers DeepseekV3ForCausalLM (float32, CPU) on equal routing", backend,
                    backend.make_runner(config, weights), OracleRunner(config, weights), prompt, following,
                    "oracle.float32")
