"""Each backend against the float64 reference on generated models, prefill and decode, on equal routing.

The candidate runs first and its expert choices are forced on the reference: in lower precision a near
tie may route a token differently, which is legitimate, and must neither fail the numerics comparison
nor hide a real difference. Routing itself is held by the routing checks and the goldens. Models cover
q_lora 0 or not, sigmoid or softmax, 1 to 8 groups, strongly negative biases, YaRN on and off, fp8
weights, batches above 1, and prompts that end at the last positions of max_seq_len.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from dsv3_conformance.backends import REFERENCE, Backend, Runner, Unsupported
from dsv3_conformance.format.config import tiny
from dsv3_conformance.format.numerics import UE8M0_SCOPES, Numerics
from dsv3_conformance.verdict import expect_close
from dsv3_conformance.checks.registry import examples, register
from dsv3_conformance.checks.strategies import build_weights, model_examples, models, prompt_and_continuation

COMPONENT = "cross-backend"


def expect_same_run(what: str, backend: Backend, candidate: Runner, expected: Runner, prompt: np.ndarray,
                    following: np.ndarray, policy_key: str):
    """Prefill `prompt` then decode each column of `following` on both runners; compare all logits.

    `expected` (the reference or the oracle) is forced to the candidate's expert choices at every step. The
    candidate's `backend` picks the policy: `policy_key`, or the quantization policy of a quantized backend.
    """
    capacity = prompt.shape[1] + following.shape[1]
    step = candidate.prefill(prompt, capacity=capacity)
    if candidate.config.n_layers > candidate.config.n_dense_layers and not step.experts:
        raise Unsupported(f"{type(candidate).__name__} reports no chosen experts, which this comparison forces on "
                          "the other side", "experts")
    got, wanted = [step.logits], [expected.prefill(prompt, step.experts).logits]
    for column in following.T:
        step = candidate.decode(column)
        got.append(step.logits)
        wanted.append(expected.decode(column, step.experts).logits)
    return expect_close(f"{what}: logits of {prompt.shape[1]} prompt positions and {following.shape[1]} decode "
                        f"steps (batch {len(prompt)})", np.concatenate(got, axis=1), np.concatenate(wanted, axis=1),
                        f"quant.{backend.quantization}" if backend.quantization else policy_key)


def require_dtype(backend, dtype: str) -> None:
    """A candidate in `dtype` against the float64 reference (which it must compute in)."""
    if dtype not in backend.dtypes:
        raise Unsupported(f"backend {backend.name} does not compute in {dtype}", dtype)


def against_reference_in(dtype: str):
    """`applies` of a check comparing a backend in `dtype` with the float64 reference: the reference is its own
    oracle, compared with itself in float32 only."""
    def applies(backend) -> str | None:
        if backend == REFERENCE and dtype != "float32":
            return "the reference is the float64 oracle of this check; it is compared with itself in float32 only"
        return None
    return applies


def _compare(backend, dtype, config, weights, data, numerics, policy_key):
    prompt, following = data.draw(prompt_and_continuation(config))
    expect_same_run(f"{backend.name} in {dtype} vs float64 reference on equal routing", backend,
                    backend.make_runner(config, weights, numerics, dtype),
                    REFERENCE.make_runner(config, weights, numerics, "float64"), prompt, following, policy_key)


def _dequantized(dtype: str):
    @examples(model=models(), data=st.data(), max_examples=model_examples())
    def compare(backend, model, data):
        config, weights = model
        _compare(backend, dtype, config, weights, data, Numerics(), f"cross.{dtype}")

    def matches_reference_on_dequantized_path(backend):
        """The backend in `dtype` vs the float64 reference (forced to the backend's routing)."""
        require_dtype(backend, dtype)
        compare(backend)
    return matches_reference_on_dequantized_path


def _fp8_path(dtype: str):
    @examples(model=models(fp8_weights=True, fp8_aligned=True), data=st.data(), max_examples=model_examples(),
              requires=dict(gemm_impl="fp8"))
    def compare(backend, model, data):
        config, weights = model
        numerics = Numerics("fp8", data.draw(st.sampled_from([None, "ue8m0"])), data.draw(st.sampled_from(UE8M0_SCOPES)))
        _compare(backend, dtype, config, weights, data, numerics, f"cross.fp8-path.{dtype}")

    def matches_reference_on_fp8_activation_path(backend):
        """The backend's fp8 activation path in `dtype` vs the float64 reference's."""
        require_dtype(backend, dtype)
        compare(backend)
    return matches_reference_on_fp8_activation_path


# Widths at which a decode step's every product is large enough for the TensorFlow backend's native kernel
# (impl/matvec.py: products, per-head blocks, SwiGLU experts, the absorbed attention core), which the generated
# configs are too small to reach.
KERNEL_WIDTHS = tiny(dim=256, inter_dim=256, moe_inter_dim=256, q_lora_rank=256, kv_lora_rank=256, n_heads=2,
                     qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, vocab_size=256, n_layers=2,
                     n_dense_layers=1, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                     n_activated_experts=2, max_seq_len=64, name="kernel-widths")


def decode_at_kernel_widths_matches_reference(backend) -> None:
    """A model wide enough for every native-kernel entry of the tf backend: prefill and three decode steps of two
    sequences vs the float64 reference on equal routing (cross.float32)."""
    require_dtype(backend, "float32")
    weights = build_weights(KERNEL_WIDTHS, seed=12, bias_mean=-2.0)
    rng = np.random.default_rng(13)
    prompt, following = (rng.integers(0, KERNEL_WIDTHS.vocab_size, shape) for shape in ((2, 8), (2, 3)))
    expect_same_run(f"{backend.name} at kernel widths", backend,
                    backend.make_runner(KERNEL_WIDTHS, weights, dtype="float32"),
                    REFERENCE.make_runner(KERNEL_WIDTHS, weights, Numerics(), "float64"), prompt, following,
                    "cross.float32")


register("cross:kernel-widths", COMPONENT, decode_at_kernel_widths_matches_reference,
         applies=against_reference_in("float32"))

for _dtype in ("float32", "bfloat16"):
    register(f"cross:dequantized[{_dtype}]", COMPONENT, _dequantized(_dtype), applies=against_reference_in(_dtype))
    register(f"cross:fp8-path[{_dtype}]", COMPONENT, _fp8_path(_dtype), applies=against_reference_in(_dtype))
