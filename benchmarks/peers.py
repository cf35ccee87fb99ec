"""The implementations a benchmark runs side by side, each behind the same two calls on the same weights:
`prefill(tokens [B, S]) -> last logits [B, V]` and `decode(tokens [B]) -> logits [B, V]`.

- tf: this project's TensorFlow implementation, float32, computing the prompt's last logits only (where a
  workload asks for it, its last block at the last position only: trim_last_block); its prefill attends in the
  naive form (fewer FLOPs over a long prompt), its decode in the absorbed form;
- reference: the NumPy reference in float32;
- hf: transformers' DeepseekV3ForCausalLM, float32 on the CPU with sdpa attention, `logits_to_keep=1`;
- llamacpp: llama.cpp through llama-cpp-python's C API on an F32 GGUF file of the same weights (written by the
  llamacpp adapter), as its users run it (default KV-cache type and attention path), on as many threads as TF
  gets (every core); one context holds a batch's sequences in one KV cache, so a decode step at batch 8 is one
  llama_decode call, and a prefill asks for the last position's logits only, as generation does;
- official: the official `inference/model.py` from a checkout the caller gives (its forward returns the
  last logits), float32 on the CPU, its Triton `kernel` module replaced by CPU stand-ins at import time
  (conformance/producers/official.py; the dequantized path never calls them). Nothing of it is copied here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import ModelWeights

PEERS = ("tf", "reference", "hf", "official", "llamacpp")


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


class LlamaCppPeer(Peer):
    name = "llamacpp"
    SEQUENCES = 8  # the most sequences a call feeds (the workloads' decode batch)

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        import logging

        import llama_cpp

        from dsv3_conformance.adapters.llamacpp import gguf_file
        from dsv3_conformance.adapters.llamacpp.runner import stderr_of

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's loading log, as verbose=False
        self.llama, self.vocab = llama_cpp, config.vocab_size
        self._folder = Path(tempfile.mkdtemp(prefix="dsv3-bench-llamacpp-"))  # created 0700
        path = gguf_file.write(self._folder / "model-f32.gguf", config, weights, "f32")
        loaded = []  # llama.cpp notes the file's missing vocabulary even when not verbose: kept off the console
        stderr_of(lambda: loaded.append(llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params())))
        self.model = loaded[0] if loaded else None
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the bench model {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = config.max_seq_len
        params.n_seq_max, params.kv_unified = self.SEQUENCES, True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a context for the bench model {path}")
        self.batch = llama_cpp.llama_batch_init(config.max_seq_len, 0, self.SEQUENCES)
        self.positions = np.zeros(0, np.int64)

    def __del__(self):
        llama = getattr(self, "llama", None)
        if llama is not None:  # what the constructor made before any failure, freed in reverse order
            if getattr(self, "batch", None) is not None:
                llama.llama_batch_free(self.batch)
            if getattr(self, "context", None):
                llama.llama_free(self.context)
            if getattr(self, "model", None):
                llama.llama_model_free(self.model)
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)

    def _run(self, tokens: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Feed tokens [B, S] at each sequence's next positions; the logits of the positions `outputs` [B, S] marks."""
        batch, length = tokens.shape
        for i, (row, column) in enumerate(np.ndindex(batch, length)):
            self.batch.token[i] = int(tokens[row, column])
            self.batch.pos[i] = int(self.positions[row]) + column
            self.batch.n_seq_id[i], self.batch.seq_id[i][0] = 1, row
            self.batch.logits[i] = bool(outputs[row, column])
        self.batch.n_tokens = batch * length
        if self.llama.llama_decode(self.context, self.batch) != 0:
            raise RuntimeError("llama.cpp's llama_decode failed")
        self.positions = self.positions + length
        marked = np.flatnonzero(outputs.reshape(-1))
        return np.stack([np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.context, int(i)), (self.vocab,))
                         for i in marked]).copy()

    def prefill(self, tokens):
        tokens = np.asarray(tokens)
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.context), True)
        self.positions = np.zeros(tokens.shape[0], np.int64)
        last = np.zeros(tokens.shape, bool)
        last[:, -1] = True
        return self._run(tokens, last)

    def decode(self, tokens):
        tokens = np.asarray(tokens).reshape(-1, 1)
        return self._run(tokens, np.ones(tokens.shape, bool))


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
    return {"reference": ReferencePeer, "hf": HFPeer, "llamacpp": LlamaCppPeer}[name](config, weights)
