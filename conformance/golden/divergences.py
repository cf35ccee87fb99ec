"""Known divergences: where an oracle, the official code or a judged implementation departs from the official
semantics.

A divergence is recorded, checked to still exist, and listed in the report; configs it applies to are not
compared for equality against that oracle. No tolerance is loosened to absorb one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsv3_conformance.format.config import ModelConfig, YarnScaling, tiny, tiny_fp8
from dsv3_conformance.reference.rope import yarn_active


LLAMA_CPP = "llama.cpp (deepseek2) in llama-cpp-python 0.3.36"
MLX_LM = "mlx-lm 0.32.2 (models/deepseek_v3.py) on mlx 0.32.4"
TORCHTITAN = "torchtitan 0.3.0 (models/deepseek_v3) on torch 2.13"


@dataclass(frozen=True)
class Divergence:
    key: str
    source: str  # whose behaviour diverges
    description: str
    applies: Callable[[ModelConfig], bool]
    # A config on which the divergence shows, used by the check that it still exists; None when it cannot
    # be shown by running (the official code is not run here).
    example: Callable[[], ModelConfig] | None = None


DIVERGENCES = [
    Divergence("hf-ignores-scoring-func", "transformers DeepseekV3ForCausalLM",
               "The router always applies sigmoid; softmax-scored (DeepSeek-V2 style) configs are scored wrongly.",
               lambda c: c.score_func == "softmax",
               lambda: tiny(score_func="softmax", gate_bias=False, route_scale=1.0)),
    Divergence("hf-assumes-correction-bias", "transformers DeepseekV3ForCausalLM",
               "The router always owns an e_score_correction_bias and scores groups by their top-2 sum; the official "
               "code has no bias for such gates and scores groups by their maximum.",
               lambda c: not c.gate_bias,
               lambda: tiny(score_func="softmax", gate_bias=False, route_scale=1.0)),
    Divergence("hf-yarn-always-on", "transformers DeepseekV3ForCausalLM",
               "YaRN is applied whenever rope_scaling names it; the official code applies it only when the run is "
               "longer than original_max_position_embeddings.",
               lambda c: c.rope_scaling is not None and not yarn_active(c),
               lambda: tiny(max_seq_len=32)),
    Divergence("hf-mscale-all-dim", "transformers DeepseekV3ForCausalLM",
               "Attention is scaled with mscale_all_dim and the rope cos/sin by mscale/mscale_all_dim; the official "
               "code scales attention by mscale alone. They agree when the two are equal, as in the release.",
               lambda c: yarn_active(c) and c.rope_scaling.mscale != c.rope_scaling.mscale_all_dim,
               lambda: tiny(rope_scaling=YarnScaling(factor=40.0, original_seq_len=32, mscale=0.707, mscale_all_dim=1.0))),
    Divergence("hf-latent-norm-eps", "transformers DeepseekV3ForCausalLM",
               "q_a_layernorm and kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says; the official code uses "
               "1e-6 everywhere, this harness uses rms_norm_eps everywhere.",
               lambda c: c.rms_norm_eps != 1e-6,
               lambda: tiny(rms_norm_eps=1e-2)),
    Divergence("official-ue8m0-plain-linear-only", "official inference/model.py at 9b4e978",
               "scale_fmt reaches only the plain linear modules (wq_a, wkv_a, routed experts): the column- and "
               "row-parallel linear modules quantize without it, so wq_b, wkv_b, wo and the dense and shared FFNs "
               "use unrounded activation scales, and the kernel rounds with a float32 log2. DeepGEMM-based serving "
               "rounds in every fp8 linear. A choice here, not a silent difference: Numerics.ue8m0_scope "
               "'official' (the default, what golden meta.json's ue8m0_scope defaults to) or 'all'.",
               lambda c: c.scale_fmt == "ue8m0"),
    Divergence("llamacpp-group-score-without-bias", LLAMA_CPP,
               "With several expert groups, a group's score is always the sum of its two best scores "
               "(src/llama-graph.cpp, build_moe_ffn, 'select top n_group_used expert groups'); the official gate "
               "scores a group by its best score when the gate has no correction bias (DeepSeek-V2's "
               "group-limited routing), so such models route some tokens to other experts.",
               lambda c: not c.gate_bias and 1 < c.n_limited_groups < c.n_expert_groups,
               lambda: tiny(gate_bias=False)),
    Divergence("llamacpp-lite-by-depth", LLAMA_CPP,
               "Whether queries are compressed is inferred from the depth, not read from q_lora_rank: at 26 or 27 "
               "layers (or 48 with a 128,256-token vocabulary) q_lora_rank is ignored and a query-compressed model "
               "fails to load ('tensor blk.0.attn_q.weight not found'; src/models/deepseek2.cpp, load_arch_hparams, "
               "is_lite).",
               lambda c: c.q_lora_rank > 0 and (c.n_layers in (26, 27)
                                                 or (c.n_layers == 48 and c.vocab_size == 128256)),
               lambda: tiny(n_layers=27)),
    Divergence("llamacpp-shared-experts-required", LLAMA_CPP,
               "The shared-expert tensors are required, so a model with n_shared_experts 0 (whose shared expert adds "
               "nothing in the official code) fails to load (src/models/deepseek2.cpp, load_arch_tensors).",
               lambda c: c.n_shared_experts == 0,
               lambda: tiny(n_shared_experts=0)),
    Divergence("mlxlm-masked-groups-zero", MLX_LM,
               "Experts of the groups left out are given the score 0.0, not -inf (models/deepseek_v3.py, "
               "group_expert_select, put_along_axis(..., mx.array(0.0))): where a kept group's candidate scores below "
               "0 with its correction bias (sigmoid score + a negative bias), an expert of a masked group is chosen "
               "instead.",
               lambda c: 1 < c.n_limited_groups < c.n_expert_groups,
               lambda: tiny()),
    Divergence("mlxlm-sigmoid-always", MLX_LM,
               "The router applies sigmoid whatever scoring_func says (group_expert_select): softmax-scored "
               "configs are scored wrongly.",
               lambda c: c.score_func == "softmax",
               lambda: tiny(score_func="softmax", n_expert_groups=1, n_limited_groups=1)),
    Divergence("mlxlm-single-expert-unnormalized", MLX_LM,
               "The chosen weights are normalized only when top_k > 1 (group_expert_select); the official gate "
               "normalizes sigmoid weights for any k, so with one routed expert its weight is route_scale, not "
               "sigmoid score x route_scale.",
               lambda c: c.score_func == "sigmoid" and c.n_activated_experts == 1,
               lambda: tiny(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)),
    Divergence("mlxlm-yarn-always-on", MLX_LM,
               "YaRN is applied whenever rope_scaling names it (rope_utils.initialize_rope); the official code applies "
               "it only when the run is longer than original_max_position_embeddings.",
               lambda c: c.rope_scaling is not None and not yarn_active(c),
               lambda: tiny(max_seq_len=32, n_expert_groups=1, n_limited_groups=1)),
    Divergence("mlxlm-mscale-all-dim", MLX_LM,
               "As in transformers: attention is scaled with mscale_all_dim and the rope by mscale/mscale_all_dim "
               "(DeepseekV3Attention, rope_utils.YarnRoPE); the official code scales attention by mscale alone. They "
               "agree when the two are equal, as in the release.",
               lambda c: yarn_active(c) and c.rope_scaling.mscale != c.rope_scaling.mscale_all_dim,
               lambda: tiny(n_expert_groups=1, n_limited_groups=1,
                            rope_scaling=YarnScaling(factor=40.0, original_seq_len=32, mscale=0.707,
                                                     mscale_all_dim=1.0))),
    Divergence("mlxlm-latent-norm-eps", MLX_LM,
               "q_a_layernorm and kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says (DeepseekV3Attention).",
               lambda c: c.rms_norm_eps != 1e-6,
               lambda: tiny(rms_norm_eps=1e-2, n_expert_groups=1, n_limited_groups=1)),
    Divergence("mlxlm-fp8-dequantized-to-bfloat16", MLX_LM,
               "fp8 weights are dequantized into bfloat16 whatever the run's dtype (Model.sanitize, dequant): a "
               "float32 run computes with bfloat16-rounded weights (logits move by 5e-3 on the fp8 goldens). In bfloat16, as "
               "its users run it, the official code rounds its dequantized weights the same way.",
               lambda c: c.fp8_weights,
               lambda: tiny_fp8(n_expert_groups=1, n_limited_groups=1)),
    Divergence("mlxlm-noaux-tc-only", MLX_LM,
               "A gate without a correction bias (topk_method other than noaux_tc: DeepSeek-V2's routing) is refused "
               "by an assertion (MoEGate).",
               lambda c: not c.gate_bias,
               lambda: tiny(gate_bias=False)),
    Divergence("mlxlm-shared-experts-required", MLX_LM,
               "n_shared_experts 0 builds a shared expert of width 0, whose initialization divides by zero "
               "(DeepseekV3MoE): such a model cannot be built.",
               lambda c: c.n_shared_experts == 0,
               lambda: tiny(n_shared_experts=0)),
    Divergence("torchtitan-experts-in-bfloat16", TORCHTITAN,
               "The routed experts always compute in bfloat16 (models/common/moe.py, GroupedExperts.forward casts "
               "the tokens and the weights with .bfloat16() around torch._grouped_mm), whatever the model's dtype: a "
               "float32 model moves by 3e-3 on the golden cases, and a near tie then routes later tokens elsewhere. "
               "In bfloat16 training that is its working precision (backend torchtitan-exact computes these products "
               "in float32).",
               lambda c: c.n_layers > c.n_dense_layers,
               lambda: tiny(n_expert_groups=1, n_limited_groups=1)),
    Divergence("torchtitan-norm-eps", TORCHTITAN,
               "Every RMSNorm uses eps 1e-5 (models/common/nn_modules.py, RMSNorm.Config's default; the DeepSeek-V3 "
               "layer builder _build_dsv3_layers and its presets set none), whatever rms_norm_eps says; the release "
               "says 1e-6 (logits move by about 8e-6 on the golden cases).",
               lambda c: c.rms_norm_eps != 1e-5,
               lambda: tiny(rms_norm_eps=1e-2, n_expert_groups=1, n_limited_groups=1)),
    Divergence("torchtitan-yarn-always-on", TORCHTITAN,
               "YaRN frequencies and the attention's mscale apply whenever rope_factor > 1 (models/common/rope.py, "
               "ComplexRoPE; models/deepseek_v3/model.py, Attention); the official code applies them only when the run "
               "is longer than original_max_position_embeddings.",
               lambda c: c.rope_scaling is not None and not yarn_active(c),
               lambda: tiny(max_seq_len=32, n_expert_groups=1, n_limited_groups=1)),
    Divergence("torchtitan-group-score-without-bias", TORCHTITAN,
               "A group's score is always the sum of its two best scores (models/common/moe.py, "
               "TokenChoiceTopKRouter._get_node_limited_routing_scores); the official gate scores a group by its best "
               "score when the gate has no correction bias (DeepSeek-V2's group-limited routing).",
               lambda c: not c.gate_bias and 1 < c.n_limited_groups < c.n_expert_groups,
               lambda: tiny(gate_bias=False)),
    Divergence("torchtitan-mtp-pre-norm-hidden", TORCHTITAN,
               "The first MTP module takes the last decoder block's output before the final norm "
               "(models/deepseek_v3/mtp.py, MTPDecoder.forward keeps prev_depth_hidden = h before self.norm); the "
               "engines that run the released MTP weights (vLLM, SGLang) and Megatron feed it the normed output "
               "(SEMANTICS.md section 4). MTP logits move by 0.14 on official/v3-tiny-mtp.",
               lambda c: c.n_mtp_layers > 0,
               lambda: tiny(n_mtp_layers=1, n_expert_groups=1, n_limited_groups=1)),
    Divergence("torchtitan-moe-mtp-needs-moe-layers", TORCHTITAN,
               "A model whose main layers are all dense but whose MTP module has experts cannot be loaded: the "
               "Hugging Face state-dict adapter takes the expert count from the first main layer with experts "
               "(models/deepseek_v3/state_dict_adapter.py, from_hf: StopIteration).",
               lambda c: c.n_mtp_layers > 0 and c.n_dense_layers >= c.n_layers,
               lambda: tiny(n_layers=1, n_dense_layers=1, n_mtp_layers=1)),
]


def oracle_divergences(config: ModelConfig) -> list[Divergence]:
    """The recorded divergences of the transformers oracle that apply to `config`."""
    return [d for d in DIVERGENCES if d.source.startswith("transformers") and d.applies(config)]
