"""The mutation catalogue: known bug classes planted into each backend, and the checks that must catch them.

A mutant replaces one function (or constant) of a backend with a buggy version for the duration of a
run, wherever the backend's modules hold it; the shipped code is never changed. `run_mutant` then runs
the suite's relevant checks (the test functions themselves, called in-process) and records which
failed: those killed it. A mutant no check kills is a hole in the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

# --- planting ------------------------------------------------------------------------------------------

_BACKEND_PACKAGES = {"reference": ("reference",), "tf": ("impl",)}


def _holders(original: object, packages: tuple[str, ...]) -> list[tuple[object, str]]:
    """Every (module or class, attribute) of `packages` that holds `original`."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in packages:
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                found.append((module, attribute))
            elif isinstance(value, type) and value.__module__ == name:
                found += [(value, a) for a, v in vars(value).items() if v is original]
    return found


def resolve(target: str) -> tuple[object, str]:
    """The owner (module or class) and attribute name of `module:attribute` or `module:Class.attribute`."""
    module_name, path = target.split(":")
    owner = importlib.import_module(module_name)
    *classes, attribute = path.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name)
    return owner, attribute


@contextlib.contextmanager
def replaced(target: str, make_new: Callable[[object], object], packages: tuple[str, ...]) -> Iterator[None]:
    """Replace `module:attribute` (or `module:Class.attribute`) by make_new(original) wherever `packages` hold it."""
    owner, attribute = resolve(target)
    original = vars(owner)[attribute]
    new = make_new(original)
    holders = _holders(original, packages) or [(owner, attribute)]
    with contextlib.ExitStack() as stack:
        for holder, name in holders:
            stack.callback(setattr, holder, name, original)
            setattr(holder, name, new)
        yield


# --- buggy versions, one per bug class and backend ------------------------------------------------------------

def _np():
    return importlib.import_module("reference.moe")


def _tf():
    return importlib.import_module("tensorflow")


def _route_biased_weights_np(original):
    moe = _np()

    def route(x, gate, config):
        scores = moe.affinities(x, gate, config)
        choice = scores if gate.bias is None else scores + gate.bias
        experts = moe.top_k(moe.limit_to_groups(choice, config), config.n_activated_experts)
        return moe.gate_weights(choice, experts, config), experts
    return route


def _route_biased_weights_tf(original):
    moe, tf = importlib.import_module("impl.moe"), _tf()

    def route(x, gate, config):
        scores = moe.affinities(x, gate, config)
        choice = scores if gate.bias is None else scores + gate.bias
        experts = tf.math.top_k(moe.limit_to_groups(choice, config), config.n_activated_experts).indices
        return moe.gate_weights(choice, experts, config), experts
    return route


def _group_max_np(original):
    def group_scores(choice, config):
        return choice.reshape(choice.shape[0], config.n_expert_groups, -1).max(axis=-1)
    return group_scores


def _group_max_tf(original):
    tf = _tf()

    def group_scores(choice, config):
        return tf.reduce_max(tf.reshape(choice, [-1, config.n_expert_groups, config.experts_per_group]), axis=-1)
    return group_scores


def _no_group_limit(original):
    def limit_to_groups(choice, config):
        return choice
    return limit_to_groups


def _half_split_rope_np(original):
    def apply_rope(x, angles):
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        cos, sin = np.cos(angles), np.sin(angles)
        return np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return apply_rope


def _half_split_rope_tf(original):
    tf = _tf()

    def apply_rope(x, cos, sin):
        half = x.shape[-1] // 2
        wide = tf.cast(x, tf.float32)
        first, second = wide[..., :half], wide[..., half:]
        return tf.cast(tf.concat([first * cos - second * sin, first * sin + second * cos], axis=-1), x.dtype)
    return apply_rope


def _no_route_scale(original):
    def gate_weights(scores, experts, config):
        return original(scores, experts, config) / config.route_scale
    return gate_weights


def _always_renormalize_np(original):
    def gate_weights(scores, experts, config):
        weights = np.take_along_axis(scores, experts, axis=-1)
        return weights / weights.sum(axis=-1, keepdims=True) * config.route_scale
    return gate_weights


def _always_renormalize_tf(original):
    tf = _tf()

    def gate_weights(scores, experts, config):
        weights = tf.gather(scores, experts, batch_dims=1)
        return weights / tf.reduce_sum(weights, axis=-1, keepdims=True) * config.route_scale
    return gate_weights


def _swapped_scoring(original):
    def affinities(x, gate, config):
        swapped = "softmax" if config.score_func == "sigmoid" else "sigmoid"
        return original(x, gate, config.replace(score_func=swapped, gate_bias=False, route_scale=1.0))
    return affinities


def _drop_norm(field_name: str):
    """Calls the projection with that norm's weight set to None; with `_NORM_TOLERATES_NONE` the norm is skipped."""
    def make(original):
        def project(x, weights, config, *rest):
            return original(x, dataclasses.replace(weights, **{field_name: None}), config, *rest)
        return project
    return make


def _rms_norm_tolerating_none(original):
    def rms_norm(x, weight, eps):
        return x if weight is None else original(x, weight, eps)
    return rms_norm


def _decode_misses_own_key_np(original):
    def causal_mask(start_pos, queries, keys):
        if queries == 1:
            return np.arange(keys)[None, :] < start_pos
        return original(start_pos, queries, keys)
    return causal_mask


def _decode_misses_own_key_tf(original):
    tf = _tf()

    def visible_slots(position, slots):
        return (tf.range(slots) < position)[None, :]
    return visible_slots


def _peek_ahead_np(original):
    def causal_mask(start_pos, queries, keys):
        if queries == 1:
            return original(start_pos, queries, keys)
        return np.arange(keys)[None, :] <= start_pos + np.arange(queries)[:, None] + 1
    return causal_mask


def _peek_ahead_tf(original):
    tf = _tf()

    def causal_mask(length):
        return tf.range(length)[None, :] <= tf.range(length)[:, None] + 1
    return causal_mask


def _decode_rope_shifted_np(original):
    def rotation_angles(config, positions):
        positions = np.asarray(positions)
        return original(config, positions + 1 if positions.size == 1 else positions)
    return rotation_angles


def _decode_rope_shifted_tf(original):
    def rope_at(self, positions):
        return original(self, positions + 1 if positions.shape[0] == 1 else positions)
    return rope_at


def _no_shared_np(original):
    def shared_experts(x, shared, numerics):
        return np.zeros_like(x)
    return shared_experts


def _no_shared_tf(original):
    tf = _tf()

    def shared_experts(x, shared, numerics):
        return tf.zeros_like(x)
    return shared_experts


def _scale_over_127_np(original):
    def activation_scales(x, scale_fmt=None, block=128):
        return original(x, scale_fmt, block) * np.float32(448 / 127)
    return activation_scales


def _scale_over_127_tf(original):
    def activation_scales(x, scale_fmt):
        return original(x, scale_fmt) * (448 / 127)
    return activation_scales


def _ue8m0_down_np(original):
    def round_down(scales):
        mantissa, exponent = np.frexp(scales)
        return np.where(mantissa == 0.5, scales, np.ldexp(np.ones_like(scales), exponent - 1)).astype(scales.dtype)
    return round_down


def _ue8m0_down_tf(original):
    tf = _tf()

    def round_down(scales):
        bits = tf.bitwise.bitwise_and(tf.bitcast(scales, tf.int32), ~0x7FFFFF)
        return tf.bitcast(bits, tf.float32)
    return round_down


def _transposed_blocks_np(original):
    def dequantize_weight(quantized, scale_inv, dtype=np.float64, block=128):
        grid = scale_inv.T if scale_inv.shape[0] == scale_inv.shape[1] else scale_inv[::-1, ::-1]
        return original(quantized, np.ascontiguousarray(grid), dtype, block)
    return dequantize_weight


def _transposed_blocks_tf(original):
    tf = _tf()

    def dequantize(weight, scale_inv, dtype):
        square = scale_inv.shape[-1] == scale_inv.shape[-2]
        grid = tf.linalg.matrix_transpose(scale_inv) if square else tf.reverse(scale_inv, axis=[-2, -1])
        return original(weight, grid, dtype)
    return dequantize


def _transposed_gemm_blocks_np(original):
    def fp8_gemm(x_q, x_scale, w_q, w_scale, dtype=np.float64, block=128):
        grid = w_scale.T if w_scale.shape[0] == w_scale.shape[1] else w_scale[::-1, ::-1]
        return original(x_q, x_scale, w_q, np.ascontiguousarray(grid), dtype, block)
    return fp8_gemm


def _transposed_gemm_blocks_tf(original):
    tf = _tf()

    def fp8_matmul(x_q, x_scale, w_q, w_scale):
        square = w_scale.shape[-1] == w_scale.shape[-2]
        grid = tf.linalg.matrix_transpose(w_scale) if square else tf.reverse(w_scale, axis=[-2, -1])
        return original(x_q, x_scale, w_q, grid)
    return fp8_matmul


def _set_to(value):
    def make(original):
        return value
    return make


def _no_mscale(original):
    def yarn_mscale(config):
        return 1.0
    return yarn_mscale


def _mscale_squared(original):
    def yarn_mscale(config):
        return original(config) ** 2
    return yarn_mscale


# --- the catalogue ----------------------------------------------------------------------------------------

Patch = tuple[str, Callable[[object], object]]


@dataclass(frozen=True)
class Mutant:
    key: str
    bug: str
    origin: str  # "historical (SPEC section 2)", "seed documents" or "harness"
    patches: dict[str, tuple[Patch, ...]]  # backend -> patches
    checks: tuple[str, ...]

    @contextlib.contextmanager
    def planted(self, backend: str) -> Iterator[None]:
        """The mutant active in `backend` (and in shared reference code the backend calls, for shared targets)."""
        with contextlib.ExitStack() as stack:
            for target, make_new in self.patches[backend]:
                packages = (target.split(".")[0],) + _BACKEND_PACKAGES[backend]
                stack.enter_context(replaced(target, make_new, packages))
            yield


HISTORICAL, SEED, HARNESS = "historical (SPEC section 2)", "seed documents", "harness catalogue"
# Cheapest first, so that a run that stops at the first kill stays short.
ROUTING = ("routing:groups", "routing:choice", "routing:weights", "routing:k")
GOLDEN = ("golden:official/v3-tiny", "golden:official/v3-tiny-fp8", "golden:oracle/moe-groups")
MODEL = ("properties:prefill-decode", "properties:naive-absorbed")
FP8 = ("fp8:activation-scales", "fp8:h100-activations", "fp8:h100-gemm", "fp8:gemm", "fp8:h100-nearer-fp8")


def _both(np_patch: Patch, tf_patch: Patch) -> dict[str, tuple[Patch, ...]]:
    return {"reference": (np_patch,), "tf": (tf_patch,)}


def _shared(patch: Patch) -> dict[str, tuple[Patch, ...]]:
    return {"reference": (patch,), "tf": (patch,)}


def _without_norm(field_name: str) -> dict[str, tuple[Patch, ...]]:
    return {"reference": (("reference.attention:project_" + ("latent" if field_name == "kv_a_norm" else "queries"),
                           _drop_norm(field_name)), ("reference.attention:rms_norm", _rms_norm_tolerating_none)),
            "tf": (("impl.attention:project_" + ("latent" if field_name == "kv_a_norm" else "queries"),
                    _drop_norm(field_name)), ("impl.attention:rms_norm", _rms_norm_tolerating_none))}


CATALOGUE = [
    Mutant("gate-weights-from-biased-scores", "gating weights taken from s + bias instead of s", HISTORICAL,
           _both(("reference.moe:route", _route_biased_weights_np), ("impl.moe:route", _route_biased_weights_tf)),
           ROUTING + GOLDEN),
    Mutant("group-score-max-with-bias", "group score = max instead of the top-2 sum when a bias exists", HISTORICAL,
           _both(("reference.moe:group_scores", _group_max_np), ("impl.moe:group_scores", _group_max_tf)),
           ROUTING + GOLDEN),
    Mutant("masked-groups-zero", "experts of dropped groups set to 0 instead of -inf", HISTORICAL,
           _both(("reference.moe:MASKED_CHOICE", _set_to(0.0)), ("impl.moe:MASKED_CHOICE", _set_to(0.0))),
           ROUTING + GOLDEN),
    Mutant("rope-half-split", "rotate-half RoPE applied to interleaved weights", HISTORICAL,
           _both(("reference.attention:apply_rope", _half_split_rope_np),
                 ("impl.attention:apply_rope", _half_split_rope_tf)), GOLDEN + MODEL),
    Mutant("yarn-mscale-missing", "YaRN attention scale m^2 left out", HISTORICAL,
           _shared(("reference.rope:yarn_mscale", _no_mscale)), GOLDEN + MODEL),
    Mutant("yarn-mscale-applied-twice", "YaRN m^2 applied twice (m^4)", HISTORICAL,
           _shared(("reference.rope:yarn_mscale", _mscale_squared)), GOLDEN + MODEL),
    Mutant("route-scale-missing", "routed_scaling_factor not applied", HISTORICAL,
           _both(("reference.moe:gate_weights", _no_route_scale), ("impl.moe:gate_weights", _no_route_scale)),
           ROUTING + GOLDEN),
    Mutant("scoring-func-swapped", "sigmoid and softmax scoring swapped (scoring_func ignored)", HISTORICAL,
           _both(("reference.moe:affinities", _swapped_scoring), ("impl.moe:affinities", _swapped_scoring)),
           ROUTING + GOLDEN),
    Mutant("kv-norm-skipped", "kv_a_layernorm not applied to the kv latent", HARNESS, _without_norm("kv_a_norm"),
           GOLDEN + MODEL),
    Mutant("q-norm-skipped", "q_a_layernorm not applied to the query latent", HARNESS, _without_norm("q_a_norm"),
           GOLDEN + MODEL),
    Mutant("cache-off-by-one", "a decode step attends to the cache without its own new entry", HARNESS,
           _both(("reference.attention:causal_mask", _decode_misses_own_key_np),
                 ("impl.attention:visible_slots", _decode_misses_own_key_tf)), GOLDEN + MODEL),
    Mutant("decode-position-off-by-one", "decode rotates the new token at position + 1", HARNESS,
           _both(("reference.attention:rotation_angles", _decode_rope_shifted_np),
                 ("impl.model:TFTransformer.rope_at", _decode_rope_shifted_tf)), GOLDEN + MODEL),
    Mutant("causal-mask-peeks-ahead", "the prefill mask lets each token see the next one", HARNESS,
           _both(("reference.attention:causal_mask", _peek_ahead_np), ("impl.attention:causal_mask", _peek_ahead_tf)),
           GOLDEN + MODEL),
    Mutant("shared-expert-dropped", "the shared experts' output is not added", HARNESS,
           _both(("reference.moe:shared_experts", _no_shared_np), ("impl.moe:shared_experts", _no_shared_tf)),
           GOLDEN),
    Mutant("group-limit-ignored", "top-k over all experts, topk_group not enforced", HARNESS,
           _both(("reference.moe:limit_to_groups", _no_group_limit), ("impl.moe:limit_to_groups", _no_group_limit)),
           ROUTING + GOLDEN),
    Mutant("softmax-gate-renormalized", "softmax gating weights renormalized like sigmoid ones", HARNESS,
           _both(("reference.moe:gate_weights", _always_renormalize_np),
                 ("impl.moe:gate_weights", _always_renormalize_tf)), ROUTING),
    Mutant("fp8-scale-over-127", "activation scales amax/127 (int8 habit) instead of amax/448", SEED,
           _both(("reference.fp8:activation_scales", _scale_over_127_np),
                 ("impl.fp8:activation_scales", _scale_over_127_tf)), FP8),
    Mutant("fp8-block-transposed", "weight block scales indexed (col, row) instead of (row, col)", HARNESS,
           {"reference": (("reference.fp8:dequantize_weight", _transposed_blocks_np),
                          ("reference.fp8:fp8_gemm", _transposed_gemm_blocks_np)),
            "tf": (("impl.fp8:dequantize", _transposed_blocks_tf), ("impl.fp8:fp8_matmul", _transposed_gemm_blocks_tf))},
           ("fp8:h100-gemm", "fp8:gemm") + GOLDEN + ("golden:oracle/fp8-weights",)),
    Mutant("ue8m0-rounds-down", "ue8m0 scales rounded down to a power of two instead of up", HARNESS,
           _both(("reference.fp8:round_up_to_power_of_two", _ue8m0_down_np),
                 ("impl.fp8:round_up_to_power_of_two", _ue8m0_down_tf)), FP8),
]


# --- checks: the suite's own test functions, called in-process -----------------------------------------------

def _golden(case_path: str) -> Callable[[str], None]:
    def check(backend: str) -> None:
        from .conftest import GOLDEN_DIR
        from .test_golden import test_golden_case

        test_golden_case(GOLDEN_DIR / case_path, backend)
    return check


def _test(module: str, name: str, **kwargs) -> Callable[[str], None]:
    def check(backend: str) -> None:
        getattr(importlib.import_module(f"conformance.{module}"), name)(backend=backend, **kwargs)
    return check


CHECKS: dict[str, Callable[[str], None]] = {
    "golden:official/v3-tiny": _golden("official/v3-tiny"),
    "golden:official/v3-tiny-fp8": _golden("official/v3-tiny-fp8"),
    "golden:oracle/moe-groups": _golden("oracle/moe-groups"),
    "golden:oracle/fp8-weights": _golden("oracle/fp8-weights"),
    "routing:groups": _test("test_routing", "test_experts_come_from_the_best_groups"),
    "routing:choice": _test("test_routing", "test_choice_uses_biased_scores"),
    "routing:weights": _test("test_routing", "test_weights_are_unbiased_normalized_and_scaled"),
    "routing:k": _test("test_routing", "test_exactly_k_distinct_experts"),
    "properties:prefill-decode": _test("test_model_properties", "test_prefill_equals_stepwise_decode"),
    "properties:naive-absorbed": _test("test_model_properties", "test_naive_attention_equals_absorbed"),
    "fp8:activation-scales": _test("test_fp8", "test_activation_scales_per_token_per_128"),
    "fp8:gemm": _test("test_fp8", "test_fp8_gemm_is_exact_blockwise_product"),
    "fp8:h100-activations": _test("test_fp8", "test_activation_quantization_matches_the_h100_bit_for_bit",
                                  case="ue8m0"),
    "fp8:h100-gemm": _test("test_fp8", "test_fp8_gemm_matches_h100_tensor_cores", case="k4096"),
    "fp8:h100-nearer-fp8": _test("test_fp8", "test_h100_fp8_golden_is_nearer_the_fp8_path_than_the_dequantized_path"),
}


@dataclass
class MutantResult:
    mutant: str
    backend: str
    killed_by: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return bool(self.killed_by)

    def to_json(self) -> dict:
        return {"mutant": self.mutant, "backend": self.backend, "killed": self.killed, "killed_by": self.killed_by,
                "survived": self.survived, "seconds": round(self.seconds, 1)}


def _first_line(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def run_mutant(mutant: Mutant, backend: str, stop_at_first_kill: bool = False) -> MutantResult:
    """Run every relevant check against `mutant` planted in `backend`; a check that fails (or crashes) kills it.

    What the checks print (hypothesis's falsifying examples) is swallowed: the result holds the first line.
    """
    result = MutantResult(mutant.key, backend)
    start = time.perf_counter()
    sink = io.StringIO()
    with mutant.planted(backend), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        for check in mutant.checks:
            try:
                CHECKS[check](backend)
            except BaseException as error:  # an assertion, a crash or hypothesis's report: all are kills
                if isinstance(error, KeyboardInterrupt):
                    raise
                result.killed_by.append(f"{check}: {_first_line(error)}")
                if stop_at_first_kill:
                    break
            else:
                result.survived.append(check)
    result.seconds = time.perf_counter() - start
    return result


def _run_one(job: tuple[str, str, bool]) -> MutantResult:
    key, backend, first_kill = job
    return run_mutant(next(m for m in CATALOGUE if m.key == key), backend, first_kill)


def run_catalogue(backends: list[str], keys: list[str] | None = None, first_kill: bool = False,
                  jobs: int = 1) -> list[MutantResult]:
    """Every mutant (or those named) on every backend; `jobs` > 1 runs them in that many processes."""
    unknown = set(keys or []) - {m.key for m in CATALOGUE}
    if unknown:
        raise ValueError(f"unknown mutant(s) {sorted(unknown)}: see `dsv3-conformance mutants --list`")
    work = [(m.key, backend, first_kill) for backend in backends for m in CATALOGUE if not keys or m.key in keys]
    if jobs <= 1:
        from tqdm.auto import tqdm

        return [_run_one(job) for job in tqdm(work, desc="mutants", unit="mutant")]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_run_one, work))
