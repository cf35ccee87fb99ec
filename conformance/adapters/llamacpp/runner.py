"""llama.cpp (llama-cpp-python) behind the Runner interface.

The model is written once per runner as a GGUF file (gguf_file.py) into a private temporary folder and loaded with
llama-cpp-python; each sequence of a batch gets a context of its own (its own KV cache), fed token ids (the file has
no tokenizer). A prefill returns the logits of every prompt position; a decode step feeds one token per sequence
after the cached ones. llama.cpp gives no block outputs (`hidden` is None: not compared) and takes no forced
routing. `settings` picks how llama.cpp runs: "default" as its users run it (its default KV-cache type, f16, and
attention path), "exact" with a float32 KV cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dsv3_conformance.backends import Runner, StepOutput, Unsupported
from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.weights import ModelWeights
from dsv3_conformance.adapters.llamacpp import gguf_file

SETTINGS = ("default", "exact")
# Recorded divergences that stop llama.cpp from loading a model at all: declared, so such a model is not compared.
UNLOADABLE = ("llamacpp-lite-by-depth", "llamacpp-shared-experts-required")
_F32 = 0  # ggml_type GGML_TYPE_F32


class LlamaCppRunner(Runner):
    def __init__(self, config: ModelConfig, weights: ModelWeights, kind: str, settings: str = "default",
                 refuse_known: bool = True):
        import llama_cpp

        from dsv3_conformance.golden.divergences import DIVERGENCES, LLAMA_CPP

        unloadable = [d.key for d in DIVERGENCES if d.key in UNLOADABLE and d.source == LLAMA_CPP and d.applies(config)]
        if unloadable and refuse_known:
            raise Unsupported(f"llama.cpp cannot load this model ({', '.join(unloadable)}: "
                              "conformance/golden/divergences.py)", "config")
        self.config, self.kind, self.settings = config, kind, settings
        self._llama = llama_cpp.Llama
        self._folder = Path(tempfile.mkdtemp(prefix="dsv3-llamacpp-"))  # created 0700
        if kind in gguf_file.QUANTIZER_TYPES:
            self.path = quantize(gguf_file.write(self._folder / "model-f32.gguf", config, weights, "f32"), kind)
        else:
            self.path = gguf_file.write(self._folder / f"model-{kind}.gguf", config, weights, kind)
        self._contexts: list = []

    def __del__(self):
        self._contexts = []
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)

    def _context(self, capacity: int):
        options = dict(model_path=str(self.path), n_ctx=max(capacity, 8), n_batch=max(capacity, 8),
                       n_ubatch=max(capacity, 8), logits_all=True, n_threads=os.cpu_count() or 1, seed=0,
                       **({"type_k": _F32, "type_v": _F32} if self.settings == "exact" else {}))
        made = []
        stderr_of(lambda: made.append(self._llama(verbose=False, **options)))  # llama.cpp warns even when not verbose
        if made:
            return made[0]
        # llama-cpp-python's "Failed to load model from file": load again for llama.cpp's reason
        log = stderr_of(lambda: self._llama(verbose=True, **options))
        reasons = [line.strip() for line in log.splitlines() if "error" in line.lower()]
        raise RuntimeError(f"llama.cpp refused the GGUF file of this model: {'; '.join(reasons)[-500:]}")

    def prefill(self, tokens, forced_experts=None, capacity=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("llama.cpp takes no forced routing", "forced-routing")
        tokens = np.asarray(tokens)
        capacity = capacity or self.config.max_seq_len
        self._contexts = [self._context(capacity) for _ in range(tokens.shape[0])]
        logits = []
        for context, row in zip(self._contexts, tokens):
            context.eval([int(token) for token in row])
            logits.append(np.array(context.scores[: context.n_tokens], np.float32))
        return StepOutput(np.stack(logits), None, ())

    def decode(self, tokens, forced_experts=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("llama.cpp takes no forced routing", "forced-routing")
        tokens = np.asarray(tokens).reshape(len(self._contexts), -1)
        logits = []
        for context, row in zip(self._contexts, tokens):
            context.eval([int(token) for token in row])
            logits.append(np.array(context.scores[context.n_tokens - row.shape[0]: context.n_tokens], np.float32))
        return StepOutput(np.stack(logits), None, ())


def quantize(source: Path, kind: str) -> Path:
    """The f32 GGUF file `source` quantized to `kind` by llama.cpp's own quantizer (llama_model_quantize, its
    default mixture of types for that llama_ftype, no importance matrix), beside it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_file.QUANTIZER_TYPES[kind]
    params.nthread = os.cpu_count() or 1
    target = source.with_name(f"model-{kind}.gguf")
    status = []
    log = stderr_of(lambda: status.append(llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                                          ctypes.byref(params))))
    if status != [0]:
        raise RuntimeError(f"llama.cpp's quantizer failed on {kind}: {log.strip()[-500:]}")
    source.unlink()
    return target


def stderr_of(call) -> str:
    """What `call` logged (llama.cpp logs through llama-cpp-python's callback to sys.stderr, or to descriptor 2),
    whatever it raised."""
    text = io.StringIO()
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(text):
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            call()
        except Exception:  # noqa: BLE001  (the log is what is wanted)
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return text.getvalue() + log.read().decode(errors="replace")
