"""The implementations a benchmark runs side by side, each behind the same two calls on the same weights:
`prefill(tokens [B, S]) -> last logits [B, V]` and `decode(tokens [B]) -> logits [B, V]`.

- tf: this project's TensorFlow implementation, float32, computing the prompt's last logits only (where a
  workload asks for it, its last block at the last position only: trim_last_block); its prefill attends in the
  naive form (fewer FLOPs over a long prompt), its decode in the absorbed form;
- reference: the NumPy reference in float32;
- hf: transformers' DeepseekV3ForCausalLM, float32 on the CPU with sdpa attention, `logits_to_keep=1`;
- official: the official `inference/model.py` from a checkout the caller gives (its forward returns the
  last logits), float32 on the CPU, its Triton `kernel` module replaced by CPU stand-ins at import time
  (conformance/producers/official.py; the dequantized path never calls them). Nothing of it is copied here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import ModelWeights

PEERS = ("tf", "reference", "hf", "official")


class Peer:
    name: str

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TFPeer(Peer):
    name = "tf"

    def __init__(self, config: ModelConfig, weights: ModelWeights, trim_last_block: bool = False):
        from dsv3_conformance.impl.model import Transformer

        self.model = Transformer(config, weights, logits="last", prefill_form="naive", trim_last_block=trim_last_block)

    def prefill(self, tokens):
        return self.model.prefill(tokens, capacity=self.model.config.max_seq_len)[0][:, -1]

    def decode(self, tokens):  # generation's step: the logits only, as the official code's forward returns
        return self.model.next_logits(tokens)[:, -1]


class ReferencePeer(Peer):
    name = "reference"

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        from dsv3_conformance.reference.model import Transformer

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

        from dsv3_conformance.format.config import to_hf_dict
        from dsv3_conformance.golden.oracle import hf_state_dict

        logging.set_verbosity_error()
        raw = dict(to_hf_dict(config), num_nextn_predict_layers=0)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**raw, attn_implementation="sdpa"))
        model.load_state_dict({k: torch.tensor(v) for k, v in hf_state_dict(weights, config).items()}, strict=True)
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

        from dsv3_conformance.format.checkpoint import hf_to_official
        from dsv3_conformance.format.config import to_official_dict
        from dsv3_conformance.format.weights import named_tensors
        from dsv3_conformance.producers.official import build, load_official

        torch.set_default_dtype(torch.float32)
        official = load_official(Path(checkout), "cpu")
        model_args = dict(to_official_dict(config), max_batch_size=8)
        state = {hf_to_official(k): _torch(v) for k, v in named_tensors(weights, config).items()}
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


def _torch(array: np.ndarray):
    """The array as a torch tensor sharing its memory (e4m3 arrays through their bytes)."""
    import torch

    from dsv3_conformance.format.fp8 import E4M3

    if array.dtype == E4M3:
        return torch.from_numpy(array.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(array)


def make_peer(name: str, config: ModelConfig, weights: ModelWeights, official: Path | None = None,
              trim_last_block: bool = False) -> Peer:
    """The peer `name`; `trim_last_block` reaches TF only (the others compute every position)."""
    if name == "official":
        return OfficialPeer(config, weights, official)
    if name == "tf":
        return TFPeer(config, weights, trim_last_block)
    return {"reference": ReferencePeer, "hf": HFPeer}[name](config, weights)
