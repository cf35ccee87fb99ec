"""FP8 numerics of each backend (SEMANTICS.md section 5): the cast rule, activation quantization, the GEMM.

Expected values come from the e4m3fn format definition, from exact float64 arithmetic, and from an
H100's tensor cores (golden/h100/fp8-gemm, produced by conformance/producers/h100_fp8.py). The harness's own
quantizer of weights (reference.fp8.quantize_weight) only makes operands; it is not what is checked.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from dsv3_conformance.reference.fp8 import dequantize_weight, quantize_weight

from dsv3_conformance.format.fp8 import FP8Error
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.format.safetensors_io import read_all
from dsv3_conformance.golden.cases import GoldenCase
from dsv3_conformance.metrics import rel_err
from dsv3_conformance.paths import GOLDEN_DIR
from dsv3_conformance.verdict import CheckFailed, expect, expect_close, expect_equal
from dsv3_conformance.checks.registry import check, examples, register

COMPONENT = "FP8 numerics"
FP8_CASE = GOLDEN_DIR / "official" / "v3-tiny-fp8"
H100_GEMM = GOLDEN_DIR / "h100" / "fp8-gemm"


@check("fp8:cast-rule", COMPONENT)
def cast_rule_saturates_keeps_nan_and_rounds_to_even(backend):
    """Beyond +-448 saturates, NaN stays NaN, ties round to even."""
    values = np.array([500.0, -500.0, 1e9, 448.0, 464.0, 1.0625, 1.1875, -1.0625, 0.0, np.nan], np.float32)
    # e4m3fn: max 448; 1.0625 lies halfway between 1 and 1.125 (mantissa 000 even), 1.1875 between 1.125 and 1.25.
    expected = np.array([448, -448, 448, 448, 448, 1.0, 1.25, -1.0, 0.0, np.nan], np.float32)
    expect_equal("e4m3 cast of the probe values", np.asarray(backend.component("to_e4m3")(values)).astype(np.float32),
                 expected)


@check("fp8:activation-scales", COMPONENT)
@examples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([None, "ue8m0"]), st.floats(1e-7, 1e3),
          st.integers(0, 2**31 - 1))
def activation_scales_per_token_per_128(backend, tokens, blocks, scale_fmt, magnitude, seed):
    """Scales max(amax, 1e-4)/448 per token per 128 channels (ue8m0: the next power of two); values cast."""
    x = np.random.default_rng(seed).standard_normal((tokens, 128 * blocks)).astype(np.float32) * np.float32(magnitude)
    q, scales = backend.component("quantize_activation")(x, scale_fmt)
    q, scales = np.asarray(q).astype(np.float32), np.asarray(scales)
    amax = np.abs(x.reshape(tokens, blocks, 128)).max(-1)
    plain = (np.maximum(amax, np.float32(1e-4)) / np.float32(448)).astype(np.float32)
    if scale_fmt == "ue8m0":
        expect(bool(np.all(np.log2(scales) == np.round(np.log2(scales)))), f"ue8m0 scales not powers of two: {scales}")
        expect(bool(np.all(scales >= plain) and np.all(scales < 2 * plain)),
               "ue8m0 must round the scale up to the next power of two")
    else:
        expect_equal("activation scales vs max(amax, 1e-4)/448", scales, plain)
    expect(bool(np.all(np.abs(q) <= 448)), "quantized activations beyond +-448")
    expected = np.clip(x.reshape(tokens, blocks, 128) / scales[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    expect_equal("e4m3 activations vs x / scale cast to nearest even", q.reshape(tokens, blocks, 128),
                 expected.astype(np.float32))


def _quantize(backend, x: np.ndarray, scale_fmt) -> tuple[np.ndarray, np.ndarray]:
    q, scales = backend.component("quantize_activation")(x, scale_fmt)
    return np.asarray(q).astype(np.float64), np.asarray(scales).astype(np.float64)


@check("fp8:round-trip-error", COMPONENT)
@examples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([None, "ue8m0", "ue8m0-log2f"]),
          st.floats(1e-6, 1e4), st.integers(0, 2**31 - 1))
def round_trip_within_half_an_e4m3_step(backend, tokens, blocks, scale_fmt, magnitude, seed):
    """|q s - x| is at most half an e4m3 step at |x/s| (2^-4 relative for normals, 2^-10 s below 2^-6 s)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((tokens, 128 * blocks)) * 10.0 ** rng.uniform(-2, 0, (tokens, 1)) * magnitude)
    x = x.astype(np.float32)
    q, scales = _quantize(backend, x, scale_fmt)
    scale = np.repeat(scales, 128, axis=-1)
    ratio = np.abs(x / scale)
    step = np.where(ratio >= 2.0 ** -6, 2.0 ** (np.floor(np.log2(np.maximum(ratio, 2.0 ** -6))) - 3), 2.0 ** -9)
    # Saturation (official float32-log2 scales may put |x/s| just past 448) is the cast rule's business.
    bound = np.where(ratio <= 448, step / 2, ratio - 448) * scale * (1 + 1e-6)
    error = np.abs(q * scale - x)
    expect(bool(np.all(error <= bound)),
           f"round-trip error beyond half an e4m3 step: worst excess {float((error - bound).max()):.3e}")


@check("fp8:scale-bounds", COMPONENT)
@examples(st.integers(1, 4), st.integers(1, 3), st.floats(1e-7, 1e6), st.integers(0, 2**31 - 1))
def ue8m0_scales_are_powers_of_two_never_below_amax_over_448(backend, tokens, blocks, magnitude, seed):
    """Exact ue8m0: a power of two in [amax/448, 2 amax/448); the official float32-log2 form: a power of two
    equal to it or half of it."""
    x = (np.random.default_rng(seed).standard_normal((tokens, 128 * blocks)) * magnitude).astype(np.float32)
    _, exact = _quantize(backend, x, "ue8m0")
    _, official = _quantize(backend, x, "ue8m0-log2f")
    plain = np.maximum(np.abs(x.reshape(tokens, blocks, 128)).max(-1), np.float32(1e-4)) / np.float32(448)
    for name, scales in (("ue8m0", exact), ("ue8m0-log2f", official)):
        mantissa, _ = np.frexp(scales)
        expect(bool(np.all(mantissa == 0.5)), f"{name} scales are not powers of two: {scales[mantissa != 0.5][:4]}")
    expect(bool(np.all(exact >= plain) and np.all(exact < 2 * plain)),
           "exact ue8m0 scales must be the least power of two >= max(amax, 1e-4)/448")
    expect(bool(np.all((official == exact) | (official == exact / 2))),
           "official ue8m0 scales must equal the exact ones or, within a float32 ulp of log2, half of them")


@check("fp8:ue8m0-official-log2f", COMPONENT)
def official_rounding_rounds_down_just_above_a_power_of_two(backend):
    """amax = 0.875 + 2^-24 makes s = 2^-9 (1 + 2^-23): exact ue8m0 gives 2^-8; the official float32
    ceil(log2 s) is ceil(-9.0) and gives 2^-9, and the amax element then saturates to 448."""
    x = np.zeros((1, 128), np.float32)
    x[0, 0] = np.float32(0.875) + np.float32(2.0 ** -24)
    x[0, 1] = -0.25
    _, exact = _quantize(backend, x, "ue8m0")
    q, official = _quantize(backend, x, "ue8m0-log2f")
    expect_equal("exact ue8m0 scale", exact, np.array([[2.0 ** -8]]))
    expect_equal("official (float32 log2) ue8m0 scale", official, np.array([[2.0 ** -9]]))
    expect_equal("e4m3 values under the official scale", q[0, :2], np.array([448.0, -128.0]))


@check("fp8:zero-and-denormal-blocks", COMPONENT)
@examples(st.sampled_from([None, "ue8m0", "ue8m0-log2f"]))
def zero_and_denormal_blocks_take_the_floor_scale(backend, scale_fmt):
    """A zero block and a block of float32 denormals both use the 1e-4 amax floor and quantize to zeros."""
    x = np.zeros((2, 256), np.float32)
    x[1, :128] = np.float32(1e-40) * np.arange(1, 129, dtype=np.float32)  # denormal float32 values
    x[1, 128:] = 1.0
    q, scales = _quantize(backend, x, scale_fmt)
    floor = np.float64(np.float32(1e-4) / np.float32(448))
    expected_floor = {None: floor, "ue8m0": 2.0 ** np.ceil(np.log2(floor)), "ue8m0-log2f": 2.0 ** np.ceil(np.log2(floor))}
    expect_equal("scales of the zero and denormal blocks", np.array([scales[0, 0], scales[0, 1], scales[1, 0]]),
                 np.full(3, np.float32(expected_floor[scale_fmt]), np.float64))
    expect(bool(np.all(q[0] == 0) and np.all(q[1, :128] == 0)), "zero and denormal blocks must quantize to zeros")


@check("fp8:requantize-identity", COMPONENT)
@examples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([None, "ue8m0", "ue8m0-log2f"]),
          st.integers(-20, 10), st.integers(0, 2**31 - 1))
def quantize_of_dequantized_is_identity(backend, tokens, blocks, scale_fmt, exponent, seed):
    """Blocks of e4m3 values holding +-448, times a power-of-two scale, quantize back to the same bits."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((tokens, blocks, 128)).astype(np.float32) * 100
    q = np.clip(q, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    q[..., 0] = 448.0 * rng.choice([-1.0, 1.0], (tokens, blocks))
    scale = np.float32(2.0 ** exponent)
    back, scales = _quantize(backend, (q * scale).reshape(tokens, -1), scale_fmt)
    expect_equal("scales of dequantized blocks", scales, np.full((tokens, blocks), scale, np.float64))
    expect_equal("e4m3 values after quantize(dequantize(q))", back.reshape(tokens, blocks, 128), q.astype(np.float64))


@check("fp8:non-finite-refused", COMPONENT)
@examples(st.sampled_from([np.nan, np.inf, -np.inf]), st.sampled_from([None, "ue8m0", "ue8m0-log2f"]))
def non_finite_activations_are_refused(backend, value, scale_fmt):
    """NaN or Inf in an activation block is refused with FP8Error naming it, never quantized silently."""
    x = np.ones((2, 256), np.float32)
    x[1, 130] = value
    try:
        backend.component("quantize_activation")(x, scale_fmt)
    except FP8Error as error:
        expect("non-finite" in str(error), f"the FP8Error does not say the input is non-finite: {error}")
        return
    raise CheckFailed(f"an activation holding {value} was quantized without an error")


@check("fp8:gemm", COMPONENT)
@examples(st.sampled_from([1, 7, 40]), st.integers(1, 3), st.sampled_from([1, 100, 128, 129, 256, 300]),
          st.integers(0, 2**31 - 1))
def fp8_gemm_is_exact_blockwise_product(backend, rows, k_blocks, out_features, seed):
    """With fp8 operands the blockwise GEMM equals (x_q s_x)(w_q s_w)^T in float64; output widths straddle
    the 128 block boundary, so multi-block scale grids are exercised."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 128 * k_blocks)).astype(np.float32)
    w_q, w_scale = quantize_weight(rng.standard_normal((out_features, 128 * k_blocks)))
    x_q, x_scale = backend.component("quantize_activation")(x, None)
    got = backend.component("fp8_gemm")(x_q, x_scale, w_q, w_scale)
    exact = ((np.asarray(x_q).astype(np.float64).reshape(rows, k_blocks, 128) * np.asarray(x_scale)[..., None])
             .reshape(rows, -1) @ dequantize_weight(w_q, w_scale).T)
    expect_close("blockwise fp8 GEMM vs float64 product of the dequantized operands", got, exact,
                 f"fp8.gemm.{np.asarray(got).dtype}")


@check("fp8:k-multiple-of-128", COMPONENT)
def refuses_k_not_multiple_of_128(backend):
    """Activations whose width is not a multiple of 128 are refused with FP8Error."""
    try:
        backend.component("quantize_activation")(np.ones((2, 200), np.float32), None)
    except FP8Error:
        return
    raise CheckFailed("an activation width of 200 was quantized; the fp8 path needs multiples of 128")


@check("fp8:h100-nearer-fp8", COMPONENT)
def h100_golden_is_nearer_the_fp8_path_than_the_dequantized_path(backend):
    """The H100 run used the activation-quantized path: it must sit closer to it than to the dequantized path.

    SEMANTICS.md section 5: the two paths differ by 7.5e-2 on logits; H100 vs exact emulation by 4-7e-2.
    """
    case = GoldenCase.load(FP8_CASE)
    h100 = next(file for file in case.files if file.gemm_impl == "fp8")
    weights = case.weights()
    prompt, decoded = case.tokens(h100, "tokens.prompt"), case.tokens(h100, "tokens.decoded")
    steps = len([name for name in h100.tensors if name.startswith("decode.")])
    expected = np.stack([h100.tensors["prefill.logits_last"]] + [h100.tensors[f"decode.{t}.logits"] for t in range(steps)])
    distance = {}
    for impl in ("fp8", "bf16"):
        runner = backend.make_runner(case.config, weights, Numerics(impl))
        logits = [runner.prefill(prompt).logits_last] + [runner.decode(decoded[:, t]).logits_last for t in range(steps)]
        distance[impl] = rel_err(np.stack(logits), expected)
    expect(distance["fp8"] < distance["bf16"],
           f"rel_err to the H100 run: fp8 path {distance['fp8']:.3e}, dequantized path {distance['bf16']:.3e}")


def h100_cases() -> dict[str, dict]:
    return {name: case for name, case in json.loads((H100_GEMM / "meta.json").read_text())["cases"].items()
            if "M" in case}


def _h100(case: str) -> tuple[dict, dict]:
    meta = h100_cases()[case]
    data = {name.split(".", 1)[1]: array for name, array in read_all(H100_GEMM / "fp8-gemm.safetensors").items()
            if name.startswith(f"{case}.")}
    for name in ("x_q", "w_q"):  # stored as e4m3 bit patterns
        data[name] = data[name].view(ml_dtypes.float8_e4m3fn)
    return meta, data


def _h100_activations(case: str):
    def activation_quantization_matches_the_h100_bit_for_bit(backend):
        """Same scales and e4m3 values as quantized on an H100, zero rows and sub-floor rows included."""
        meta, data = _h100(case)
        q, scales = backend.component("quantize_activation")(data["x"], meta["scale_fmt"])
        expect_equal("activation scales vs the H100", np.asarray(scales), data["x_scale"])
        expect_equal("e4m3 bit patterns vs the H100", np.asarray(q).view(np.uint8), data["x_q"].view(np.uint8))
    return activation_quantization_matches_the_h100_bit_for_bit


def _h100_gemm(case: str):
    def fp8_gemm_matches_h100_tensor_cores(backend):
        """The blockwise GEMM vs cuBLAS fp8 tensor cores with float32 promotion per 128-wide K slice."""
        meta, data = _h100(case)
        got = backend.component("fp8_gemm")(data["x_q"], data["x_scale"], data["w_q"], data["w_scale"])
        expect_close(f"blockwise fp8 GEMM M={meta['M']} N={meta['N']} K={meta['K']} vs the H100", got, data["y"],
                     "fp8.gemm.h100")
    return fp8_gemm_matches_h100_tensor_cores


for _case in h100_cases():
    register(f"fp8:h100-activations[{_case}]", COMPONENT, _h100_activations(_case))
    register(f"fp8:h100-gemm[{_case}]", COMPONENT, _h100_gemm(_case))
