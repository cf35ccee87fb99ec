"""The training experiments, shortened for CI (the default sizes: `dsv3-conformance experiment NAME`): each runs
end to end, writes its JSON and plot, and records its claims and numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv3_conformance.studies import experiments


def test_the_corpus_is_the_standard_library_as_bytes():
    train, held_out = experiments.corpus(1 << 16)
    assert train.dtype == np.int32 and 0 <= train.min() and train.max() < 256
    assert len(held_out) > 0 and bytes(train[:64].astype(np.uint8)).isascii()


@pytest.mark.long
@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_each_experiment_runs_shortened(name, tmp_path):
    result = experiments.run(name, steps=2, out=tmp_path, **({"continuation": 8} if name == "mtp" else {}))
    saved = json.loads((tmp_path / f"experiment-{name}.json").read_text())
    assert (tmp_path / f"experiment-{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["steps"] == 2 and set(saved["summary"]) == set(result["summary"])
    for numbers in saved["summary"].values():
        assert all(np.isfinite(v) for v in numbers.values() if isinstance(v, float))
    if name == "balance":
        assert saved["seeds"] == [0, 1, 2]
        assert all(len(numbers["held-out loss"]["per seed"]) == 3 for numbers in saved["summary"].values())
    if name == "mtp":
        assert saved["claims"] == {"speculative decoding returns exactly the greedy tokens": True}
        for depth, measured in (("drafting 1", 1), ("drafting 2", 2)):
            rates = saved["speculative"][depth]["acceptance by depth"]
            assert len(rates) == measured and all(0.0 <= rate <= 1.0 for rate in rates)
            assert rates == sorted(rates, reverse=True)  # a draft is kept only after every draft before it


def test_every_correction_bias_starts_at_zero():
    weights = experiments._weights(experiments.model_config(2), seed=0)
    biases = [layer.ffn.gate.bias for layer in weights.layers] + [m.block.ffn.gate.bias for m in weights.mtp]
    assert len(biases) == 4 and all(np.array_equal(bias, np.zeros_like(bias)) for bias in biases)
