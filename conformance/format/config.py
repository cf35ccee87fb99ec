"""Model configuration shared by every backend.

One frozen `ModelConfig` holds the official semantics (DeepSeek-V3 `inference/model.py` ModelArgs names).
It is read from a Hugging Face `config.json` or from the official `inference/configs/*.json` form, and
validated so that a config the model cannot run is rejected with the offending fields named.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.fp8 import BLOCK
from dsv3_conformance.format.jsonfile import read_json

ScoreFunc = Literal["sigmoid", "softmax"]

class ConfigError(BadInput):
    """A config that cannot describe a runnable DeepSeek-V3 model."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope extension (report section 4.3; HF `rope_scaling` with type yarn)."""

    factor: float
    original_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    # HF-only field; the official code scales attention by `mscale` alone (SEMANTICS.md section 2).
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3-family model. Field names follow the official `ModelArgs`."""

    vocab_size: int
    dim: int
    inter_dim: int
    moe_inter_dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    score_func: ScoreFunc
    route_scale: float
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_seq_len: int
    gate_bias: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    rope_scaling: YarnScaling | None = None
    n_mtp_layers: int = 0
    fp8_weights: bool = False
    scale_fmt: Literal["ue8m0"] | None = None
    name: str = ""
    extra_fields: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # How the user's file spells each field (our name -> theirs), for messages; our names by default.
    spelling: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        validate(self)

    def spelled(self, name: str) -> str:
        """The field `name` as the user's config file writes it."""
        return self.spelling.get(name, name)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        return tuple(sorted(self.extra_fields))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class _Problems:
    """Every problem of a config, reported together in one ConfigError."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def require(self, condition: bool, message: str) -> bool:
        if not condition:
            self.found.append(message)
        return bool(condition)

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(self.found[0])
        if self.found:
            raise ConfigError(f"{len(self.found)} problems: " + "; ".join(self.found))


def show(value: Any) -> str:
    """A value as the user wrote it in JSON: "4" (a string) is not 4 (a number)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# Upper bounds, checked before anything is allocated. Each is far above the released model (in brackets)
# and keeps the memory a config can ask for finite: a config is refused, never allowed to hang or exhaust memory.
LIMITS = {
    "vocab_size": (1 << 22, "129,280 released"),
    "dim": (1 << 16, "7,168 released"),
    "inter_dim": (1 << 18, "18,432 released"),
    "moe_inter_dim": (1 << 18, "2,048 released"),
    "n_layers": (1024, "61 released"),
    "n_heads": (1024, "128 released"),
    "n_routed_experts": (1 << 13, "256 released"),
    "n_shared_experts": (64, "1 released"),
    "q_lora_rank": (1 << 16, "1,536 released"),
    "kv_lora_rank": (1 << 16, "512 released"),
    "qk_nope_head_dim": (4096, "128 released"),
    "qk_rope_head_dim": (4096, "64 released"),
    "v_head_dim": (4096, "128 released"),
    "max_seq_len": (1 << 24, "163,840 released"),
    "n_mtp_layers": (16, "1 released"),
}
_POSITIVE = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
             "n_activated_experts", "n_expert_groups", "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim",
             "qk_rope_head_dim", "v_head_dim", "max_seq_len")
_NON_NEGATIVE = ("q_lora_rank", "n_shared_experts", "n_dense_layers", "n_mtp_layers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: ModelConfig) -> None:
    """Raise ConfigError naming the fields (as the user's file spells them) when `config` cannot be run."""
    n = config.spelled
    problems = _Problems()
    _require = problems.require
    for name in _POSITIVE + _NON_NEGATIVE:
        value, floor = getattr(config, name), 1 if name in _POSITIVE else 0
        if _require(_is_int(value) and value >= floor,
                    f"{n(name)} must be {'a positive' if floor else 'a non-negative'} integer, found {show(value)}") \
                and name in LIMITS:
            bound, reason = LIMITS[name]
            _require(value <= bound, f"{n(name)}={value} exceeds this harness's bound of {bound:,} ({reason})")
    for name in ("route_scale", "rms_norm_eps", "rope_theta"):
        _require(_is_number(getattr(config, name)), f"{n(name)} must be a finite number, found "
                                                     f"{show(getattr(config, name))}")
    problems.raise_any()  # the relations below need every number to be one
    _require(config.n_dense_layers <= config.n_layers,
             f"{n('n_dense_layers')}={config.n_dense_layers} exceeds {n('n_layers')}={config.n_layers}")
    _require(config.score_func in ("sigmoid", "softmax"),
             f"unknown {n('score_func')} {show(config.score_func)}: expected \"sigmoid\" or \"softmax\"")
    _require(config.qk_rope_head_dim % 2 == 0,
             f"{n('qk_rope_head_dim')}={config.qk_rope_head_dim} must be even: rope rotates pairs of elements")
    _require(config.n_routed_experts % config.n_expert_groups == 0,
             f"{n('n_routed_experts')}={config.n_routed_experts} is not divisible by "
             f"{n('n_expert_groups')}={config.n_expert_groups}")
    _require(config.n_limited_groups <= config.n_expert_groups,
             f"{n('n_limited_groups')}={config.n_limited_groups} exceeds {n('n_expert_groups')}="
             f"{config.n_expert_groups}")
    reachable = config.n_limited_groups * config.experts_per_group
    _require(config.n_activated_experts <= reachable,
             f"{n('n_activated_experts')}={config.n_activated_experts} is larger than the {reachable} experts "
             f"reachable in {n('n_limited_groups')}={config.n_limited_groups} groups of {config.experts_per_group}")
    if config.gate_bias and config.n_expert_groups > 1:
        _require(config.experts_per_group >= 2,
                 f"groups of {config.experts_per_group} expert cannot be scored by their top-2 sum "
                 f"({n('n_routed_experts')}={config.n_routed_experts}, {n('n_expert_groups')}="
                 f"{config.n_expert_groups})")
    _require(config.route_scale > 0, f"{n('route_scale')} must be positive, found {show(config.route_scale)}")
    _require(config.rms_norm_eps > 0, f"{n('rms_norm_eps')} must be positive, found {show(config.rms_norm_eps)}")
    _require(config.rope_theta > 1, f"{n('rope_theta')} must be greater than 1, found {show(config.rope_theta)}")
    _require(config.scale_fmt in (None, "ue8m0"),
             f"unknown {n('scale_fmt')} {show(config.scale_fmt)}: expected \"ue8m0\" or none")
    yarn = config.rope_scaling
    if yarn is not None:
        numbers = [_require(_is_number(getattr(yarn, name)), f"{n('rope_scaling.' + name)} must be a finite "
                            f"number, found {show(getattr(yarn, name))}")
                   for name in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")]
        if not all(numbers):
            problems.raise_any()
        _require(yarn.factor >= 1, f"{n('rope_scaling.factor')} must be >= 1, found {show(yarn.factor)}")
        _require(_is_int(yarn.original_seq_len) and yarn.original_seq_len > 0,
                 f"{n('rope_scaling.original_seq_len')} must be a positive integer, found "
                 f"{show(yarn.original_seq_len)}")
        _require(yarn.beta_fast > yarn.beta_slow > 0,
                 f"{n('rope_scaling.beta_fast')} > {n('rope_scaling.beta_slow')} > 0 is needed, found "
                 f"{show(yarn.beta_fast)} and {show(yarn.beta_slow)}")
    problems.raise_any()


# --- raw JSON fields: their types, checked before any conversion -------------------------------------------

_KINDS = {
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "number": (_is_number, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _check_types(raw: Mapping[str, Any], schema: Mapping[str, str], prefix: str = "",
                 problems: _Problems | None = None) -> None:
    """Every field of `raw` that `schema` names has its type; all problems are added to `problems` (raised
    at once when none is given)."""
    collected = problems or _Problems()
    for key, kind in schema.items():
        if key in raw:
            accepts, description = _KINDS[kind]
            collected.require(accepts(raw[key]), f"{prefix}{key} must be {description}, found {show(raw[key])}")
    if problems is None:
        collected.raise_any()


# --- Hugging Face config.json ----------------------------------------------------------------------
# Two forms: the released checkpoint's (transformers 4 and the remote code: `rope_theta` and `rope_scaling`,
# `topk_method`, `scoring_func`) and transformers 5's (`rope_parameters` holding the theta and YaRN; no
# `topk_method` or `scoring_func`: its model always routes by sigmoid with the correction bias, group-limited).
# A field the file omits takes transformers' `DeepseekV3Config` default (docs/checkpoints.md).

# HF field -> ModelConfig field, for fields that map one to one.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_seq_len",
    "num_nextn_predict_layers": "n_mtp_layers",
}
# transformers' DeepseekV3Config defaults (5.25; tests/harness/test_config.py compares them with the installed
# class), for the fields a file may omit; `topk_method` and `scoring_func` are what its model does.
HF_DEFAULTS = {"first_k_dense_replace": 3, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
               "scoring_func": "sigmoid", "topk_method": "noaux_tc", "routed_scaling_factor": 2.5,
               "q_lora_rank": 1536, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_nextn_predict_layers": 1,
               "norm_topk_prob": True, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
               "rope_interleave": True}
# Fields read by hand below (they need checks or conversion).
_HF_SPECIAL = {"q_lora_rank", "rope_theta", "rope_scaling", "rope_parameters", "topk_method", "norm_topk_prob",
               "quantization_config", "moe_layer_freq", "hidden_act", "num_key_value_heads", "tie_word_embeddings",
               "head_dim", "qk_head_dim", "scale_fmt", "attention_bias", "rope_interleave"}
# Fields of released and transformers-saved configs that do not change the forward pass.
_HF_IGNORED = {"architectures", "model_type", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
               "initializer_range", "attention_dropout", "pretraining_tp", "use_cache", "output_router_logits",
               "transformers_version", "torch_dtype", "dtype", "aux_loss_alpha", "seq_aux", "ep_size",
               "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
               "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
               "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "prefix",
               "torchscript", "tf_legacy_loss", "use_bfloat16", "_attn_implementation_autoset"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
_TOPK_METHODS = {"noaux_tc": True, "greedy": False, "group_limited_greedy": False}
# transformers writes its default num_key_value_heads (128) for any model; MLA reads no such field.
_HF_DEFAULT_KV_HEADS = 128


_HF_SCHEMA = {**{key: "int" for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                         "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
                                         "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                                         "topk_group", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                         "v_head_dim", "max_position_embeddings", "num_nextn_predict_layers",
                                         "moe_layer_freq", "num_key_value_heads", "head_dim", "qk_head_dim")},
              "q_lora_rank": "int?", "routed_scaling_factor": "number", "rms_norm_eps": "number",
              "rope_theta": "number", "scoring_func": "str", "topk_method": "str", "hidden_act": "str",
              "scale_fmt": "str?", "norm_topk_prob": "bool", "tie_word_embeddings": "bool", "attention_bias": "bool",
              "rope_interleave": "bool", "rope_scaling": "object?", "rope_parameters": "object?",
              "quantization_config": "object?"}
_HF_ROPE_SCHEMA = {"type": "str?", "rope_type": "str?", "rope_theta": "number", "factor": "number",
                   "original_max_position_embeddings": "int", "beta_fast": "number", "beta_slow": "number",
                   "mscale": "number", "mscale_all_dim": "number", "truncate": "bool",
                   "partial_rotary_factor": "number", "attention_factor": "number"}
_HF_QUANT_SCHEMA = {"quant_method": "str", "fmt": "str", "weight_block_size": "list", "activation_scheme": "str",
                    "scale_fmt": "str?"}
HF_SPELLING = {**{ours: theirs for theirs, ours in _HF_FIELDS.items()}, "gate_bias": "topk_method",
               "fp8_weights": "quantization_config", "scale_fmt": "scale_fmt", "rope_theta": "rope_theta",
               **{f"rope_scaling.{name}": f"rope_scaling.{name}" for name in
                  ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")},
               "rope_scaling.original_seq_len": "rope_scaling.original_max_position_embeddings"}


def _rope_from_hf(raw: Mapping[str, Any], problems: _Problems) -> tuple[float, YarnScaling | None]:
    """The rope theta and YaRN of either form. transformers (and the released remote code) scale the rotary
    part by m(mscale)/m(mscale_all_dim) and the softmax by m(mscale_all_dim)^2, absent values read as 1 and 0;
    the official code scales the softmax by m(mscale)^2 alone. The two agree exactly when the two are equal."""
    legacy, current = raw.get("rope_scaling"), raw.get("rope_parameters")
    where = "rope_parameters" if current is not None else "rope_scaling"
    rope = dict(current if current is not None else legacy or {})
    problems.require(not (legacy and current is not None and
                          {k: v for k, v in legacy.items() if k != "type"} !=
                          {k: v for k, v in current.items() if k not in ("rope_theta", "type")}),
                     f"rope_scaling {show(legacy)} and rope_parameters {show(current)} disagree")
    unknown = sorted(set(rope) - set(_HF_ROPE_SCHEMA))
    problems.require(not unknown, f"{where} has unknown field(s) {', '.join(unknown)}")
    for key, kind in _HF_ROPE_SCHEMA.items():
        if key in rope:
            accepts, description = _KINDS[kind]
            problems.require(accepts(rope[key]), f"{where}.{key} must be {description}, found {show(rope[key])}")
    if problems.found:
        return 10000.0, None
    theta = rope.get("rope_theta", raw.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    problems.require("rope_theta" not in raw or "rope_theta" not in rope or raw["rope_theta"] == rope["rope_theta"],
                     f"rope_theta {show(raw.get('rope_theta'))} and {where}.rope_theta {show(rope.get('rope_theta'))} "
                     "disagree")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    problems.require(kind == "yarn", f"{where} type {show(kind)} is not supported: DeepSeek-V3 uses \"yarn\" or "
                                     "\"default\"")
    problems.require("factor" in rope and "original_max_position_embeddings" in rope,
                     f"{where} of type yarn needs 'factor' and 'original_max_position_embeddings'")
    mscale, mscale_all_dim = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0.0)
    problems.require(mscale == mscale_all_dim,
                     f"{where}.mscale={show(mscale)} and mscale_all_dim={show(mscale_all_dim)} (absent: 1 and 0) "
                     "differ: transformers then scales the rotary part apart from the softmax, which the official "
                     "code does not; write both equal, as the released config does")
    problems.require(rope.get("truncate", True) is True, f"{where}.truncate=false is not supported: the official "
                                                         "code rounds the correction range outwards")
    problems.require(rope.get("partial_rotary_factor", 1) == 1, f"{where}.partial_rotary_factor must be 1")
    problems.require("attention_factor" not in rope, f"{where}.attention_factor is not supported: the official "
                                                     "code derives it from mscale")
    if problems.found:
        return float(theta), None
    problems.require(raw["max_position_embeddings"] > rope["original_max_position_embeddings"],
                     f"yarn with max_position_embeddings={raw['max_position_embeddings']} not above "
                     f"{where}.original_max_position_embeddings={rope['original_max_position_embeddings']}: "
                     "transformers applies YaRN, the official code does not")
    return float(theta), YarnScaling(factor=float(rope["factor"]),
                                     original_seq_len=rope["original_max_position_embeddings"],
                                     beta_fast=float(rope.get("beta_fast", 32)),
                                     beta_slow=float(rope.get("beta_slow", 1)),
                                     mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))


def _fp8_from_hf(quantization: Mapping[str, Any] | None, problems: _Problems) -> tuple[bool, str | None]:
    if not quantization:
        return False, None
    _check_types(quantization, _HF_QUANT_SCHEMA, "quantization_config.", problems)
    method = quantization.get("quant_method")
    problems.require(method == "fp8", f"quantization_config.quant_method {show(method)} is not supported: "
                                      "expected \"fp8\"")
    problems.require(quantization.get("fmt", "e4m3") == "e4m3",
                     f"quantization_config.fmt {show(quantization.get('fmt'))} is not supported: expected \"e4m3\"")
    block = quantization.get("weight_block_size", [BLOCK, BLOCK])
    problems.require(block == [BLOCK, BLOCK],
                     f"quantization_config.weight_block_size {show(block)} is not supported: expected [128, 128]")
    scheme = quantization.get("activation_scheme", "dynamic")
    problems.require(scheme == "dynamic", f"quantization_config.activation_scheme {show(scheme)} is not supported: "
                                          "expected \"dynamic\"")
    return True, quantization.get("scale_fmt")


def from_hf_dict(raw: Mapping[str, Any], name: str = "", allow_fields: tuple[str, ...] = ()) -> ModelConfig:
    """Build a config from the fields of a Hugging Face DeepSeek-V3 `config.json` (either form), reporting
    every problem at once. A field this harness does not know is refused unless `allow_fields` names it."""
    problems = _Problems()
    missing = [key for key in _HF_REQUIRED if key not in raw]
    problems.require(not missing, f"config.json lacks required field(s): {', '.join(missing)}")
    unknown = sorted(key for key in raw if key not in _HF_FIELDS and key not in _HF_SPECIAL
                     and key not in _HF_IGNORED and key not in allow_fields)
    problems.require(not unknown, f"unknown config field(s) {', '.join(unknown)}: a field this harness does not "
                                  f"read may change the model; --allow-fields {','.join(unknown)} accepts them as not "
                                  "changing it")
    _check_types(raw, _HF_SCHEMA, "", problems)
    problems.raise_any()
    theta, yarn = _rope_from_hf(raw, problems)
    fp8_weights, quant_scale_fmt = _fp8_from_hf(raw.get("quantization_config"), problems)
    field = {**HF_DEFAULTS, **raw}
    values: dict[str, Any] = {ours: field[theirs] for theirs, ours in _HF_FIELDS.items()}
    values["route_scale"] = float(values["route_scale"])
    values["q_lora_rank"] = field["q_lora_rank"] or 0
    values.update(rope_theta=theta, rope_scaling=yarn, fp8_weights=fp8_weights,
                  scale_fmt=raw.get("scale_fmt", quant_scale_fmt))

    topk_method = field["topk_method"]
    if problems.require(topk_method in _TOPK_METHODS,
                        f"unknown topk_method {show(topk_method)}: expected one of {sorted(_TOPK_METHODS)}"):
        problems.require(not (topk_method == "greedy" and values["n_expert_groups"] > 1),
                         f"topk_method \"greedy\" with n_group={values['n_expert_groups']} is ambiguous: HF ignores "
                         "the groups, the official code limits them; use \"group_limited_greedy\" or n_group 1")
        values["gate_bias"] = _TOPK_METHODS[topk_method]
    if values["score_func"] in ("sigmoid", "softmax"):
        problems.require(field["norm_topk_prob"] == (values["score_func"] == "sigmoid"),
                         f"norm_topk_prob={show(field['norm_topk_prob'])} with scoring_func {show(values['score_func'])}:"
                         " the official code renormalizes exactly when scoring is sigmoid")
    problems.require(raw.get("moe_layer_freq", 1) == 1,
                     f"moe_layer_freq={show(raw.get('moe_layer_freq'))} is not supported: every layer after "
                     "first_k_dense_replace is MoE")
    problems.require(field["hidden_act"] == "silu",
                     f"hidden_act {show(field['hidden_act'])} is not supported: DeepSeek-V3 uses \"silu\"")
    problems.require(not field["tie_word_embeddings"], "tie_word_embeddings=true is not supported: DeepSeek-V3 has a "
                                                       "separate lm_head")
    problems.require(not field["attention_bias"], "attention_bias=true is not supported: MLA has no biases")
    problems.require(field["rope_interleave"], "rope_interleave=false is not supported: the checkpoint's rope "
                                               "columns are then in another order than the released weights'")
    heads = raw["num_attention_heads"]
    problems.require(raw.get("num_key_value_heads", heads) in (heads, _HF_DEFAULT_KV_HEADS),
                     f"num_key_value_heads={raw.get('num_key_value_heads')} differs from num_attention_heads={heads}: "
                     "MLA has no grouped keys")
    rope_dim, nope_dim = raw["qk_rope_head_dim"], raw["qk_nope_head_dim"]
    problems.require(raw.get("head_dim", rope_dim) == rope_dim,
                     f"head_dim={raw.get('head_dim')} must equal qk_rope_head_dim={rope_dim} (HF uses it as the "
                     "rope width)")
    problems.require(raw.get("qk_head_dim", nope_dim + rope_dim) == nope_dim + rope_dim,
                     f"qk_head_dim={raw.get('qk_head_dim')} is not qk_nope_head_dim + qk_rope_head_dim = "
                     f"{nope_dim} + {rope_dim}")
    problems.raise_any()
    extra = {key: value for key, value in raw.items() if key in allow_fields}
    return ModelConfig(**values, name=name, extra_fields=extra, spelling=HF_SPELLING)


# --- the official inference/configs/*.json form ----------------------------------------------------

_OFFICIAL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {
    "gate_bias", "rope_scaling", "fp8_weights", "name", "extra_fields", "spelling", "rms_norm_eps", "n_mtp_layers"}
_OFFICIAL_YARN = {"original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale"}
_OFFICIAL_IGNORED = {"max_batch_size"}
# ModelArgs defaults, for fields the official json files leave out.
_OFFICIAL_DEFAULTS = {"max_seq_len": 16384, "n_dense_layers": 1, "n_shared_experts": 2, "n_expert_groups": 1,
                      "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0,
                      "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                      "rope_theta": 10000.0}


_OFFICIAL_SCHEMA = {**{key: "int" for key in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers",
                                              "n_dense_layers", "n_heads", "n_routed_experts", "n_shared_experts",
                                              "n_activated_experts", "n_expert_groups", "n_limited_groups",
                                              "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                              "v_head_dim", "max_seq_len", "original_seq_len", "max_batch_size")},
                    **{key: "number" for key in ("route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow",
                                                 "mscale")},
                    "score_func": "str", "dtype": "str", "scale_fmt": "str?"}
OFFICIAL_SPELLING = {"rope_scaling.factor": "rope_factor", "rope_scaling.original_seq_len": "original_seq_len",
                     "rope_scaling.beta_fast": "beta_fast", "rope_scaling.beta_slow": "beta_slow",
                     "rope_scaling.mscale": "mscale", "rope_scaling.mscale_all_dim": "mscale"}


def from_official_dict(raw: Mapping[str, Any], name: str = "", allow_fields: tuple[str, ...] = ()) -> ModelConfig:
    """Build a config from the official `ModelArgs` json form (`dim`, `n_routed_experts`, ...). A field this
    harness does not know is refused unless `allow_fields` names it."""
    required = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
                "n_activated_experts")
    missing = [key for key in required if key not in raw]
    _require(not missing, f"official config lacks required field(s): {', '.join(missing)}")
    _check_types(raw, _OFFICIAL_SCHEMA)
    values = {**_OFFICIAL_DEFAULTS, **{key: raw[key] for key in _OFFICIAL_FIELDS if key in raw}}
    values["route_scale"] = float(values["route_scale"])
    dtype = raw.get("dtype", "bf16")
    _require(dtype in ("bf16", "fp8"), f"official dtype {show(dtype)} is not supported: expected \"bf16\" or \"fp8\"")
    values["fp8_weights"] = dtype == "fp8"
    # The official Gate owns a correction bias only for the V3 width; sigmoid scoring marks V3 configs.
    values["gate_bias"] = values["score_func"] == "sigmoid"
    values["rope_scaling"] = YarnScaling(factor=float(raw.get("rope_factor", 40)),
                                         original_seq_len=raw.get("original_seq_len", 4096),
                                         beta_fast=float(raw.get("beta_fast", 32)),
                                         beta_slow=float(raw.get("beta_slow", 1)),
                                         mscale=float(raw.get("mscale", 1.0)),
                                         mscale_all_dim=float(raw.get("mscale", 1.0)))
    unknown = sorted(key for key in raw if key not in _OFFICIAL_FIELDS and key not in _OFFICIAL_YARN
                     and key not in _OFFICIAL_IGNORED and key != "dtype")
    _require(set(unknown) <= set(allow_fields),
             f"unknown config field(s) {', '.join(sorted(set(unknown) - set(allow_fields)))}: a field this harness "
             "does not read may change the model; --allow-fields names those that do not")
    extra = {key: raw[key] for key in unknown}
    return ModelConfig(**values, name=name, extra_fields=extra, spelling=OFFICIAL_SPELLING)


def to_official_dict(config: ModelConfig) -> dict[str, Any]:
    """The official `ModelArgs` fields of `config` (the inverse of `from_official_dict`). Without rope scaling
    the trained context is the run's own length, so the official code leaves RoPE unscaled."""
    raw: dict[str, Any] = {key: getattr(config, key) for key in sorted(_OFFICIAL_FIELDS)}
    raw["dtype"] = "fp8" if config.fp8_weights else "bf16"
    yarn = config.rope_scaling
    if yarn is None:
        raw["original_seq_len"] = config.max_seq_len
    else:
        raw.update(original_seq_len=yarn.original_seq_len, rope_factor=yarn.factor, beta_fast=yarn.beta_fast,
                   beta_slow=yarn.beta_slow, mscale=yarn.mscale)
    return raw


def is_official_form(raw: Mapping[str, Any]) -> bool:
    return "dim" in raw and "hidden_size" not in raw


ALLOW_FIELDS_HELP = ("comma-separated config fields this harness does not know, accepted as not changing the model "
                     "(default: an unknown field is refused)")


def allow_fields(text: str | None) -> tuple[str, ...]:
    """The field names of an --allow-fields option."""
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def from_dict(raw: Mapping[str, Any], name: str = "", allow_fields: tuple[str, ...] = ()) -> ModelConfig:
    """Build a config from either json form, telling them apart by their field names."""
    reader = from_official_dict if is_official_form(raw) else from_hf_dict
    return reader(raw, name, allow_fields)


def load_config(path: str | Path, allow_fields: tuple[str, ...] = ()) -> ModelConfig:
    """Read a config file, or the `config.json` inside a folder; `allow_fields`: unknown fields to accept."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw = read_json(path, ConfigError, "config file")
    _require(isinstance(raw, dict), f"{path}: a config must be a JSON object, found {type(raw).__name__}")
    try:
        return from_dict(raw, name=path.parent.name if path.name == "config.json" else path.stem,
                         allow_fields=allow_fields)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` fields of `config` (the inverse of `from_hf_dict`)."""
    raw: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for theirs, ours in _HF_FIELDS.items():
        raw[theirs] = getattr(config, ours)
    raw.update(q_lora_rank=config.q_lora_rank or None, num_key_value_heads=config.n_heads, rope_theta=config.rope_theta,
               topk_method=("noaux_tc" if config.gate_bias else
                            "group_limited_greedy" if config.n_expert_groups > 1 else "greedy"),
               norm_topk_prob=config.score_func == "sigmoid", moe_layer_freq=1, hidden_act="silu",
               tie_word_embeddings=False)
    if config.rope_scaling is not None:
        yarn = config.rope_scaling
        raw["rope_scaling"] = {"type": "yarn", "factor": yarn.factor, "beta_fast": yarn.beta_fast,
                               "beta_slow": yarn.beta_slow, "mscale": yarn.mscale,
                               "mscale_all_dim": yarn.mscale_all_dim,
                               "original_max_position_embeddings": yarn.original_seq_len}
    if config.fp8_weights:
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [BLOCK, BLOCK]}
        if config.scale_fmt:
            raw["quantization_config"]["scale_fmt"] = config.scale_fmt
    raw.update(config.extra_fields)
    return raw


# --- presets -----------------------------------------------------------------------------------------

_CONFIG_DIR = Path(__file__).parent / "configs"


def deepseek_v3_671b() -> ModelConfig:
    """The released DeepSeek-V3 (its Hugging Face config.json, shipped with the harness)."""
    return load_config(_CONFIG_DIR / "deepseek-v3-671b.json")


def tiny(**changes: Any) -> ModelConfig:
    """A small V3-shaped model (grouped sigmoid routing with bias, q_lora, YaRN on) for tests."""
    base = ModelConfig(vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
                       n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                       n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5,
                       q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       max_seq_len=64, rope_scaling=YarnScaling(factor=40.0, original_seq_len=32), name="tiny")
    return base.replace(**changes)


def tiny_v2(**changes: Any) -> ModelConfig:
    """A small V2-style model: softmax scoring, no correction bias, no query compression, no YaRN."""
    return tiny(score_func="softmax", gate_bias=False, route_scale=1.0, q_lora_rank=0, rope_scaling=None,
                name="tiny-v2").replace(**changes)


def tiny_fp8(**changes: Any) -> ModelConfig:
    """A small model whose every width is a multiple of 128, as the fp8 activation path requires."""
    return tiny(dim=256, inter_dim=384, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128,
                qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, fp8_weights=True,
                name="tiny-fp8").replace(**changes)


PRESETS = {"deepseek-v3-671b": deepseek_v3_671b, "tiny": tiny, "tiny-v2": tiny_v2, "tiny-fp8": tiny_fp8}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
