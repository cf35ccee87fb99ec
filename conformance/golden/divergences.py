"""Known divergences: where an oracle or the official code departs from the official semantics.

A divergence is recorded, checked to still exist, and listed in the report; configs it applies to are not
compared for equality against that oracle. No tolerance is loosened to absorb one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsv3_conformance.format.config import ModelConfig, YarnScaling, tiny
from dsv3_conformance.reference.rope import yarn_active


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
]


def oracle_divergences(config: ModelConfig) -> list[Divergence]:
    """The recorded divergences of the transformers oracle that apply to `config`."""
    return [d for d in DIVERGENCES if d.source.startswith("transformers") and d.applies(config)]
