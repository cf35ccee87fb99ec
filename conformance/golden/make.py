"""Golden cases from a user's own checkpoint: `dsv3-conformance golden make DIR/CASE --checkpoint PATH --producer P`.

The released weights cannot ship with the harness; this is how a user gets goldens from them: run a producer
they trust over their checkpoint once, then check every port against the case. Producers:

- `hf`: transformers' `DeepseekV3ForCausalLM.from_pretrained` (its own config reader and weight loader), float32;
- `official`: the official `inference/model.py` from a checkout (`--official`), on the CPU or on CUDA with its own
  kernels (`--device cuda`), float32 or bfloat16;
- any backend name (`reference`, `tf`, `package.module:object`), through its runner.

The case holds `config.json` (the checkpoint's), `expected.safetensors` (the prompt, the last position's logits
and those of any other chosen prompt positions, the outputs of the chosen blocks, the logits of every greedy decode
step and the greedy tokens: small even for the 671B model) and `meta.json`
(producer, versions, device, when, the command line, the checkpoint's path and fingerprint). The weights are
copied only with `--copy-weights`; otherwise the case names the checkpoint, whose tensor names, dtypes and shapes
must still match the recorded fingerprint when the case is checked. DIR's `manifest.json` gets the case's entry
(created if absent), so `golden verify --golden-dir DIR` covers it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dsv3_conformance.format.checkpoint import Checkpoint, load_weights, open_checkpoint
from dsv3_conformance.format.config import ModelConfig, load_config
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.safetensors_io import write_safetensors
from dsv3_conformance.golden.manifest import MANIFEST, describe_case

PRODUCERS = ("hf", "official")


def fingerprint(checkpoint: Checkpoint) -> str:
    """sha256 of every tensor's name, dtype and shape (read from the headers alone)."""
    listing = [[name, checkpoint.dtype(name), list(checkpoint.shape(name))] for name in checkpoint.names()]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _runner(producer: str, folder: Path, config: ModelConfig, official: Path | None, device: str, dtype: str):
    """(runner, provenance) of the producer."""
    if producer == "hf":
        from dsv3_conformance.golden.oracle import PretrainedRunner, oracle_versions

        return PretrainedRunner(folder, config), {"producer": "transformers DeepseekV3ForCausalLM.from_pretrained, "
                                                              "its default attention, float32", **oracle_versions(),
                                                  "device": "cpu", "compute_dtype": "float32"}
    if producer == "official":
        if official is None:
            raise BadInput("--producer official needs --official CHECKOUT (a DeepSeek-V3 repository checkout)")
        from dsv3_conformance.producers.official import OfficialRunner

        runner = OfficialRunner(official, folder, config, device, dtype)
        import torch

        return runner, {"producer": "the official inference/model.py (absorbed attention, dequantized path)",
                        "official_commit": runner.commit, "torch": torch.__version__, "device": runner.device,
                        "compute_dtype": dtype}
    from dsv3_conformance.backends import resolve_backend

    backend = resolve_backend(producer)
    with open_checkpoint(folder) as checkpoint:
        weights = load_weights(checkpoint, config)
    chosen = dtype if dtype in backend.dtypes else backend.default_dtype
    return backend.make_runner(config, weights, dtype=chosen), {"producer": f"backend {backend.name}",
                                                                "device": "cpu", "compute_dtype": "float32",
                                                                "backend_dtype": chosen}


def make_case(out: Path, checkpoint: Path, producer: str, prompt: np.ndarray, steps: int, layers: list[int],
              *, positions: tuple[int, ...] = (), official: Path | None = None, device: str = "cpu", dtype: str = "float32",
              copy_weights: bool = False, allow_fields: tuple[str, ...] = (), command: str = "") -> dict:
    """Write the case `out` (its parent holds the manifest); returns its meta."""
    out, checkpoint = Path(out), Path(checkpoint).resolve()
    config = load_config(checkpoint, allow_fields)
    bad = [layer for layer in layers if not 0 <= layer < config.n_layers]
    if bad:
        raise BadInput(f"--layers {bad}: the model has layers 0..{config.n_layers - 1}")
    bad = [position for position in positions if not 0 <= position < prompt.shape[1]]
    if bad:
        raise BadInput(f"--positions {bad}: the prompt has positions 0..{prompt.shape[1] - 1}")
    if prompt.shape[1] + steps > config.max_seq_len:
        raise BadInput(f"a prompt of {prompt.shape[1]} tokens and {steps} steps exceed max_position_embeddings="
                       f"{config.max_seq_len}")
    if ((prompt < 0) | (prompt >= config.vocab_size)).any():
        raise BadInput(f"prompt token ids must lie in [0, vocab_size={config.vocab_size})")
    with open_checkpoint(checkpoint) as opened:
        print_ = fingerprint(opened)
        shards = sorted({shard for name in opened.names() for shard in opened.where(name).split(", ")})
    runner, provenance = _runner(producer, checkpoint, config, official, device, dtype)
    step = runner.prefill(prompt)
    if layers and step.hidden is None:
        raise BadInput(f"--layers: the producer {producer!r} gives no block outputs")
    if positions and step.logits.shape[1] != prompt.shape[1]:
        raise BadInput(f"--positions: the producer {producer!r} gives the last position's logits only (the official "
                       "forward returns no others)")
    expected = {"tokens.prompt": prompt.astype(np.int64), "prefill.logits_last": step.logits[:, -1]}
    expected.update({f"prefill.position.{position}.logits": step.logits[:, position] for position in positions})
    expected.update({f"prefill.layer.{layer}.hidden": step.hidden[layer] for layer in layers})
    logits, decoded = step.logits[:, -1], []
    for index in range(steps):
        decoded.append(np.argmax(logits, axis=-1))
        logits = runner.decode(decoded[-1]).logits[:, -1]
        expected[f"decode.{index}.logits"] = logits
    if decoded:
        # tokens.decoded[:, t] is fed at position S+t: the greedy choice after the prompt and the tokens before it.
        expected["tokens.decoded"] = np.stack(decoded, axis=1).astype(np.int64)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(checkpoint / "config.json", out / "config.json")
    write_safetensors(out / "expected.safetensors",
                      {name: np.ascontiguousarray(value, np.int64 if name.startswith("tokens.") else np.float32)
                       for name, value in expected.items()})
    meta = {"case": out.name, **provenance, "gemm_impl": "bf16", "batch": int(prompt.shape[0]),
            "prompt_len": int(prompt.shape[1]), "decode_steps": steps, "layers": layers,
            "positions": list(positions),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.node()} {platform.machine()}, Python {sys.version.split()[0]}"}
    if copy_weights:
        for shard in shards + [name for name in ("model.safetensors.index.json",) if (checkpoint / name).is_file()]:
            shutil.copyfile(checkpoint / shard, out / shard)
    else:
        meta["checkpoint"] = {"path": str(checkpoint), "fingerprint": print_}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _record(out, meta, config)
    return meta


def _record(out: Path, meta: dict, config: ModelConfig) -> None:
    """Add (or replace) the case's entry in its parent's manifest."""
    golden_dir = out.parent
    path = golden_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"cases": []}
    entry = describe_case(golden_dir, out.name, {k: meta[k] for k in ("producer", "created", "command")}, None,
                          {"hidden_size": config.dim, "num_hidden_layers": config.n_layers,
                           "n_routed_experts": config.n_routed_experts})
    manifest["cases"] = [case for case in manifest["cases"] if case.get("path") != out.name] + [entry]
    path.write_text(json.dumps(manifest, indent=2) + "\n")
