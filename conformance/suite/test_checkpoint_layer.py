"""`--scale full --checkpoint PATH [--layer N]`: one layer of a real checkpoint, backend vs reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dsv3_conformance.backends import REFERENCE
from dsv3_conformance.checks.cross import expect_same_run
from dsv3_conformance.checks.scale import prompt_for
from dsv3_conformance.format.checkpoint import load_weights, open_checkpoint
from dsv3_conformance.format.config import load_config
from dsv3_conformance.format.weights import ModelWeights


@pytest.mark.full
def test_real_checkpoint_layer(backend, request):
    """One layer of a real checkpoint (`--checkpoint PATH`, `--layer N`), vocabulary cut to its first 1024 rows."""
    path = request.config.getoption("--checkpoint")
    if not path:
        pytest.skip("give a checkpoint folder with --checkpoint PATH")
    if backend.name == REFERENCE.name:
        pytest.skip("compares a backend against the reference")
    config = load_config(path)
    layer = request.config.getoption("--layer")
    layer = config.n_dense_layers if layer is None else layer
    vocab = min(1024, config.vocab_size)
    with open_checkpoint(path) as checkpoint:
        full = load_weights(checkpoint, config, layers=[layer], progress=True)
        weights = ModelWeights(embed=np.array(full.embed[:vocab]), layers=full.layers, norm=full.norm,
                               head=np.array(full.head[:vocab]))
        one_layer = dataclasses.replace(config, n_layers=1, n_dense_layers=int(layer < config.n_dense_layers),
                                        n_mtp_layers=0, vocab_size=vocab, name=f"{config.name} layer {layer}")
        prompt, following = prompt_for(one_layer, batch=1, length=16)
        expect_same_run(f"{backend.name} on layer {layer} of {path}", backend, backend.make_runner(one_layer, weights),
                        REFERENCE.make_runner(one_layer, weights), prompt, following, "cross.float32")
