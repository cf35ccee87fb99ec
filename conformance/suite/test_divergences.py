"""Recorded divergences (conformance/golden/divergences.py) of the transformers oracle, llama.cpp, mlx-lm and
torchtitan still exist.

Configs the oracle implements differently from the official code are not compared for equality; each
such divergence is recorded, and checked here to still show.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dsv3_conformance.backends import REFERENCE
from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.golden.divergences import DIVERGENCES, LLAMA_CPP, MLX_LM, TORCHTITAN
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.tolerances import tolerance

pytest.importorskip("torch", reason="the PyTorch oracle needs the oracle extra: pip install -e '.[oracle]'")
pytest.importorskip("transformers", reason="the PyTorch oracle needs the oracle extra: pip install -e '.[oracle]'")
pytestmark = pytest.mark.oracle

from dsv3_conformance.golden.oracle import OracleRunner  # noqa: E402  (after the skip: it imports torch lazily anyway)

MODULE = "dsv3_conformance.suite.test_divergences"


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d.example], ids=lambda d: d.key)
def test_known_divergence_still_exists(divergence):
    """A recorded divergence must still show; if it no longer does, its record is out of date. transformers is run
    as the oracle; llama.cpp (the llamacpp extra) in float32 with a float32 KV cache, mlx-lm (the mlxlm extra) in
    float32, where a model either cannot load shows the divergence too, and torchtitan (the torchtitan extra)."""
    config = divergence.example()
    weights = build_weights(config, seed=11)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    official = REFERENCE.make_runner(config, weights).prefill(prompt).logits
    if divergence.source == LLAMA_CPP:
        pytest.importorskip("llama_cpp", reason="llama.cpp needs the llamacpp extra: pip install -e '.[llamacpp]'")
        from dsv3_conformance.adapters.llamacpp.runner import LlamaCppRunner

        try:  # the adapter declares these models Unsupported: load them anyway, to see that they still fail
            other = LlamaCppRunner(config, weights, "f32", "exact", refuse_known=False).prefill(prompt).logits
        except RuntimeError as refused:  # the adapter: llama.cpp refused the file
            assert "llama.cpp refused" in str(refused)
            return
    elif divergence.source == TORCHTITAN:
        pytest.importorskip("torchtitan", reason="the torchtitan extra: pip install -e '.[torchtitan]'")
        # In a process of its own: torchtitan's triton cannot share one with TensorFlow (the adapter refuses).
        code = f"from {MODULE} import torchtitan_error; print(torchtitan_error({divergence.key!r}))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        error = float(done.stdout.split()[-1])
        assert error > tolerance("oracle.float32").value, f"divergence {divergence.key} is no longer observed"
        return
    elif divergence.source == MLX_LM:
        pytest.importorskip("mlx_lm", reason="mlx-lm needs the mlxlm extra: pip install -e '.[mlxlm]'")
        from dsv3_conformance.adapters.mlxlm.runner import MLXRunner

        try:  # the adapter declares these models Unsupported: build them anyway, to see that they still fail
            other = MLXRunner(config, weights, refuse_known=False).prefill(prompt).logits
        except (AssertionError, ZeroDivisionError):  # mlx-lm refuses or cannot build the model
            return
    else:
        other = OracleRunner(config, weights, accept_divergences=True).prefill(prompt).logits
    error = rel_err(other, official)
    assert error > tolerance("oracle.float32").value, (
        f"divergence {divergence.key} is no longer observed (rel_err {error:.2e}): update "
        "conformance/golden/divergences.py")


def torchtitan_error(key: str) -> float:
    """rel_err of torchtitan against the reference on divergence `key`'s example (its MTP logits where it has MTP
    modules); inf where torchtitan cannot load the model at all."""
    from dsv3_conformance.adapters.torchtitan.runner import TorchTitanRunner

    divergence = next(d for d in DIVERGENCES if d.key == key)
    config = divergence.example()
    weights = build_weights(config, seed=11)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    # Its bfloat16 experts are a divergence of their own: the others are shown with float32 products.
    settings = "default" if key == "torchtitan-experts-in-bfloat16" else "exact"
    try:  # the adapter declares some models Unsupported: load them anyway, to see that they still fail
        runner = TorchTitanRunner(config, weights, settings, refuse_known=False)
    except StopIteration:
        return float("inf")
    reference = REFERENCE.make_runner(config, weights)
    official, other = reference.prefill(prompt).logits, runner.prefill(prompt).logits
    if config.n_mtp_layers:  # the MTP modules' logits over the prompt, given the tokens after it
        following = np.random.default_rng(1).integers(0, config.vocab_size, (2, config.n_mtp_layers))
        official, other = reference.mtp(following).logits[0], runner.mtp(following).logits[0]
    return rel_err(other, official)


def test_oracle_refuses_diverging_configs():
    from dsv3_conformance.format.config import tiny_v2
    from dsv3_conformance.golden.oracle import OracleUnavailable

    config = tiny_v2()
    with pytest.raises(OracleUnavailable, match="hf-ignores-scoring-func, hf-assumes-correction-bias"):
        OracleRunner(config, build_weights(config, seed=0))
