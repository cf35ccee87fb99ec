"""A checkpoint as transformers 5 saves it (theta and YaRN under `rope_parameters`, no `topk_method` or
`scoring_func`, its default `num_key_value_heads`, no MTP tensors) is read as transformers reads it: `generate`
gives transformers' own greedy tokens on both backends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_models import save_tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [3, 5, 7, 9, 11, 2]
STEPS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf5")
    model = save_tiny_hf(folder)
    with torch.no_grad():
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False)[0, len(PROMPT):]
    return folder, expected.tolist()


def _generate(folder, backend, *extra):
    done = subprocess.run([sys.executable, "-m", "dsv3_conformance", "generate", str(folder), "--backend", backend,
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


def test_transformers_eager_attention_loses_the_keys_of_a_saved_small_model(saved):
    """A divergence of transformers (docs/checkpoints.md), checked to still exist: DeepseekV3Attention takes
    num_key_value_groups = num_attention_heads // num_key_value_heads, and save_pretrained writes the default
    num_key_value_heads (128) for any model, so with 2 heads eager attention repeats the keys 0 times and fails;
    its default (sdpa) attention runs."""
    folder, expected = saved
    eager = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert eager.config.num_key_value_heads == 128 and eager.model.layers[0].self_attn.num_key_value_groups == 0
    with pytest.raises(RuntimeError, match="must match the size"), torch.no_grad():
        eager(torch.tensor([PROMPT]))
