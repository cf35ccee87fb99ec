"""Integrity of a checkpoint against its config, from the headers, in bounded memory.

Every tensor the config implies (conformance.format.weights.expected_tensors, the MTP layer included) must
be named by the index, present in the shard the index names, of the right shape and dtype (e4m3 weights,
float32 block scales of ceil(out/128) x ceil(in/128), float tensors otherwise), and nothing else may be
there. Each shard's header is validated as the loader validates it (a truncated or corrupt shard is named).
Optionally every shard is hashed (sha256, streamed), and every tensor is scanned for NaN and Inf a chunk of
rows at a time (an fp8 NaN is named with its 128 x 128 block); the MTP module's copies of the embedding
and the output head are compared with the main model's, chunk by chunk. Each shard is closed after its scan,
so the pages it mapped are released: memory stays at about one chunk whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.format.checkpoint import HF_INDEX, HF_SINGLE, SCAN_BYTES, nonfinite
from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.fp8 import BLOCK
from dsv3_conformance.format.safetensors_io import SafetensorsError, SafetensorsFile
from dsv3_conformance.format.weights import TensorSpec, expected_tensors

FLOAT_DTYPES = {"F32", "BF16", "F16", "F64"}
ALLOWED = {"fp8": {"F8_E4M3"}, "scale": {"F32"}, "float": FLOAT_DTYPES}


@dataclass(frozen=True)
class Problem:
    what: str
    tensor: str = ""
    shard: str = ""

    def row(self) -> dict:
        return {"tensor": self.tensor or "-", "shard": self.shard or "-", "problem": self.what}


@dataclass
class IntegrityResult:
    folder: Path
    problems: list[Problem] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0

    @property
    def passed(self) -> bool:
        return not self.problems


def _weight_map(folder: Path, result: IntegrityResult) -> dict[str, str]:
    if (folder / HF_INDEX).is_file():
        try:
            index = json.loads((folder / HF_INDEX).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            result.problems.append(Problem(f"index unreadable: {error}", shard=HF_INDEX))
            return {}
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            result.problems.append(Problem("index has no weight_map object", shard=HF_INDEX))
            return {}
        good = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
                result.problems.append(Problem(f"weight_map entry {json.dumps(shard)[:60]} does not name a shard "
                                               "file of the folder", tensor=name, shard=HF_INDEX))
            else:
                good[name] = shard
        return good
    if (folder / HF_SINGLE).is_file():
        try:
            return {name: HF_SINGLE for name in SafetensorsFile(folder / HF_SINGLE).keys()}
        except SafetensorsError as error:
            result.problems.append(Problem(str(error).removeprefix(f"{folder / HF_SINGLE}: "), shard=HF_SINGLE))
            return {}
    raise FileNotFoundError(f"{folder}: no {HF_INDEX} or {HF_SINGLE}: integrity mode reads the Hugging Face layout")


def _nonfinite(array: np.ndarray, spec: TensorSpec) -> str | None:
    """Where the NaN or Inf values of `array` lie (scanned by chunks), or None."""
    bad = nonfinite(array)
    if bad is None:
        return None
    count, where = bad
    block = f", in 128x128 block {[where[0] // BLOCK, where[1] // BLOCK]}" if spec.role == "fp8" and len(where) == 2 \
        else ""
    return f"{count} NaN or Inf value(s), first at {list(where)}{block}"


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    rows = max(1, SCAN_BYTES // max(1, a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))))
    return any(np.asarray(a[i:i + rows]).tobytes() != np.asarray(b[i:i + rows]).tobytes()
               for i in range(0, a.shape[0], rows))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(SCAN_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def check_integrity(folder: str | Path, config: ModelConfig, hash_files: bool = False, finite: bool = True,
                    progress: bool = True) -> IntegrityResult:
    folder = Path(folder)
    result = IntegrityResult(folder)
    specs = expected_tensors(config)
    weight_map = _weight_map(folder, result)
    for name in sorted(set(specs) - set(weight_map)):
        result.problems.append(Problem("missing: the config needs it and the index does not name it", tensor=name))
    for name in sorted(set(weight_map) - set(specs)):
        result.problems.append(Problem("unexpected: the config does not describe it", tensor=name,
                                       shard=weight_map[name]))
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    main_copies = {}
    for depth in range(config.n_mtp_layers):
        prefix = f"model.layers.{config.n_layers + depth}."
        main_copies[f"{prefix}embed_tokens.weight"] = "model.embed_tokens.weight"
        main_copies[f"{prefix}shared_head.head.weight"] = "lm_head.weight"
    for shard in tqdm(sorted(by_shard), desc=f"checking {folder.name}", unit="shard", disable=not progress):
        path = folder / shard
        row = {"shard": shard, "tensors": len(by_shard[shard]), "bytes": 0, "problems": 0}
        before = len(result.problems)
        try:
            file = SafetensorsFile(path)
        except SafetensorsError as error:
            result.problems.append(Problem(str(error).removeprefix(f"{path}: "), shard=shard))
            row["problems"] = len(result.problems) - before
            result.shards.append(row)
            continue
        try:
            for name in set(file.keys()) - set(by_shard[shard]):
                result.problems.append(Problem("in the shard but not assigned to it by the index", tensor=name,
                                               shard=shard))
            for name in sorted(by_shard[shard]):
                if name not in file:
                    result.problems.append(Problem("the index names this shard, which does not hold it", tensor=name,
                                                   shard=shard))
                    continue
                info = file.tensors[name]
                row["bytes"] += info.end - info.begin
                spec = specs.get(name)
                if spec is None:
                    continue
                if info.shape != spec.shape:
                    result.problems.append(Problem(
                        f"wrong shape: expected {list(spec.shape)}, found {list(info.shape)}"
                        + (" (a block-scale grid is ceil(out/128) x ceil(in/128))" if spec.role == "scale" else ""),
                        tensor=name, shard=shard))
                    continue
                if info.dtype not in ALLOWED[spec.role]:
                    result.problems.append(Problem(f"wrong dtype: expected {' or '.join(sorted(ALLOWED[spec.role]))},"
                                                   f" found {info.dtype}", tensor=name, shard=shard))
                    continue
                result.tensors += 1
                if finite and (where := _nonfinite(file.get(name), spec)):
                    result.problems.append(Problem(where, tensor=name, shard=shard))
                if finite and name in main_copies and weight_map.get(main_copies[name]):
                    main = main_copies[name]
                    other = SafetensorsFile(folder / weight_map[main]) if weight_map[main] != shard else file
                    try:
                        if main in other and _differs(file.get(name), other.get(main)):
                            result.problems.append(Problem(f"differs from {main!r}: the MTP module's copy must equal "
                                                           "the main model's", tensor=name, shard=shard))
                    finally:
                        if other is not file:
                            other.close()
        finally:
            file.close()
        if hash_files:
            row["sha256"] = _sha256(path)
        result.bytes += row["bytes"]
        row["problems"] = len(result.problems) - before
        result.shards.append(row)
    return result
