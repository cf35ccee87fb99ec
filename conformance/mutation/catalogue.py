"""The mutation catalogue: bug classes, each written once for every backend, and the checks that must catch it.

A patch replaces `role:attribute` of a backend (planting.py) by what its maker returns from the original
and a `Context` (the target's module and the backend's NumPy-like array namespace). Both built-in
backends give their functions the same names and signatures, so one definition targets either; a
backend that lacks a target is reported as not applicable. Control mutants change nothing: they must
survive every check, which shows that planting alone kills nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from dsv3_conformance.mutation.planting import Context, Maker

HISTORICAL, SEED, HARNESS, CONTROL = ("historical (SEMANTICS.md section 2)", "seed documents", "harness catalogue",
                                      "control (changes nothing)")


@dataclass(frozen=True)
class Patch:
    target: str  # "role:attribute" or "role:Class.attribute"
    make: Maker


@dataclass(frozen=True)
class Mutant:
    key: str
    bug: str
    origin: str
    patches: tuple[Patch, ...]
    checks: tuple[str, ...]

    @property
    def control(self) -> bool:
        return self.origin == CONTROL


# --- makers, one per bug ------------------------------------------------------------------------------------

def _weights_from_choice(original, ctx: Context):
    moe = ctx.module

    def route(x, gate, config):
        scores = moe.affinities(x, gate, config)
        choice = scores if gate.bias is None else scores + gate.bias
        experts = moe.select_experts(choice, config)
        return moe.gate_weights(choice, experts, config), experts
    return route


def _group_max(original, ctx: Context):
    def group_scores(choice, config):
        return original(choice, config.replace(gate_bias=False))
    return group_scores


def _constant(value):
    def make(original, ctx: Context):
        return value
    return make


def _half_split(original, ctx: Context):
    """Rotate-half RoPE on interleaved weights: rotating pairs (i, i + d/2) equals un-interleaving the
    pairs, rotating them as interleaved, and interleaving back."""
    xp = ctx.xp

    def apply_rope(x, cos, sin):
        half = x.shape[-1] // 2
        order = [index for i in range(half) for index in (i, i + half)]
        back = np.argsort(order).tolist()
        return xp.take(original(xp.take(x, order, axis=-1), cos, sin), back, axis=-1)
    return apply_rope


def _no_mscale(original, ctx: Context):
    def yarn_mscale(config):
        return 1.0
    return yarn_mscale


def _mscale_squared(original, ctx: Context):
    def yarn_mscale(config):
        return original(config) ** 2
    return yarn_mscale


def _scale_over_nope_only(original, ctx: Context):
    def softmax_scale(config):
        return original(config) * (config.qk_head_dim / config.qk_nope_head_dim) ** 0.5
    return softmax_scale


def _ramp_betas_swapped(original, ctx: Context):
    def yarn_ramp(yarn, dim, theta):
        return original(dataclasses.replace(yarn, beta_fast=yarn.beta_slow, beta_slow=yarn.beta_fast), dim, theta)
    return yarn_ramp


def _rope_part_first(original, ctx: Context):
    def split_query_heads(q, config):
        rope = config.qk_rope_head_dim
        return q[..., rope:], q[..., :rope]
    return split_query_heads


def _no_route_scale(original, ctx: Context):
    def gate_weights(scores, experts, config):
        return original(scores, experts, config) / config.route_scale
    return gate_weights


def _renormalize_softmax(original, ctx: Context):
    def gate_weights(scores, experts, config):
        return original(scores, experts, config.replace(score_func="sigmoid"))
    return gate_weights


def _swapped_scoring(original, ctx: Context):
    def affinities(x, gate, config):
        swapped = "softmax" if config.score_func == "sigmoid" else "sigmoid"
        return original(x, gate, config.replace(score_func=swapped, gate_bias=False, route_scale=1.0))
    return affinities


def _bias_in_logits(original, ctx: Context):
    """The correction bias used as a Linear bias of the router: sigmoid(x W^T + b), so it reaches the weights."""
    xp = ctx.xp

    def affinities(x, gate, config):
        if gate.bias is None:
            return original(x, gate, config)
        ones = xp.ones_like(x[:, :1])
        weight = xp.concatenate([gate.weight, xp.reshape(gate.bias, (-1, 1))], axis=1)
        return original(xp.concatenate([x, ones], axis=1), dataclasses.replace(gate, weight=weight), config)
    return affinities


def _drop_norm(field_name: str) -> Maker:
    """Calls the projection with that norm's weight set to None (the None-tolerant rms_norm then skips it)."""
    def make(original, ctx: Context):
        def project(x, weights, config, *rest):
            return original(x, dataclasses.replace(weights, **{field_name: None}), config, *rest)
        return project
    return make


def _norm_tolerating_none(original, ctx: Context):
    def rms_norm(x, weight, eps):
        return x if weight is None else original(x, weight, eps)
    return rms_norm


def _decode_misses_own_key(original, ctx: Context):
    def causal_mask(start_pos, queries, keys):
        return original(start_pos - 1, queries, keys) if queries == 1 else original(start_pos, queries, keys)
    return causal_mask


def _peek_ahead(original, ctx: Context):
    def causal_mask(start_pos, queries, keys):
        return original(start_pos + 1, queries, keys) if queries > 1 else original(start_pos, queries, keys)
    return causal_mask


def _decode_rope_shifted(original, ctx: Context):
    def rotation_angles(config, positions):
        return original(config, positions + 1 if positions.shape[0] == 1 else positions)
    return rotation_angles


def _no_shared(original, ctx: Context):
    def shared_experts(x, shared, numerics):
        return x * 0
    return shared_experts


def _no_group_limit(original, ctx: Context):
    def limit_to_groups(choice, config):
        return choice
    return limit_to_groups


def _scale_over_127(original, ctx: Context):
    def activation_scales(x, scale_fmt=None):
        return original(x, scale_fmt) * (448 / 127)
    return activation_scales


def _transposed(xp, grid):
    square = grid.shape[-1] == grid.shape[-2]
    return xp.swapaxes(grid, -1, -2) if square else xp.flip(xp.flip(grid, axis=-1), axis=-2)


def _transposed_dequantize(original, ctx: Context):
    def dequantize_weight(quantized, scale_inv, *rest):
        return original(quantized, _transposed(ctx.xp, scale_inv), *rest)
    return dequantize_weight


def _transposed_gemm(original, ctx: Context):
    def fp8_gemm(x_q, x_scale, w_q, w_scale, *rest):
        return original(x_q, x_scale, w_q, _transposed(ctx.xp, w_scale), *rest)
    return fp8_gemm


def _ue8m0_down(original, ctx: Context):
    def round_up_to_power_of_two(scales):
        up = original(scales)
        return ctx.xp.where(up == scales, scales, up / 2)
    return round_up_to_power_of_two


def _exact_official_rounding(original, ctx: Context):
    def round_up_as_official(scales):
        return ctx.module.round_up_to_power_of_two(scales)
    return round_up_as_official


def _ue8m0_everywhere(original, ctx: Context):
    def linear(x, weight, numerics, module):
        return original(x, weight, dataclasses.replace(numerics, ue8m0_scope="all"), module)
    return linear


def _naive_kv_b_dequantized(original, ctx: Context):
    def linear(x, weight, numerics, module):
        if module == "kv_b_proj":
            numerics = dataclasses.replace(numerics, gemm_impl="bf16")
        return original(x, weight, numerics, module)
    return linear


def _option(**changes):
    """Call the original with these MTP options, whatever the caller asked for."""
    def make(original, ctx: Context):
        def with_options(*args):
            *rest, options = args
            return original(*rest, dataclasses.replace(options, **changes))
        return with_options
    return make


def _swapped_concat(original, ctx: Context):
    def mtp_input(embedding, hidden, weights, config, options):
        flipped = "hidden-first" if options.concat == "embedding-first" else "embedding-first"
        return original(embedding, hidden, weights, config, dataclasses.replace(options, concat=flipped))
    return mtp_input


def _pre_norm_source(original, ctx: Context):
    def mtp_source(hidden, normed):
        return hidden
    return mtp_source


def _unshifted_tokens(original, ctx: Context):
    def tokens_ahead(stream, depth, count):
        return original(stream, depth - 1, count)
    return tokens_ahead


def _accept_everything(original, ctx: Context):
    def accepted_prefix(drafts, predicted):
        return drafts.shape[1]
    return accepted_prefix


def _no_rollback(original, ctx: Context):
    def truncate(self, length):
        return None
    return truncate


def _pass_through(original, ctx: Context):
    def same(*args, **kwargs):
        return original(*args, **kwargs)
    return same


def _bfloat16(ctx: Context, array):
    """`array` rounded to bfloat16 and back, in the backend's own namespace."""
    import ml_dtypes

    if ctx.xp is np:
        return np.asarray(array).astype(ml_dtypes.bfloat16).astype(np.asarray(array).dtype)
    import tensorflow as tf

    return tf.cast(tf.cast(array, tf.bfloat16), array.dtype)


def _router_in_bfloat16(original, ctx: Context):
    """The router's inputs (tokens and gate weight) in bfloat16: its logits lose all but 8 bits."""
    def affinities(x, gate, config):
        return original(_bfloat16(ctx, x), dataclasses.replace(gate, weight=_bfloat16(ctx, gate.weight)), config)
    return affinities


def _ue8m0_everywhere_in_decode(original, ctx: Context):
    def linear(x, weight, numerics, module):
        if len(x.shape) == 3 and x.shape[1] == 1:  # a decode step's [B, 1, in]
            numerics = dataclasses.replace(numerics, ue8m0_scope="all")
        return original(x, weight, numerics, module)
    return linear


def _unvalidated(config, **changes):
    """A copy of a frozen config with fields changed, without the validation a bug never runs."""
    changed = copy.copy(config)
    for name, value in changes.items():
        object.__setattr__(changed, name, value)
    return changed


def _groups_off_by(step: int):
    def make(original, ctx: Context):
        def limit_to_groups(choice, config):
            kept = min(max(config.n_limited_groups + step, 1), config.n_expert_groups)
            return original(choice, _unvalidated(config, n_limited_groups=kept))
        return limit_to_groups
    return make


def _moe_blocks_from_previous_layer(original, ctx: Context):
    """MoE blocks numbered from first_k_dense_replace - 1: per-block data (forced choices) taken one block off."""
    def moe_block(config, layer):
        index = original(config, layer)
        return None if index is None else index - 1
    return moe_block


def _gate_up_swapped(original, ctx: Context):
    def swiglu_ffn(x, weights, *rest):
        return original(x, dataclasses.replace(weights, gate_proj=weights.up_proj, up_proj=weights.gate_proj), *rest)
    return swiglu_ffn


def _norm_over_rope_key(original, ctx: Context):
    """kv_a_layernorm's statistics taken over the whole [c_kv; k_pe] (the rope key normalized too)."""
    module, xp = ctx.module, ctx.xp

    def project_latent(x, weights, config, numerics):
        compressed = module.linear(x, weights.kv_a_proj, numerics, "kv_a_proj")
        extended = xp.concatenate([weights.kv_a_norm, xp.ones((config.qk_rope_head_dim,), dtype=weights.kv_a_norm.dtype)])
        normed = module.rms_norm(compressed, extended, config.rms_norm_eps)
        return normed[..., : config.kv_lora_rank], normed[..., config.kv_lora_rank:]
    return project_latent


def _decode_reads_neighbour_cache(original, ctx: Context):
    """A decode step's sequence b attends over sequence b-1's cache (a batch index off by one)."""
    xp = ctx.xp

    def attention(q_nope, q_rope, *rest, **options):
        if q_nope.shape[1] == 1:
            first = rest[0]
            if hasattr(first, "kv_latent"):  # a cache object
                rest = (type(first)(xp.roll(first.kv_latent, 1, axis=0), xp.roll(first.rope_key, 1, axis=0)),
                        *rest[1:])
            else:  # latents and rope keys
                rest = (xp.roll(rest[0], 1, axis=0), xp.roll(rest[1], 1, axis=0), *rest[2:])
        return original(q_nope, q_rope, *rest, **options)
    return attention


def _eps_fixed(original, ctx: Context):
    def rms_norm(x, weight, eps):
        return original(x, weight, 1e-6)
    return rms_norm


def _theta_fixed(original, ctx: Context):
    def rope_frequencies(config):
        return original(config.replace(rope_theta=10000.0))
    return rope_frequencies


def _scaled(factor: float):
    def make(original, ctx: Context):
        def gradients(*args):
            return [g * factor for g in original(*args)]
        return gradients
    return make


def _bias_sign_flipped(original, ctx: Context):
    def bias_update(bias, loads, gamma):
        return original(bias, loads, -gamma)
    return bias_update


def _alpha_ignored(original, ctx: Context):
    def balance_loss(scores, experts, config, alpha):
        return original(scores, experts, config, 1.0)
    return balance_loss


def _mtp_weight_not_divided(original, ctx: Context):
    def mtp_loss_scale(weight, depths):
        return weight
    return mtp_loss_scale


def _last_in_first_out(original, ctx: Context):
    def next_weight_gradient(pending):
        return pending.pop()
    return next_weight_gradient


def _last_row_dropped(original, ctx: Context):
    """A kernel entry whose loop misses its last output row (the rows' bound off by one)."""
    def entry(*args, **kwargs):
        out = original(*args, **kwargs)
        rows = out.shape[-2]
        keep = ctx.xp.concatenate([ctx.xp.ones([rows - 1, 1], dtype=out.dtype), ctx.xp.zeros([1, 1], dtype=out.dtype)])
        return out * keep
    return entry


def _half_capacity(original, ctx: Context):
    """Buffers of half the no-drop capacity: copies beyond it fall out (a token-dropping dispatch)."""
    import tensorflow as tf

    def dispatch_masks(experts, devices, per_device, dtype):
        mask, local = original(experts, devices, per_device, dtype)
        keep = mask.shape[-1] // 2 or 1
        return mask * tf.concat([tf.ones([*mask.shape[:-1], keep], dtype),
                                 tf.zeros([*mask.shape[:-1], mask.shape[-1] - keep], dtype)], axis=-1), local
    return dispatch_masks


def _ungated(original, ctx: Context):
    """Copies combined without their gating weights."""
    def expert_parallel_experts(mesh, x, gating, *rest):
        return original(mesh, x, ctx.xp.ones_like(gating), *rest)
    return expert_parallel_experts


# --- the catalogue ------------------------------------------------------------------------------------------

# Each mutant names the checks able to see its bug, cheapest first (a run that stops at the first kill
# stays short). A golden case pins all semantics at once; the cross-backend check sees a tf mutant against
# the unmutated reference; the property checks see what breaks the equality of two code paths.
ROUTING = ("routing:groups", "routing:choice", "routing:weights", "routing:k")
TINY = ("golden:official/v3-tiny",)
GROUPS = ("golden:oracle/moe-groups",)
DECODE = ("properties:prefill-decode",)
CROSS = ("cross:dequantized[float32]",)
FP8 = ("fp8:activation-scales", "fp8:h100-activations[ue8m0]", "fp8:h100-gemm[k4096]", "fp8:gemm",
       "fp8:h100-nearer-fp8")
FP8_ACT = ("golden:official/v3-tiny-fp8-act",)
MTP = ("golden:official/v3-tiny-mtp",)
SPECULATIVE = MTP + ("mtp:speculative-equals-greedy",)
EPS_THETA = ("golden:oracle/eps-theta", "cross:dequantized[float32]")
BATCH = ("properties:batch-rows", "properties:prefill-decode") + TINY
TRAINING = ("training:steps",)
PIPELINE = ("pipeline:gradients",)
EP = ("ep:layer",)
KERNEL = ("cross:kernel-widths",)


def _one(target: str, make: Maker) -> tuple[Patch, ...]:
    return (Patch(target, make),)


def _without_norm(projection: str, field_name: str) -> tuple[Patch, ...]:
    return (Patch(f"attention:{projection}", _drop_norm(field_name)), Patch("norm:rms_norm", _norm_tolerating_none))



CATALOGUE = [
    Mutant("gate-weights-from-biased-scores", "gating weights taken from s + bias instead of s", HISTORICAL,
           _one("moe:route", _weights_from_choice), ROUTING + TINY),
    Mutant("group-score-max-with-bias", "group score = max instead of the top-2 sum when a bias exists", HISTORICAL,
           _one("moe:group_scores", _group_max), ROUTING + TINY + GROUPS),
    Mutant("masked-groups-zero", "experts of dropped groups set to 0 instead of -inf", HISTORICAL,
           _one("moe:MASKED_CHOICE", _constant(0.0)), ROUTING + TINY + GROUPS),
    Mutant("rope-half-split", "rotate-half RoPE applied to interleaved weights", HISTORICAL,
           _one("rope:apply_rope", _half_split), TINY + CROSS),
    Mutant("yarn-mscale-missing", "YaRN attention scale m^2 left out", HISTORICAL,
           _one("rope:yarn_mscale", _no_mscale), TINY + ("golden:oracle/yarn-on-mscale",)),
    Mutant("yarn-mscale-applied-twice", "YaRN m^2 applied twice (m^4)", HISTORICAL,
           _one("rope:yarn_mscale", _mscale_squared), TINY + ("golden:oracle/yarn-on-mscale",)),
    Mutant("route-scale-missing", "routed_scaling_factor not applied", HISTORICAL,
           _one("moe:gate_weights", _no_route_scale), ROUTING + TINY),
    Mutant("scoring-func-swapped", "sigmoid and softmax scoring swapped (scoring_func ignored)", HISTORICAL,
           _one("moe:affinities", _swapped_scoring), ROUTING + TINY),
    Mutant("yarn-ramp-betas-swapped", "YaRN ramp computed with beta_fast and beta_slow swapped", HARNESS,
           _one("rope:yarn_ramp", _ramp_betas_swapped), TINY + ("golden:oracle/yarn-on-mscale",)),
    Mutant("softmax-scale-nope-only", "attention scale 1/sqrt(qk_nope_head_dim) instead of 1/sqrt(nope + rope)",
           HARNESS, _one("rope:softmax_scale", _scale_over_nope_only), TINY + CROSS),
    Mutant("rope-on-nope-part", "query heads split [rope; nope]: RoPE rotates the first elements, part of nope",
           HARNESS, _one("attention:split_query_heads", _rope_part_first), TINY + CROSS),
    Mutant("gate-bias-in-logits", "correction bias added to the router logits (as a Linear bias), reaching the "
           "gating weights", HARNESS, _one("moe:affinities", _bias_in_logits), ROUTING + TINY),
    Mutant("kv-norm-skipped", "kv_a_layernorm not applied to the kv latent", HARNESS,
           _without_norm("project_latent", "kv_a_norm"), TINY + CROSS),
    Mutant("q-norm-skipped", "q_a_layernorm not applied to the query latent", HARNESS,
           _without_norm("project_queries", "q_a_norm"), TINY + CROSS),
    Mutant("cache-off-by-one", "a decode step attends to the cache without its own new entry", HARNESS,
           _one("attention:causal_mask", _decode_misses_own_key), TINY + DECODE),
    Mutant("decode-position-off-by-one", "decode rotates the new token at position + 1", HARNESS,
           _one("rope:rotation_angles", _decode_rope_shifted), TINY + DECODE),
    Mutant("causal-mask-peeks-ahead", "the prefill mask lets each token see the next one", HARNESS,
           _one("attention:causal_mask", _peek_ahead), TINY + DECODE),
    Mutant("shared-expert-dropped", "the shared experts' output is not added", HARNESS,
           _one("moe:shared_experts", _no_shared), TINY + GROUPS),
    Mutant("group-limit-ignored", "top-k over all experts, topk_group not enforced", HARNESS,
           _one("moe:limit_to_groups", _no_group_limit), ROUTING + TINY + GROUPS),
    Mutant("softmax-gate-renormalized", "softmax gating weights renormalized like sigmoid ones", HARNESS,
           _one("moe:gate_weights", _renormalize_softmax), ROUTING),
    Mutant("fp8-scale-over-127", "activation scales amax/127 (int8 habit) instead of amax/448", SEED,
           _one("fp8:activation_scales", _scale_over_127), FP8),
    Mutant("fp8-block-transposed", "weight block scales indexed (col, row) instead of (row, col)", HARNESS,
           (Patch("fp8:dequantize_weight", _transposed_dequantize), Patch("fp8:fp8_gemm", _transposed_gemm)),
           ("fp8:h100-gemm[k4096]", "fp8:gemm", "golden:official/v3-tiny-fp8", "golden:oracle/fp8-weights")),
    Mutant("ue8m0-rounds-down", "ue8m0 scales rounded down to a power of two instead of up", HARNESS,
           _one("fp8:round_up_to_power_of_two", _ue8m0_down), FP8),
    Mutant("ue8m0-in-every-linear", "ue8m0 applied in every fp8 linear where the official code rounds only in "
           "wq_a, wkv_a and the routed experts", HARNESS, _one("attention:linear", _ue8m0_everywhere), FP8_ACT),
    Mutant("ue8m0-official-rounding-exact", "the official float32 ceil(log2 s) replaced by the exact power of two",
           HARNESS, _one("fp8:round_up_as_official", _exact_official_rounding), ("fp8:ue8m0-official-log2f",)),
    Mutant("fp8-naive-kv-b-dequantized", "naive attention multiplies wkv_b dequantized instead of quantizing its "
           "input (the absorbed form's numerics)", HARNESS, _one("attention:linear", _naive_kv_b_dequantized),
           FP8_ACT),
    Mutant("mtp-concat-swapped", "MTP input concatenated [hidden; embedding] (the report's order) on released weights",
           HARNESS, _one("mtp:mtp_input", _swapped_concat), MTP),
    Mutant("mtp-hidden-before-final-norm", "MTP fed the main model's last block output before the final norm",
           HARNESS, _one("mtp:mtp_source", _pre_norm_source), MTP),
    Mutant("mtp-unshifted-tokens", "MTP depth k embeds t(i+k-1) instead of t(i+k): the unshifted prompt", HARNESS,
           _one("mtp:tokens_ahead", _unshifted_tokens), MTP),
    Mutant("mtp-zero-position-0-by-default", "the embedding at position 0 zeroed whatever the option says", HARNESS,
           _one("mtp:mtp_embedding", _option(zero_first_position=True)), MTP),
    Mutant("mtp-head-norm-skipped", "shared_head.norm not applied before the MTP head", HARNESS,
           (Patch("mtp:mtp_head", _drop_norm("head_norm")), Patch("norm:rms_norm", _norm_tolerating_none)), MTP),
    Mutant("mtp-drafts-unverified", "drafted tokens accepted without the main model's verification", HARNESS,
           _one("mtp:accepted_prefix", _accept_everything), SPECULATIVE),
    Mutant("mtp-no-rollback", "rejected draft positions left in the caches", HARNESS,
           _one("model:Transformer.truncate", _no_rollback), SPECULATIVE),
    Mutant("router-in-bfloat16", "the router's inputs in bfloat16 (SEMANTICS: float32 logits)", HARNESS,
           _one("moe:affinities", _router_in_bfloat16), ROUTING + TINY),
    Mutant("ue8m0-in-every-linear-during-decode", "ue8m0 in every fp8 linear of a decode step only (prefill as "
           "the official code)", HARNESS, _one("attention:linear", _ue8m0_everywhere_in_decode),
           FP8_ACT + ("properties:prefill-decode-fp8",)),
    Mutant("topk-group-plus-one", "one expert group more than topk_group kept", HARNESS,
           _one("moe:limit_to_groups", _groups_off_by(1)), ROUTING + GROUPS + TINY),
    Mutant("topk-group-minus-one", "one expert group fewer than topk_group kept", HARNESS,
           _one("moe:limit_to_groups", _groups_off_by(-1)), ROUTING + GROUPS + TINY),
    Mutant("first-k-dense-off-by-one", "MoE blocks numbered from first_k_dense_replace - 1: per-block data (forced "
           "expert choices) taken one block off", HARNESS, _one("model:moe_block", _moe_blocks_from_previous_layer),
           CROSS + ("mtp:cross[float32]",)),
    Mutant("gate-up-swapped", "SwiGLU's gate and up projections swapped: up(silu(...)) instead of gate", HARNESS,
           _one("ffn:swiglu_ffn", _gate_up_swapped), TINY + CROSS),
    Mutant("rmsnorm-over-rope-key", "kv_a_layernorm over the whole [c_kv; k_pe], the rope key included", HARNESS,
           _one("attention:project_latent", _norm_over_rope_key), TINY + CROSS),
    Mutant("decode-reads-another-sequence-cache", "a decode step's sequence attends over another sequence's cache",
           HARNESS, (Patch("attention:absorbed_attention", _decode_reads_neighbour_cache),
                     Patch("attention:naive_attention", _decode_reads_neighbour_cache)), BATCH),
    Mutant("rms-norm-eps-hard-coded", "rms_norm_eps fixed at 1e-6 whatever the config says", HARNESS,
           _one("norm:rms_norm", _eps_fixed), EPS_THETA),
    Mutant("rope-theta-hard-coded", "rope_theta fixed at 10000 whatever the config says", HARNESS,
           _one("rope:rope_frequencies", _theta_fixed), EPS_THETA),
    Mutant("gradients-halved", "every gradient of the training step scaled by 0.5", HARNESS,
           _one("training:gradients", _scaled(0.5)), TRAINING),
    Mutant("gradients-times-five", "every gradient of the training step scaled by 5", HARNESS,
           _one("training:gradients", _scaled(5.0)), TRAINING),
    Mutant("bias-update-sign", "the correction bias moved toward the load (up for an overloaded expert)", HARNESS,
           _one("training:bias_update", _bias_sign_flipped), TRAINING),
    Mutant("balance-loss-alpha-ignored", "the sequence-wise balance loss without its alpha", HARNESS,
           _one("training:balance_loss", _alpha_ignored), TRAINING),
    Mutant("mtp-loss-weight-not-divided", "the MTP loss weighted lambda instead of lambda / D", HARNESS,
           _one("training:mtp_loss_scale", _mtp_weight_not_divided), TRAINING),
    Mutant("pipeline-w-lifo", "zero-bubble weight-gradient steps taken last in, first out", HARNESS,
           _one("pipeline:next_weight_gradient", _last_in_first_out), PIPELINE),
    Mutant("ep-half-capacity", "expert-parallel dispatch buffers of half the no-drop capacity (copies dropped)",
           HARNESS, _one("ep:dispatch_masks", _half_capacity), EP),
    Mutant("ep-ungated", "expert-parallel combine without the gating weights", HARNESS,
           _one("ep:expert_parallel_experts", _ungated), EP),
    *(Mutant(f"kernel-{entry.replace('_', '-')}-last-row", f"the native kernel's {entry} entry misses its last "
             "output row", HARNESS, _one(f"kernel:{entry}", _last_row_dropped), KERNEL)
      for entry in ("matvec", "per_head", "experts", "latent_attention")),
    # Controls: one per check family, each planted through the same mechanism as the real mutants.
    Mutant("control-pass-through", "pass-through wrappers around route, RoPE, the mask and the activation "
           "quantizer", CONTROL,
           tuple(Patch(target, _pass_through) for target in ("moe:route", "rope:apply_rope", "attention:causal_mask",
                                                             "fp8:quantize_activation")),
           ROUTING + TINY + ("fp8:gemm",)),
    Mutant("control-same-constant", "the masked-group constant replaced by an equal value", CONTROL,
           _one("moe:MASKED_CHOICE", _constant(float("-inf"))), ROUTING),
    Mutant("control-attention", "pass-through wrappers around both attention forms", CONTROL,
           (Patch("attention:absorbed_attention", _pass_through), Patch("attention:naive_attention", _pass_through)),
           ("properties:batch-rows", "properties:naive-absorbed")),
    Mutant("control-fp8", "pass-through wrappers around the activation scales and the fp8 GEMM", CONTROL,
           (Patch("fp8:activation_scales", _pass_through), Patch("fp8:fp8_gemm", _pass_through)), FP8[:4]),
    Mutant("control-mtp", "pass-through wrappers around the MTP input and head", CONTROL,
           (Patch("mtp:mtp_input", _pass_through), Patch("mtp:mtp_head", _pass_through)),
           ("mtp:cross[float32]",)),
    Mutant("control-golden", "a pass-through wrapper around RMSNorm, on golden cases of both producers", CONTROL,
           _one("norm:rms_norm", _pass_through), TINY + EPS_THETA[:1]),
    Mutant("control-training", "pass-through wrappers around the gradients and the bias update", CONTROL,
           (Patch("training:gradients", _pass_through), Patch("training:bias_update", _pass_through)), TRAINING),
    Mutant("control-pipeline", "a pass-through wrapper around the weight-gradient queue", CONTROL,
           _one("pipeline:next_weight_gradient", _pass_through), PIPELINE),
    Mutant("control-ep", "pass-through wrappers around the dispatch masks and the expert-parallel experts", CONTROL,
           (Patch("ep:dispatch_masks", _pass_through), Patch("ep:expert_parallel_experts", _pass_through)), EP),
    Mutant("control-kernel", "pass-through wrappers around every native kernel entry", CONTROL,
           tuple(Patch(f"kernel:{entry}", _pass_through) for entry in ("matvec", "per_head", "experts",
                                                                       "latent_attention")), KERNEL),
]
MUTANTS = {mutant.key: mutant for mutant in CATALOGUE}
# The roles a backend's mutation targets name (Backend.mutation_targets): every role some mutant plants in.
ROLES = tuple(sorted({patch.target.split(":")[0] for mutant in CATALOGUE for patch in mutant.patches}))
