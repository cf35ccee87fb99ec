"""The torchtitan adapter (the `torchtitan` extra): the model torchtitan builds holds the harness's weights where its
own Hugging Face state-dict adapter puts them; its logits differ from the official code by its recorded precision
and eps alone; its MTP logits differ by feeding the module the hidden state before the final norm, and by that alone
(conformance/golden/divergences.py, torchtitan-*)."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3_conformance.golden.cases import GoldenCase
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.paths import GOLDEN_DIR

torch = pytest.importorskip("torch", reason="the oracle extra")
pytest.importorskip("torchtitan", reason="the torchtitan extra")
from dsv3_conformance.adapters.torchtitan.runner import TorchTitanRunner  # noqa: E402

MTP_CASE = GOLDEN_DIR / "official" / "v3-tiny-mtp"


@pytest.fixture(scope="module")
def case():
    return GoldenCase.load(MTP_CASE)


def test_the_loaded_model_holds_the_weights_where_they_belong(case):
    model = TorchTitanRunner(case.config, case.weights(), "exact").model
    moe = case.weights().layers[1].ffn
    np.testing.assert_array_equal(model.layers["1"].moe.routed_experts.inner_experts.w2_EDF[5].detach().numpy(),
                                  moe.experts[5].down_proj.weight)
    np.testing.assert_array_equal(model.layers["1"].moe.expert_bias_E.numpy(), moe.gate.bias)
    np.testing.assert_array_equal(model.mtp_layers[0].eh_proj.weight.detach().numpy(), case.weights().mtp[0].eh_proj.weight)


def test_main_logits_differ_by_the_bfloat16_experts_and_otherwise_by_the_eps_alone(case):
    """As torchtitan runs (bfloat16 routed experts) the logits move by 1e-3 and more; with float32 products they are
    the official code's to 2e-5, the size of its eps of 1e-5 against the release's 1e-6."""
    tensors = case.files[0].tensors
    prompt, expected = tensors["tokens.prompt"], tensors["prefill.logits_last"]
    default = TorchTitanRunner(case.config, case.weights()).prefill(prompt).logits_last
    exact = TorchTitanRunner(case.config, case.weights(), "exact").prefill(prompt).logits_last
    assert rel_err(default, expected) > 1e-3
    assert rel_err(exact, expected) < 2e-5


def test_the_mtp_module_is_fed_the_hidden_state_before_the_final_norm(case):
    """torchtitan's own MTP logits are off by 0.14; the same modules fed the normed hidden state match the official
    case to float32 rounding."""
    from torchtitan.models.deepseek_v3.mtp import roll_mtp_sequence

    tensors = case.files[0].tensors
    runner = TorchTitanRunner(case.config, case.weights(), "exact")
    prompt, following = tensors["tokens.prompt"], tensors["tokens.decoded"][:, :1]
    runner.prefill(prompt)
    assert rel_err(runner.mtp(following).logits[0], tensors["mtp.0.logits"]) > 0.1
    model, ids = runner.model, torch.from_numpy(np.concatenate([prompt, following], axis=1))
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    masks = model.get_attention_masks(positions)
    with torch.no_grad():
        hidden = model.tok_embeddings(ids)
        for layer in model.layers.values():
            hidden = layer(hidden, masks, positions)
        shifted, valid = roll_mtp_sequence(ids, shift=1, positions=positions, fill_value=0, return_valid_mask=True)
        normed = model.mtp_layers[0](model.tok_embeddings(shifted), model.norm(hidden), valid, masks, positions)
        logits = model.lm_head(normed)[:, : prompt.shape[1]].numpy()
    assert rel_err(logits, tensors["mtp.0.logits"]) < 2e-5
