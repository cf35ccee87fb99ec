"""Config reading and validation. Expected values come from SEMANTICS.md section 1 (the released config)."""

from __future__ import annotations

import json
import re

import pytest

from dsv3_conformance.format.config import (ConfigError, deepseek_v3_671b, from_dict, from_hf_dict, from_official_dict,
                                            load_config, preset, tiny, to_hf_dict, to_official_dict)
from dsv3_conformance.reference.moe import normalizes_topk
from dsv3_conformance.reference.rope import yarn_active

# inference/configs/config_671B.json of the official repository (SEMANTICS.md section 1, official column).
OFFICIAL_671B = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                 "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                 "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                 "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                 "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}


def test_released_671b_config_matches_spec_table():
    config = deepseek_v3_671b()
    expected = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                    n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                    n_limited_groups=4, route_scale=2.5, score_func="sigmoid", q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                    n_mtp_layers=1, fp8_weights=True, gate_bias=True)
    assert {key: getattr(config, key) for key in expected} == expected
    yarn = config.rope_scaling
    assert (yarn.factor, yarn.beta_fast, yarn.beta_slow, yarn.mscale, yarn.mscale_all_dim, yarn.original_seq_len) == (
        40, 32, 1, 1.0, 1.0, 4096)
    assert yarn_active(config) and normalizes_topk(config)
    assert config.unknown_fields == ()


def test_official_form_describes_the_same_model():
    official = from_official_dict(OFFICIAL_671B)
    hf = deepseek_v3_671b()
    same = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
            "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups", "route_scale",
            "score_func", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "v_head_dim", "fp8_weights", "gate_bias",
            "rope_scaling")
    assert {k: getattr(official, k) for k in same} == {k: getattr(hf, k) for k in same}
    assert from_dict(OFFICIAL_671B) == official


# The fields of the official inference/model.py ModelArgs (commit 9b4e978), max_batch_size aside.
OFFICIAL_MODEL_ARGS = {"max_seq_len", "dtype", "scale_fmt", "vocab_size", "dim", "inter_dim", "moe_inter_dim",
                       "n_layers", "n_dense_layers", "n_heads", "n_routed_experts", "n_shared_experts",
                       "n_activated_experts", "n_expert_groups", "n_limited_groups", "score_func", "route_scale",
                       "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                       "original_seq_len", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale"}


def test_official_round_trip():
    official = from_official_dict(OFFICIAL_671B)
    raw = to_official_dict(official)
    assert set(raw) == OFFICIAL_MODEL_ARGS
    assert {key: raw[key] for key in OFFICIAL_671B} == OFFICIAL_671B
    assert from_official_dict(raw) == official
    unscaled = tiny(rope_scaling=None, max_seq_len=8192)  # longer than the official default context 4096
    assert not yarn_active(from_official_dict(to_official_dict(unscaled)))


def test_hf_round_trip():
    for config in (deepseek_v3_671b(), tiny(), preset("tiny-v2"), preset("tiny-fp8")):
        again = from_hf_dict(to_hf_dict(config), name=config.name)
        assert again == config


def test_null_q_lora_softmax_without_bias_and_yarn_off():
    raw = to_hf_dict(tiny())
    raw.update(q_lora_rank=None, scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
               rope_scaling=None)
    config = from_hf_dict(raw)
    assert config.q_lora_rank == 0 and not config.gate_bias and not normalizes_topk(config)
    assert config.rope_scaling is None and not yarn_active(config)


def test_yarn_only_when_run_is_longer_than_trained_context():
    config = tiny()
    assert yarn_active(config)
    assert not yarn_active(config.replace(max_seq_len=config.rope_scaling.original_seq_len))


def test_unknown_fields_are_refused_unless_allowed():
    raw = to_hf_dict(tiny())
    raw.update(my_flag=True, zeta=3)
    with pytest.raises(ConfigError, match="unknown config field\\(s\\) my_flag, zeta"):
        from_hf_dict(raw)
    config = from_hf_dict(raw, allow_fields=("my_flag", "zeta"))
    assert config.unknown_fields == ("my_flag", "zeta")
    assert to_hf_dict(config)["zeta"] == 3
    with pytest.raises(ConfigError, match="unknown config field\\(s\\) zeta"):
        from_official_dict({**OFFICIAL_671B, "zeta": 3})


def test_every_problem_is_reported_at_once():
    raw = to_hf_dict(tiny())
    raw.update(hidden_act="gelu", moe_layer_freq=2, topk_group=5, my_flag=True)
    with pytest.raises(ConfigError, match="unknown config field"):
        from_hf_dict(raw)
    del raw["my_flag"]
    with pytest.raises(ConfigError) as raised:
        from_hf_dict(raw)
    assert "hidden_act" in str(raised.value) and "moe_layer_freq" in str(raised.value)


def _hf5(**rope):
    """A transformers-5 config.json: theta and YaRN in rope_parameters, no topk_method or scoring_func."""
    raw = to_hf_dict(tiny())
    for legacy in ("rope_scaling", "rope_theta", "topk_method", "scoring_func"):
        raw.pop(legacy)
    raw.update(transformers_version="5.25.0", num_key_value_heads=128, head_dim=8, rope_interleave=True,
               rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 40.0,
                                "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 1.0, **rope})
    return raw


def test_transformers_5_form_reads_theta_and_yarn_from_rope_parameters():
    config = from_hf_dict(_hf5())
    assert config.rope_theta == 500.0 and config.rope_scaling == tiny().rope_scaling
    assert config.score_func == "sigmoid" and config.gate_bias  # what transformers' model always does
    assert config.replace(rope_theta=tiny().rope_theta) == tiny().replace(name="")
    assert from_hf_dict(_hf5(rope_type="default")).rope_scaling is None


@pytest.mark.parametrize("rope, message", [
    (dict(mscale_all_dim=0.5), "mscale=1.0 and mscale_all_dim=0.5"),
    (dict(truncate=False), "truncate=false is not supported"),
    (dict(attention_factor=1.2), "attention_factor is not supported"),
    (dict(original_max_position_embeddings=64), "transformers applies YaRN, the official code does not"),
    (dict(rope_type="llama3"), 'type "llama3" is not supported'),
    (dict(low_freq_factor=1), "rope_parameters has unknown field(s) low_freq_factor"),
])
def test_rope_parameters_that_change_the_model_are_refused(rope, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_dict(_hf5(**rope))


def test_rope_theta_given_twice_must_agree():
    with pytest.raises(ConfigError, match="rope_theta 10000.0 and rope_parameters.rope_theta 500.0 disagree"):
        from_hf_dict({**_hf5(), "rope_theta": 10000.0})


def test_omitted_fields_take_transformers_defaults():
    """HF_DEFAULTS against the installed transformers' DeepseekV3Config (an independent source)."""
    transformers = pytest.importorskip("transformers")
    from dsv3_conformance.format.config import HF_DEFAULTS

    theirs = transformers.DeepseekV3Config()
    for field, value in HF_DEFAULTS.items():
        if field == "rope_theta":
            assert theirs.rope_parameters["rope_theta"] == value
        elif hasattr(theirs, field):
            assert getattr(theirs, field) == value, field
    raw = _hf5()
    for field in ("first_k_dense_replace", "n_group", "topk_group", "n_shared_experts", "routed_scaling_factor"):
        del raw[field]
    config = from_hf_dict({**raw, "num_hidden_layers": 4, "n_routed_experts": 16})
    assert (config.n_dense_layers, config.n_expert_groups, config.n_limited_groups, config.n_shared_experts,
            config.route_scale) == (theirs.first_k_dense_replace, theirs.n_group, theirs.topk_group,
                                    theirs.n_shared_experts, theirs.routed_scaling_factor)


def test_every_field_transformers_saves_is_read_or_known_to_be_inert():
    transformers = pytest.importorskip("transformers")
    saved = transformers.DeepseekV3Config(**{key: value for key, value in _hf5().items()
                                             if key not in ("transformers_version",)}).to_dict()
    from_hf_dict(saved)


@pytest.mark.parametrize("change, message", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(num_experts_per_tok=7, topk_group=1), "num_experts_per_tok=7 is larger than the 2 experts reachable"),
    (dict(qk_head_dim=99), "qk_head_dim=99 is not qk_nope_head_dim + qk_rope_head_dim"),
    (dict(head_dim=16), "head_dim=16 must equal qk_rope_head_dim=8"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(scoring_func="relu"), 'unknown scoring_func "relu"'),
    (dict(hidden_size=0), "hidden_size must be a positive integer, found 0"),
    (dict(num_attention_heads=-4, num_key_value_heads=-4), "num_attention_heads must be a positive integer, found -4"),
    (dict(kv_lora_rank=2.5), "kv_lora_rank must be an integer, found 2.5"),
    (dict(hidden_size="4"), 'hidden_size must be an integer, found "4"'),
    (dict(routed_scaling_factor="abc"), 'routed_scaling_factor must be a finite number, found "abc"'),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number, found NaN"),
    (dict(rope_scaling=[1, 2]), "rope_scaling must be an object or null, found [1, 2]"),
    (dict(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 32,
                        "mscale": float("nan")}), "rope_scaling.mscale must be a finite number, found NaN"),
    (dict(rope_scaling={"type": "yarn", "factor": "40", "original_max_position_embeddings": 32}),
     'rope_scaling.factor must be a finite number, found "40"'),
    (dict(quantization_config="fp8"), 'quantization_config must be an object or null, found "fp8"'),
    (dict(norm_topk_prob="yes"), 'norm_topk_prob must be true or false, found "yes"'),
    (dict(topk_group=5), "topk_group=5 exceeds n_group=4"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9 exceeds num_hidden_layers=2"),
    (dict(num_key_value_heads=1), "num_key_value_heads=1 differs from num_attention_heads=4"),
    (dict(rope_interleave=False), "rope_interleave=false is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 32, "mscale": 1.0}),
     "mscale=1.0 and mscale_all_dim=0.0 (absent: 1 and 0) differ"),
    (dict(topk_method="magic"), 'unknown topk_method "magic"'),
    (dict(topk_method="greedy"), 'topk_method "greedy" with n_group=4 is ambiguous'),
    (dict(norm_topk_prob=False), 'norm_topk_prob=false with scoring_func "sigmoid"'),
    (dict(moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
    (dict(hidden_act="gelu"), 'hidden_act "gelu" is not supported'),
    (dict(rope_scaling={"type": "linear", "factor": 2}), 'rope_scaling type "linear" is not supported'),
    (dict(routed_scaling_factor=-1), "routed_scaling_factor must be positive, found -1.0"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}),
     "weight_block_size [64, 64] is not supported"),
    (dict(num_hidden_layers=10**9, first_k_dense_replace=1), "num_hidden_layers=1000000000 exceeds this harness's "
                                                              "bound of 1,024 (61 released)"),
    (dict(n_routed_experts=10**8, n_group=1, topk_group=1), "n_routed_experts=100000000 exceeds this harness's bound"),
    (dict(max_position_embeddings=10**9), "max_position_embeddings=1000000000 exceeds this harness's bound"),
])
def test_invalid_configs_are_rejected_with_the_field_named(change, message):
    raw = to_hf_dict(tiny())
    raw.update(change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_dict(raw)


def test_official_form_messages_use_official_names():
    with pytest.raises(ConfigError, match=re.escape("dim must be a positive integer, found 0")):
        from_official_dict({**OFFICIAL_671B, "dim": 0})
    with pytest.raises(ConfigError, match=re.escape('rope_factor must be a finite number, found "x"')):
        from_official_dict({**OFFICIAL_671B, "rope_factor": "x"})


def test_missing_required_fields_are_listed():
    raw = to_hf_dict(tiny())
    del raw["hidden_size"], raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="lacks required field\\(s\\): hidden_size, kv_lora_rank"):
        from_hf_dict(raw)


def test_group_of_one_expert_cannot_take_a_top2_score():
    raw = to_hf_dict(tiny())
    raw.update(n_routed_experts=4, n_group=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match="groups of 1 expert cannot be scored by their top-2 sum"):
        from_hf_dict(raw)


def test_bad_files_name_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_config(tmp_path / "list.json")
    raw = to_hf_dict(tiny())
    raw["n_group"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: n_routed_experts=8 is not divisible"):
        load_config(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
