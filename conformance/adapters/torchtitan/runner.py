"""torchtitan's `DeepSeekV3Model` behind the Runner interface.

The model config is built with torchtitan's own layer builder (`_build_dsv3_layers`, which its presets use) from the
official semantics of each config field; the weights are loaded as a user loads a Hugging Face checkpoint: under the
checkpoint's names, through torchtitan's `DeepSeekV3StateDictAdapter.from_hf`. torchtitan's model is a training
model: it has no KV cache, so each step runs the whole sequence so far (prefill, then every decode step recomputes
the prefix) with its FlexAttention causal mask. Its MTP modules take the main model's last block output and the
token embeddings shifted by the depth (teacher forcing), which is what `Runner.mtp` asks for over the prompt. It
gives no block outputs and no chosen experts, and takes no forced routing.
"""

from __future__ import annotations

import sys
import types
from functools import partial

import numpy as np

from dsv3_conformance.backends import MTPStep, Runner, StepOutput, Unsupported
from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.weights import ModelWeights
from dsv3_conformance.adapters.weights import float32_tensors

# Recorded divergences that stop torchtitan from loading a model at all: declared, so such a model is not compared.
UNLOADABLE = ("torchtitan-moe-mtp-needs-moe-layers",)


def model_config(config: ModelConfig):
    """torchtitan's DeepSeekV3Model.Config for `config`."""
    from torchtitan.models import deepseek_v3 as titan
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    yarn = config.rope_scaling
    rope = ComplexRoPE.Config(dim=config.qk_rope_head_dim, max_seq_len=config.max_seq_len, theta=config.rope_theta,
                              scaling="yarn" if yarn is not None else "none",
                              **({} if yarn is None else dict(rope_factor=yarn.factor, beta_fast=yarn.beta_fast,
                                                               beta_slow=yarn.beta_slow,
                                                               original_seq_len=yarn.original_seq_len)))
    grouped = config.n_expert_groups > 1
    layers = titan._build_dsv3_layers(
        n_layers=config.n_layers, n_dense_layers=config.n_dense_layers, dim=config.dim, n_heads=config.n_heads,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        mscale=yarn.mscale if yarn is not None else 1.0, dense_hidden_dim=config.inter_dim,
        moe_hidden_dim=config.moe_inter_dim, num_experts=config.n_routed_experts,
        num_shared_experts=config.n_shared_experts, router_top_k=config.n_activated_experts,
        router_score_func=config.score_func, router_num_expert_groups=config.n_expert_groups if grouped else None,
        router_num_limited_groups=config.n_limited_groups if grouped else None,
        router_route_scale=config.route_scale, router_route_norm=config.score_func == "sigmoid",
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None, rope=rope)
    return titan.DeepSeekV3Model.Config(
        vocab_size=config.vocab_size, dim=config.dim,
        tok_embeddings=Embedding.Config(num_embeddings=config.vocab_size, embedding_dim=config.dim),
        norm=RMSNorm.Config(normalized_shape=config.dim),
        lm_head=Linear.Config(in_features=config.dim, out_features=config.vocab_size),
        layers=layers,
        mtp_layers=titan._build_mtp_layers(layers[-1], dim=config.dim, num_mtp_layers=config.n_mtp_layers))


def _experts_in_float32(self, x, counts):
    """GroupedExperts.forward without its bfloat16 casts: each expert's SwiGLU on its rows in the model's dtype."""
    import torch
    import torch.nn.functional as F

    rows = torch.split(x, counts.tolist())
    return torch.cat([(F.silu(part @ self.w1_EFD[e].T) * (part @ self.w3_EFD[e].T)) @ self.w2_EDF[e].T
                      for e, part in enumerate(rows)])


class TorchTitanRunner(Runner):
    def __init__(self, config: ModelConfig, weights: ModelWeights, settings: str = "default",
                 refuse_known: bool = True):
        import torch
        from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter

        if "tensorflow" in sys.modules:
            raise Unsupported("torchtitan imports triton, whose LLVM aborts a process that has loaded TensorFlow's: "
                              "run torchtitan where the tf backend has not run (its own suite or scoreboard run)",
                              "config")
        from dsv3_conformance.golden.divergences import DIVERGENCES, TORCHTITAN

        unloadable = [d.key for d in DIVERGENCES if d.key in UNLOADABLE and d.source == TORCHTITAN and d.applies(config)]
        if unloadable and refuse_known:
            raise Unsupported(f"torchtitan cannot load this model ({', '.join(unloadable)}: "
                              "conformance/golden/divergences.py)", "config")
        if settings == "default" and config.n_layers > config.n_dense_layers and (config.dim % 8 or
                                                                                 config.moe_inter_dim % 8):
            raise Unsupported("torchtitan's bfloat16 grouped GEMM (torch._grouped_mm) needs rows of a multiple of 16 "
                              "bytes: hidden_size and moe_intermediate_size multiples of 8", "config")
        self.config, self._torch = config, torch
        built = model_config(config)
        self.model = built.build()
        # torchtitan's MTP modules share the main model's embedding and head: its adapter maps no MTP copies of them.
        self._mtp_shares = all(np.array_equal(mtp.embed, weights.embed) and np.array_equal(mtp.head, weights.head)
                               for mtp in weights.mtp)
        # fp8 weights dequantized here: torchtitan dequantizes them only in its own quantized checkpoint reader.
        hf = {name: torch.from_numpy(array) for name, array in float32_tensors(weights, config).items()
              if not name.endswith((".embed_tokens.weight", ".shared_head.head.weight")) or name.startswith("model.e")}
        state = DeepSeekV3StateDictAdapter(built, None).from_hf(hf)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        own = self.model.state_dict()
        for name in missing:  # a gate without a correction bias: torchtitan's own zero bias is that gate
            if name.endswith("expert_bias_E") and not config.gate_bias:
                own[name].zero_()
        # Left unset and fine: the expert counters, zero-width shared experts, the zero bias above.
        missing = [name for name in missing if not (name.endswith("tokens_per_expert_E") or own[name].numel() == 0
                                                    or (name.endswith("expert_bias_E") and not config.gate_bias))]
        if missing or unexpected:
            raise RuntimeError(f"torchtitan's state-dict adapter left {missing[:6]} unset and {unexpected[:6]} unused")
        if settings == "exact":
            from torchtitan.models.common.moe import GroupedExperts

            for module in self.model.modules():
                if isinstance(module, GroupedExperts):
                    module.forward = types.MethodType(_experts_in_float32, module)
        self.model.eval()
        self._tokens: np.ndarray | None = None
        self._mtp_seen = 0

    def _logits(self, tokens: np.ndarray, mtp: bool = False):
        """The main model's logits, and with `mtp` every MTP depth's after them (torchtitan's MTPDecoder.forward;
        without, its Decoder.forward, which runs the main model alone)."""
        from torchtitan.models.common.decoder import Decoder

        torch = self._torch
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        forward = self.model if mtp else partial(Decoder.forward, self.model)
        with torch.no_grad():
            out = forward(ids, positions, self.model.get_attention_masks(positions))
        return out if isinstance(out, list) else [out]

    def prefill(self, tokens, forced_experts=None, capacity=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("torchtitan takes no forced routing", "forced-routing")
        self._tokens, self._mtp_seen = np.asarray(tokens), 0
        return StepOutput(self._logits(self._tokens)[0].numpy(), None, ())

    def decode(self, tokens, forced_experts=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("torchtitan takes no forced routing", "forced-routing")
        new = np.asarray(tokens).reshape(self._tokens.shape[0], -1)
        self._tokens = np.concatenate([self._tokens, new], axis=1)
        return StepOutput(self._logits(self._tokens)[0][:, -new.shape[1]:].numpy(), None, ())

    def mtp(self, following, options: MTPOptions = MTPOptions(), forced_experts=None) -> MTPStep:
        """Every depth over the main positions not seen yet, from one forward pass of the tokens so far and
        `following` (torchtitan's MTP modules read the token embeddings shifted by their depth)."""
        if forced_experts is not None:
            raise Unsupported("torchtitan takes no forced routing", "forced-routing")
        if options != MTPOptions():
            raise Unsupported("torchtitan's MTP modules have no options", "mtp")
        if not self._mtp_shares:
            raise Unsupported("torchtitan's MTP modules use the main model's embedding and head, and this checkpoint "
                              "gives them their own", "mtp")
        following = np.asarray(following).reshape(self._tokens.shape[0], -1)
        if self._tokens.shape[1] + following.shape[1] < self.config.n_mtp_layers:
            raise Unsupported("torchtitan's MTP modules need a sequence of at least one position per depth", "mtp")
        outputs = self._logits(np.concatenate([self._tokens, following], axis=1), mtp=True)[1:]
        seen, self._mtp_seen = self._mtp_seen, self._tokens.shape[1]
        logits = tuple(out[:, seen: self._tokens.shape[1]].numpy() for out in outputs)
        return MTPStep(None, logits, (), np.stack([depth[:, -1].argmax(axis=-1) for depth in logits], axis=1))
