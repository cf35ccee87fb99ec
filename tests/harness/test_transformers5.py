"""A checkpoint as transformers 5 saves it (theta and YaRN under `rope_parameters`, no `topk_method` or
`scoring_func`, its default `num_key_value_heads`, no MTP tensors) is read as transformers reads it: `generate`
gives transformers' own greedy tokens on both backends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [3, 5, 7, 9, 11, 2]
STEPS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=64, initializer_range=0.2,  # sharp attention: positions matter
        rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # correction biases away from zero, so that routing depends on them
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("hf5")
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False)[0, len(PROMPT):]
    return folder, expected.tolist()


def _generate(folder, backend, *extra):
    done = subprocess.run([sys.executable, "-m", "conformance", "generate", str(folder), "--backend", backend,
                           "--prompt", ",".join(map(str, PROMPT)), "--steps", str(STEPS), "--json", *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["generated"][0][-STEPS:], done.stderr


@pytest.mark.parametrize("backend", ["reference", "tf"])
def test_generate_gives_transformers_greedy_tokens(saved, backend):
    folder, expected = saved
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    tokens, stderr = _generate(folder, backend)
    assert tokens == expected
    assert stderr.count("no MTP tensors stored") == 1


def test_the_comparison_sees_rope_parameters(saved, tmp_path):
    """The same weights with the rope parameters dropped (the old reader's silent result) give other tokens."""
    folder, expected = saved
    raw = json.loads((folder / "config.json").read_text())
    del raw["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tokens, _ = _generate(folder, "reference", "--config", str(tmp_path / "config.json"))
    assert tokens != expected
