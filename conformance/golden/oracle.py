"""The PyTorch oracle: Hugging Face transformers' DeepseekV3ForCausalLM, float32 on the CPU.

It is an independent implementation of the same model, fed the same weights (fp8 weights dequantized:
the class has no CPU fp8 path). Configs it does not implement as the official code does are refused
with the recorded divergences (conformance/divergences.py). Needs the `oracle` extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_conformance.format.config import ModelConfig, to_hf_dict
from dsv3_conformance.format.fp8 import BLOCK
from dsv3_conformance.format.weights import LinearWeight, ModelWeights, MoEWeights

from dsv3_conformance.backends import Routing, Runner, StepOutput
from dsv3_conformance.golden.divergences import oracle_divergences


class OracleUnavailable(RuntimeError):
    """torch or transformers is missing, or the config is one the oracle diverges on."""


def oracle_versions() -> dict[str, str]:
    try:
        import torch
        import transformers
    except ImportError as error:
        raise OracleUnavailable(f"the PyTorch oracle needs the oracle extra (pip install -e '.[oracle]'): {error}")
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _dense(weight: LinearWeight) -> np.ndarray:
    """The float32 weight; fp8 blocks are decoded by torch and scaled here, sharing no code with the backends."""
    import torch

    if not weight.quantized:
        return np.asarray(weight.weight, np.float32)
    decoded = torch.from_numpy(np.ascontiguousarray(weight.weight).view(np.uint8)).view(torch.float8_e4m3fn).float()
    rows, cols = decoded.shape
    scale = torch.from_numpy(np.array(weight.scale_inv, np.float32))
    scale = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (decoded * scale).numpy()


def hf_state_dict(weights: ModelWeights, config: ModelConfig) -> dict[str, np.ndarray]:
    """The weights under the module names of transformers 5 (routed experts fused per layer), in float32."""
    state: dict[str, np.ndarray] = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.norm,
                                    "lm_head.weight": weights.head}

    def put(prefix: str, value) -> None:
        if isinstance(value, LinearWeight):
            state[f"{prefix}.weight"] = _dense(value)
        elif isinstance(value, np.ndarray):
            state[f"{prefix}.weight"] = value
        elif value is not None:
            for name in value.__dataclass_fields__:
                put(f"{prefix}.{name}", getattr(value, name))

    for index, layer in enumerate(weights.layers):
        prefix = f"model.layers.{index}"
        state[f"{prefix}.input_layernorm.weight"] = layer.attn_norm
        state[f"{prefix}.post_attention_layernorm.weight"] = layer.ffn_norm
        attn = layer.attn
        names = {"q_proj": attn.q_proj, "q_a_proj": attn.q_a_proj, "q_a_layernorm": attn.q_a_norm,
                 "q_b_proj": attn.q_b_proj, "kv_a_proj_with_mqa": attn.kv_a_proj, "kv_a_layernorm": attn.kv_a_norm,
                 "kv_b_proj": attn.kv_b_proj, "o_proj": attn.o_proj}
        for name, value in names.items():
            put(f"{prefix}.self_attn.{name}", value)
        if isinstance(layer.ffn, MoEWeights):
            moe = layer.ffn
            state[f"{prefix}.mlp.gate.weight"] = moe.gate.weight
            # Gates without a bias get the class's own initial value, zeros (hf-assumes-correction-bias).
            state[f"{prefix}.mlp.gate.e_score_correction_bias"] = (
                np.zeros(config.n_routed_experts) if moe.gate.bias is None else moe.gate.bias)
            state[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack([
                np.concatenate([_dense(e.gate_proj), _dense(e.up_proj)]) for e in moe.experts])
            state[f"{prefix}.mlp.experts.down_proj"] = np.stack([_dense(e.down_proj) for e in moe.experts])
            if moe.shared is None:  # the class always builds shared experts; width 0 adds nothing
                for name, shape in (("gate_proj", (0, config.dim)), ("up_proj", (0, config.dim)),
                                    ("down_proj", (config.dim, 0))):
                    state[f"{prefix}.mlp.shared_experts.{name}.weight"] = np.zeros(shape, np.float32)
            put(f"{prefix}.mlp.shared_experts", moe.shared)
        else:
            put(f"{prefix}.mlp", layer.ffn)
    return {name: np.asarray(value, np.float32) for name, value in state.items()}


def _force_routing(router, forced: list) -> None:
    """Wrap a DeepseekV3TopkRouter so that it records its choice and, when given one, uses a forced choice.

    Forced weights follow the class's own formula: sigmoid affinities at the experts, normalized with its
    +1e-20 guard, times routed_scaling_factor.
    """
    import torch

    original = router.forward

    def forward(hidden_states):
        logits, weights, indices = original(hidden_states)
        router.chosen = indices
        if forced:
            indices = torch.as_tensor(forced.pop(0), dtype=torch.long)
            weights = logits.sigmoid().gather(1, indices)
            if router.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            weights = weights * router.routed_scaling_factor
        return logits, weights, indices

    router.forward = forward


class _TransformersRunner(Runner):
    """A transformers `DeepseekV3ForCausalLM` behind the Runner interface, with a cache; accepts forced routing
    like the reference; every block's output is read by a hook (before the final norm)."""

    def _hold(self, model) -> None:
        import torch

        self.torch = torch
        self.model = model.float().eval()
        self.routers = [layer.mlp.gate for layer in self.model.model.layers if hasattr(layer.mlp, "gate")]
        self.forced: list = []
        for router in self.routers:
            _force_routing(router, self.forced)
        self.block_outputs: list = []
        for layer in self.model.model.layers:
            layer.register_forward_hook(lambda module, args, output: self.block_outputs.append(output))
        self.cache = None

    def _run(self, tokens: np.ndarray, forced_experts: Routing) -> StepOutput:
        self.forced[:] = list(forced_experts or [])
        self.block_outputs.clear()
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.as_tensor(tokens, dtype=self.torch.long), cache=self.cache,
                             use_cache=True)
        self.cache = out.cache
        hidden = tuple(h.numpy() for h in self.block_outputs)
        experts = tuple(router.chosen.numpy() for router in self.routers)
        return StepOutput(out.logits.numpy(), hidden, experts)

    def prefill(self, tokens: np.ndarray, forced_experts: Routing = None, capacity: int | None = None) -> StepOutput:
        self.cache = None
        return self._run(np.asarray(tokens), forced_experts)

    def decode(self, tokens: np.ndarray, forced_experts: Routing = None) -> StepOutput:
        return self._run(np.asarray(tokens).reshape(-1, 1), forced_experts)


class OracleRunner(_TransformersRunner):
    """The transformers model built from the harness's weight tree and config (the oracle of the golden cases)."""

    backend = "oracle"

    def __init__(self, config: ModelConfig, weights: ModelWeights, accept_divergences: bool = False):
        oracle_versions()
        diverging = oracle_divergences(config)
        if diverging and not accept_divergences:
            raise OracleUnavailable("the oracle diverges on this config: " + ", ".join(d.key for d in diverging))
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.config = config
        raw = to_hf_dict(config)
        raw["num_nextn_predict_layers"] = 0
        hf_config = DeepseekV3Config(**raw, attn_implementation="eager")
        model = DeepseekV3ForCausalLM(hf_config)
        state = {name: torch.tensor(array) for name, array in hf_state_dict(weights, config).items()}
        model.load_state_dict(state, strict=True)
        self._hold(model)


class PretrainedRunner(_TransformersRunner):
    """A checkpoint folder as transformers itself reads it (`from_pretrained`: its config reader, its weight
    loader, its default attention), in float32: a producer independent of this harness's reading. Not eager
    attention: it repeats keys num_attention_heads // num_key_value_heads times, and transformers saves its
    default num_key_value_heads (128) for any model, so a smaller model's keys vanish (docs/checkpoints.md)."""

    backend = "transformers"

    def __init__(self, folder: str | Path, config: ModelConfig):
        oracle_versions()
        from transformers import DeepseekV3ForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.config = config
        self._hold(DeepseekV3ForCausalLM.from_pretrained(str(folder), dtype="float32"))
