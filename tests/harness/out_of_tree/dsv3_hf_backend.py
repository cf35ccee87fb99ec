"""An out-of-tree backend: transformers' DeepseekV3ForCausalLM, registered without touching the harness.

It shows how a user checks their own implementation: define a `conformance.backends.Backend` in your own
package and name it, by `--backend dsv3_hf_backend:BACKEND` or through an entry point of group
`conformance.backends`. The runner wraps the harness's transformers adaptor; the components are
written here in torch. What transformers does not implement (the fp8 activation path, bfloat16 in this
adaptor, softmax or bias-free gates, a separate naive attention form) is declared `Unsupported`, so
those checks and examples are skipped, never passed.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from dsv3_conformance.backends import Backend, Runner, Unsupported
from dsv3_conformance.format.fp8 import BLOCK, E4M3_MAX, FP8Error


class HFRunner(Runner):
    def __init__(self, config, weights, numerics, dtype, attention_form):
        from dsv3_conformance.golden.oracle import OracleRunner, OracleUnavailable

        try:
            self.oracle = OracleRunner(config, weights)
        except OracleUnavailable as reason:
            raise Unsupported(str(reason)) from None
        self.config = config

    def prefill(self, tokens, forced_experts=None, capacity=None):
        return self.oracle.prefill(tokens, forced_experts)

    def decode(self, tokens, forced_experts=None):
        return self.oracle.decode(tokens, forced_experts)


class Components:
    """route, to_e4m3, quantize_activation and fp8_gemm in torch, NumPy in and out."""

    @staticmethod
    def route(x, gate, config):
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        if config.score_func != "sigmoid" or gate.bias is None:
            raise Unsupported("the transformers router scores with a sigmoid and a correction bias only")
        hf = DeepseekV3Config(hidden_size=config.dim, n_routed_experts=config.n_routed_experts,
                              num_experts_per_tok=config.n_activated_experts, n_group=config.n_expert_groups,
                              topk_group=config.n_limited_groups, routed_scaling_factor=config.route_scale,
                              norm_topk_prob=True)
        router = DeepseekV3TopkRouter(hf)
        with torch.no_grad():
            router.weight.copy_(torch.as_tensor(np.asarray(gate.weight, np.float32)))
            router.e_score_correction_bias.copy_(torch.as_tensor(np.asarray(gate.bias, np.float32)))
            _, weights, experts = router(torch.as_tensor(np.asarray(x, np.float32)))
        return weights.numpy(), experts.numpy()

    @staticmethod
    def to_e4m3(x):
        # torch's cast saturates beyond +-448 and keeps NaN: the harness rule as it stands.
        cast = torch.as_tensor(np.asarray(x, np.float32)).to(torch.float8_e4m3fn)
        return cast.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)

    @staticmethod
    def quantize_activation(x, scale_fmt):
        x = torch.as_tensor(np.asarray(x, np.float32))
        if x.shape[-1] % BLOCK:
            raise FP8Error(f"activation width {x.shape[-1]} is not a multiple of {BLOCK}")
        if not torch.isfinite(x).all():
            raise FP8Error("non-finite activation values cannot be quantized")
        blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
        scales = blocks.abs().amax(dim=-1).clamp(min=1e-4) / E4M3_MAX
        if scale_fmt == "ue8m0":
            mantissa, exponent = torch.frexp(scales)
            scales = torch.where(mantissa == 0.5, scales, torch.ldexp(torch.ones_like(scales), exponent))
        elif scale_fmt == "ue8m0-log2f":  # the official kernel's float32 2^ceil(log2 s)
            scales = torch.exp2(torch.ceil(torch.log2(scales.double()).float()).double()).float()
        quantized = (blocks / scales[..., None]).clamp(-E4M3_MAX, E4M3_MAX).reshape(x.shape)
        return Components.to_e4m3(quantized.numpy()), scales.numpy()

    @staticmethod
    def fp8_gemm(x_q, x_scale, w_q, w_scale):
        x = torch.as_tensor(np.asarray(x_q).astype(np.float64))
        w = torch.as_tensor(np.asarray(w_q).astype(np.float64))
        k_blocks = x.shape[-1] // BLOCK
        out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
        column_scale = torch.as_tensor(np.asarray(w_scale, np.float64)).repeat_interleave(BLOCK, 0)[: w.shape[0]]
        row_scale = torch.as_tensor(np.asarray(x_scale, np.float64))
        for kb in range(k_blocks):
            part = x[:, kb * BLOCK:(kb + 1) * BLOCK] @ w[:, kb * BLOCK:(kb + 1) * BLOCK].T
            out += part * row_scale[:, kb, None] * column_scale[None, :, kb]
        return out.numpy().astype(np.float32)


BACKEND = Backend("hf-transformers", HFRunner, Components(), default_dtype="float32", dtypes=("float32",),
                  gemm_impls=("bf16",), attention_forms=("absorbed",),
                  description="transformers DeepseekV3ForCausalLM (float32, CPU), an out-of-tree backend")
