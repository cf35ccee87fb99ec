"""The implementations a benchmark runs side by side, each behind the same two calls on the same weights:
`prefill(tokens [B, S]) -> last logits [B, V]` and `decode(tokens [B]) -> logits [B, V]`.

- tf: this project's TensorFlow implementation (XLA), float32, computing the prompt's last logits only;
- reference: the NumPy reference in float32;
- hf: transformers' DeepseekV3ForCausalLM, float32 on the CPU with sdpa attention, `logits_to_keep=1`;
- official: the official `inference/model.py` from a checkout the caller gives (its forward returns the
  last logits), float32 on the CPU, its Triton `kernel` module replaced by CPU stand-ins at import time
  (conformance/official_generate.py; the dequantized path never calls them). Nothing of it is copied here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conformance.format.config import ModelConfig
from conformance.format.weights import ModelWeights

PEERS = ("tf", "reference", "hf", "official")


class Peer:
    name: str

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TFPeer(Peer):
    name = "tf"

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        from impl.model import Transformer

        self.model = Transformer(config, weights, logits="last")

    def prefill(self, tokens):
        return self.model.prefill(tokens, capacity=self.model.config.max_seq_len)[0][:, -1]

    def decode(self, tokens):
        return self.model.decode(tokens)[0][:, -1]


class ReferencePeer(Peer):
    name = "reference"

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        from reference.model import Transformer

        self.model = Transformer(config, weights, dtype=np.float32)

    def prefill(self, tokens):
        return self.model.prefill(tokens).logits[:, -1]

    def decode(self, tokens):
        return self.model.decode(tokens).logits[:, -1]


class HFPeer(Peer):
    name = "hf"

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        from transformers.utils import logging

        from conformance.format.config import to_hf_dict
        from conformance.oracle import _state_dict

        logging.set_verbosity_error()
        raw = dict(to_hf_dict(config), num_nextn_predict_layers=0)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**raw, attn_implementation="sdpa"))
        model.load_state_dict({k: torch.tensor(v) for k, v in _state_dict(weights, config).items()}, strict=True)
        self.torch, self.model, self.cache = torch, model.float().eval(), None

    def _run(self, tokens):
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.as_tensor(tokens, dtype=self.torch.long), cache=self.cache,
                             use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1].numpy()

    def prefill(self, tokens):
        self.cache = None
        return self._run(np.asarray(tokens))

    def decode(self, tokens):
        return self._run(np.asarray(tokens).reshape(-1, 1))


class OfficialPeer(Peer):
    name = "official"

    def __init__(self, config: ModelConfig, weights: ModelWeights, checkout: Path):
        import torch

        from conformance.format.checkpoint import hf_to_official
        from conformance.format.weights import named_tensors
        from conformance.official_generate import build, load_official

        torch.set_default_dtype(torch.float32)
        official = load_official(Path(checkout), "cpu")
        model_args = official_model_args(config)
        state = {hf_to_official(k): torch.tensor(v) for k, v in named_tensors(weights, config).items()}
        self.torch, self.model, self.position = torch, build(official, model_args, state, "absorb", "bf16"), 0
        official.attn_impl = "absorb"

    def prefill(self, tokens):
        with self.torch.no_grad():
            logits = self.model(self.torch.as_tensor(tokens, dtype=self.torch.long), 0)
        self.position = tokens.shape[1]
        return logits.numpy()

    def decode(self, tokens):
        with self.torch.no_grad():
            logits = self.model(self.torch.as_tensor(np.asarray(tokens).reshape(-1, 1), dtype=self.torch.long),
                                self.position)
        self.position += 1
        return logits.numpy()


def official_model_args(config: ModelConfig) -> dict:
    """The official ModelArgs of a config (float32 dequantized path)."""
    args = dict(vocab_size=config.vocab_size, dim=config.dim, inter_dim=config.inter_dim,
                moe_inter_dim=config.moe_inter_dim, n_layers=config.n_layers, n_dense_layers=config.n_dense_layers,
                n_heads=config.n_heads, n_routed_experts=config.n_routed_experts,
                n_shared_experts=config.n_shared_experts, n_activated_experts=config.n_activated_experts,
                n_expert_groups=config.n_expert_groups, n_limited_groups=config.n_limited_groups,
                score_func=config.score_func, route_scale=config.route_scale, q_lora_rank=config.q_lora_rank,
                kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                max_seq_len=config.max_seq_len, max_batch_size=8)
    if config.rope_scaling is not None:
        yarn = config.rope_scaling
        args.update(original_seq_len=yarn.original_seq_len, rope_factor=yarn.factor, beta_fast=yarn.beta_fast,
                    beta_slow=yarn.beta_slow, mscale=yarn.mscale)
    return args


def make_peer(name: str, config: ModelConfig, weights: ModelWeights, official: Path | None = None) -> Peer:
    if name == "official":
        return OfficialPeer(config, weights, official)
    return {"tf": TFPeer, "reference": ReferencePeer, "hf": HFPeer}[name](config, weights)
