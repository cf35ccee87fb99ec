"""Reading and writing checkpoints in the Hugging Face and the official converted layouts.

Both layouts are presented under Hugging Face tensor names. Access is per tensor and memory-mapped, so
loading one layer of a 700 GB checkpoint reads one layer. Every problem is reported with the tensor,
the file, what was expected and what was found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.format.config import ModelConfig, to_hf_dict
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.fp8 import BLOCK, E4M3
from dsv3_conformance.format.jsonfile import read_json
from dsv3_conformance.format.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from dsv3_conformance.format.weights import (LayerWeights, ModelWeights, MTPWeights, TensorSpec, assemble,
                                             assemble_layer, assemble_mtp)

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_OFFICIAL_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
_FLOAT_DTYPES = {"F32", "BF16", "F16", "F64"}


class CheckpointError(BadInput):
    """A checkpoint that does not hold what the config needs, exactly."""


# --- names: Hugging Face <-> official converted layout (SEMANTICS.md section 9) -------------------------------

_HF_TO_OFFICIAL_SEGMENT = {
    "self_attn": "attn", "mlp": "ffn", "embed_tokens": "embed", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
    "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
    "weight_scale_inv": "scale", "e_score_correction_bias": "bias",
}
_OFFICIAL_TO_HF_SEGMENT = {official: hf for hf, official in _HF_TO_OFFICIAL_SEGMENT.items()}
# Module -> the dimension its weight (and scale) is split along across model-parallel files.
_OFFICIAL_SPLIT_DIM = {"embed": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "w1": 0, "w3": 0, "head": 0, "wo": 1, "w2": 1}


def hf_to_official(name: str) -> str:
    parts = name.removeprefix("model.").split(".")
    return ".".join(_HF_TO_OFFICIAL_SEGMENT.get(part, part) for part in parts)


def official_to_hf(name: str) -> str:
    hf = ".".join(_OFFICIAL_TO_HF_SEGMENT.get(part, part) for part in name.split("."))
    return hf if hf.startswith("lm_head.") else f"model.{hf}"


def _routed_expert(official_name: str) -> int | None:
    parts = official_name.split(".")
    if "experts" in parts:
        return int(parts[parts.index("experts") + 1])
    return None


def _split_dim(official_name: str) -> int | None:
    return _OFFICIAL_SPLIT_DIM.get(official_name.split(".")[-2])


# --- reading -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Location:
    """Where a tensor lives: one file, or parts across model-parallel files joined along `dim`."""

    files: tuple[SafetensorsFile, ...]
    stored_name: str
    dim: int | None = None


class Checkpoint:
    """A checkpoint folder, tensors addressed by Hugging Face name."""

    def __init__(self, path: Path, layout: str, locations: dict[str, _Location]):
        self.path = path
        self.layout = layout
        self._locations = locations

    @property
    def drops_mtp(self) -> bool:
        """The official converted layout leaves the MTP module out."""
        return self.layout == "official"

    def has_mtp(self, config: ModelConfig) -> bool:
        """Whether any tensor of the MTP modules is stored (transformers saves none of them)."""
        prefix = f"model.layers.{config.n_layers}."
        return not self.drops_mtp and any(name.startswith(prefix) for name in self._locations)

    def names(self) -> list[str]:
        return sorted(self._locations)

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def where(self, name: str) -> str:
        location = self._locations[name]
        return ", ".join(str(file.path.name) for file in location.files)

    def dtype(self, name: str) -> str:
        location = self._require(name)
        return location.files[0].tensors[location.stored_name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        location = self._require(name)
        shapes = [file.tensors[location.stored_name].shape for file in location.files]
        if location.dim is None:
            return shapes[0]
        joined = list(shapes[0])
        joined[location.dim] = sum(shape[location.dim] for shape in shapes)
        return tuple(joined)

    def get(self, name: str) -> np.ndarray:
        """Tensor `name`: a memory-mapped view, or the model-parallel parts joined."""
        location = self._require(name)
        parts = [file.get(location.stored_name) for file in location.files]
        return parts[0] if location.dim is None else np.concatenate(parts, axis=location.dim)

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.get(name)) for name in self.names()}

    def _require(self, name: str) -> _Location:
        if name not in self._locations:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self._locations[name]

    def release(self) -> None:
        """Give every page read so far back to the kernel (SafetensorsFile.release)."""
        for file in {id(f): f for location in self._locations.values() for f in location.files}.values():
            file.release()

    def close(self) -> None:
        for location in self._locations.values():
            for file in location.files:
                file.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_file(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as error:
        raise CheckpointError(str(error)) from None


def _open_hf_single(folder: Path) -> Checkpoint:
    file = _open_file(folder / HF_SINGLE)
    return Checkpoint(folder, "hf", {name: _Location((file,), name) for name in file.keys()})


def _open_hf_sharded(folder: Path) -> Checkpoint:
    index_path = folder / HF_INDEX
    index = read_json(index_path, CheckpointError, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a safetensors index, it has no weight_map object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] must name a shard file in {folder}, "
                                  f"found {json.dumps(shard)[:80]}")
    files: dict[str, SafetensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            example = next(name for name, file in weight_map.items() if file == shard)
            raise CheckpointError(f"{index_path}: tensor {example!r} points to shard {shard!r}, which does not "
                                  f"exist in {folder}")
        files[shard] = _open_file(folder / shard)
    locations = {}
    for name, shard in weight_map.items():
        if name not in files[shard]:
            raise CheckpointError(f"{index_path}: tensor {name!r} is indexed in {shard!r}, which does not hold it")
        locations[name] = _Location((files[shard],), name)
    for shard, file in files.items():
        stray = [name for name in file.keys() if weight_map.get(name) != shard]
        if stray:
            raise CheckpointError(f"{folder / shard}: holds tensor {stray[0]!r} that the index does not assign "
                                  f"to it ({len(stray)} such tensor(s))")
    return Checkpoint(folder, "hf-sharded", locations)


def _open_official(folder: Path, files_found: list[Path]) -> Checkpoint:
    counts = {int(_OFFICIAL_FILE.match(path.name).group(2)) for path in files_found}
    if len(counts) != 1:
        raise CheckpointError(f"{folder}: model-parallel files of different sizes {sorted(counts)} are mixed")
    (mp,) = counts
    expected = [folder / f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    missing = [path.name for path in expected if not path.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: official layout with mp={mp} lacks {', '.join(missing)}")
    files = [_open_file(path) for path in expected]
    holders: dict[str, list[SafetensorsFile]] = {}
    for file in files:
        for name in file.keys():
            holders.setdefault(name, []).append(file)
    locations = {}
    for name, held_by in holders.items():
        hf_name = official_to_hf(name)
        if _routed_expert(name) is not None and len(held_by) != 1:
            raise CheckpointError(f"{folder}: routed expert tensor {name!r} appears in {len(held_by)} files "
                                  f"({', '.join(f.path.name for f in held_by)}); each expert belongs to one")
        if _routed_expert(name) is None and len(held_by) != mp:
            absent = [f.path.name for f in files if f not in held_by]
            raise CheckpointError(f"{folder}: tensor {name!r} is missing from {', '.join(absent)}")
        dim = _split_dim(name) if _routed_expert(name) is None and mp > 1 else None
        if dim is None:
            shapes = {file.tensors[name].shape for file in held_by}
            if len(shapes) != 1:
                raise CheckpointError(f"{folder}: replicated tensor {name!r} has different shapes {sorted(shapes)}")
            held_by = held_by[:1]
        locations[hf_name] = _Location(tuple(held_by), name, dim)
    return Checkpoint(folder, "official", locations)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder: `model.safetensors`, shards with an index, or `model{i}-mp{n}` files."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    if (folder / HF_INDEX).is_file():
        return _open_hf_sharded(folder)
    if (folder / HF_SINGLE).is_file():
        return _open_hf_single(folder)
    official = [p for p in folder.glob("model*-mp*.safetensors") if _OFFICIAL_FILE.match(p.name)]
    if official:
        return _open_official(folder, official)
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(f"{folder}: no {HF_SINGLE}, {HF_INDEX} or model{{i}}-mp{{n}}.safetensors"
                          + (f" (found {', '.join(found)} without an index)" if found else ""))


# --- validated loading ----------------------------------------------------------------------------------

# NaN/Inf scans read a tensor this many bytes at a time (a 129280 x 7168 embedding would otherwise take a
# 3.7 GB float32 copy).
SCAN_BYTES = 64 << 20


def nonfinite(array: np.ndarray) -> tuple[int, tuple[int, ...]] | None:
    """(count, index of the first) of NaN or Inf values, scanned a chunk of rows at a time; None if all finite.
    e4m3fn has no infinity; its NaN is every bit set but the sign."""
    flat = array.reshape(1, -1) if array.ndim < 2 else array
    row_bytes = max(1, flat.itemsize * int(np.prod(flat.shape[1:], dtype=np.int64)))
    rows = max(1, SCAN_BYTES // row_bytes)
    count, first = 0, None
    for start in range(0, flat.shape[0], rows):
        part = np.asarray(flat[start:start + rows])
        bad = ((part.view(np.uint8) & 0x7F) == 0x7F) if part.dtype == E4M3 else ~np.isfinite(part.astype(np.float32))
        if bad.any():
            count += int(bad.sum())
            if first is None:
                position = np.unravel_index(int(np.argmax(bad)), bad.shape)
                first = (start + int(position[0]), *map(int, position[1:]))
    if not count:
        return None
    return count, (first[1:] if array.ndim < 2 else first)


# Missing tensors are listed up to this many, then loading stops: a config that describes far more than
# the checkpoint holds fails fast instead of enumerating every tensor it would need.
MISSING_LISTED = 20


class _ValidatingFetch:
    """Fetches tensors for `assemble`, checking each one against its spec."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, check_finite: bool, progress: tqdm | None):
        self.checkpoint = checkpoint
        self.config = config
        self.check_finite = check_finite
        self.progress = progress
        self.missing: list[str] = []
        self.seen: set[str] = set()

    def missing_error(self, stopped: bool) -> CheckpointError:
        prefix = f"model.layers.{self.config.n_layers}."
        hint = (" (set num_nextn_predict_layers to 0 to load a checkpoint without its MTP module)"
                if any(name.startswith(prefix) for name in self.missing) else "")
        count = f"{len(self.missing)} or more (stopped looking)" if stopped else str(len(self.missing))
        return CheckpointError(f"{self.checkpoint.path}: missing {count} tensor(s) the config needs: "
                               f"{_listing(self.missing)}{hint}")

    def __call__(self, spec: TensorSpec) -> np.ndarray | None:
        self.seen.add(spec.name)
        if self.progress is not None:
            self.progress.update(1)
        if spec.name not in self.checkpoint:
            self.missing.append(spec.name)
            if len(self.missing) >= MISSING_LISTED:
                raise self.missing_error(stopped=True)
            return None
        where = f"tensor {spec.name!r} in {self.checkpoint.path / self.checkpoint.where(spec.name)}"
        dtype, shape = self.checkpoint.dtype(spec.name), self.checkpoint.shape(spec.name)
        if shape != spec.shape:
            raise CheckpointError(f"{where}: wrong shape, expected {list(spec.shape)}, found {list(shape)}"
                                  + (" (a block-scale grid must be ceil(out/128) x ceil(in/128))"
                                     if spec.role == "scale" else ""))
        allowed = {"fp8": {"F8_E4M3"}, "scale": {"F32"}, "float": _FLOAT_DTYPES}[spec.role]
        if dtype not in allowed:
            raise CheckpointError(f"{where}: wrong dtype, expected {' or '.join(sorted(allowed))}, found {dtype}")
        array = self.checkpoint.get(spec.name)
        if self.check_finite and (bad := nonfinite(array)):
            raise CheckpointError(f"{where}: {bad[0]} NaN or Inf value(s) in a "
                                  f"{'scale' if spec.role == 'scale' else 'weight'}, first at {list(bad[1])}")
        return array


def load_weights(checkpoint: Checkpoint, config: ModelConfig, layers: Sequence[int] | None = None,
                 check_finite: bool = True, progress: bool = False) -> ModelWeights:
    """The weight tree of `config` from `checkpoint`, validated.

    A checkpoint that stores no MTP tensor loads as a model without MTP (`weights.mtp` empty). Missing tensors, and (when the whole model is loaded) tensors the config does not describe, are
    errors that list them. `layers` loads only those blocks, reading nothing else of the other layers.
    """
    include_mtp = checkpoint.has_mtp(config)
    total = len(checkpoint.names()) if progress and layers is None else None
    bar = tqdm(total=total, desc=f"loading {checkpoint.path.name}", unit="tensor") if progress else None
    fetch = _ValidatingFetch(checkpoint, config, check_finite, bar)
    try:
        weights = assemble(fetch, config, layers=layers, include_mtp=include_mtp and layers is None)
    finally:
        if bar is not None:
            bar.close()
    if fetch.missing:
        raise fetch.missing_error(stopped=False)
    for depth, module in enumerate(weights.mtp):
        for name, copy, main in (("embed_tokens", module.embed, "model.embed_tokens.weight"),
                                 ("shared_head.head", module.head, "lm_head.weight")):
            if not _bitwise_equal(copy, checkpoint.get(main)):
                raise CheckpointError(f"{checkpoint.path}: tensor 'model.layers.{config.n_layers + depth}.{name}.weight'"
                                      f" differs from {main!r}: the MTP module shares the main model's {name}, of "
                                      "which the checkpoint stores a copy")
    if layers is None:
        unexpected = sorted(set(checkpoint.names()) - fetch.seen)
        if unexpected:
            raise CheckpointError(f"{checkpoint.path}: unexpected tensor(s) the config does not describe: "
                                  f"{_listing(unexpected)} (in {checkpoint.where(unexpected[0])})")
    return weights


def load_layer(checkpoint: Checkpoint, config: ModelConfig, layer: int, resident: Collection[int] | None = None,
               check_finite: bool = True) -> LayerWeights:
    """Block `layer` alone (an MTP block too: layer >= n_layers), validated; `resident`: the routed experts to
    load (default all; the others are left out, None)."""
    fetch = _ValidatingFetch(checkpoint, config, check_finite, None)
    weights = assemble_layer(fetch, config, layer, resident)
    if fetch.missing:
        raise fetch.missing_error(stopped=False)
    return weights


def load_mtp(checkpoint: Checkpoint, config: ModelConfig, depth: int, resident: Collection[int] | None = None,
             check_finite: bool = True) -> MTPWeights:
    """MTP module `depth` alone, validated; `resident`: its block's routed experts to load (default all)."""
    fetch = _ValidatingFetch(checkpoint, config, check_finite, None)
    weights = assemble_mtp(fetch, config, depth, resident)
    if fetch.missing:
        raise fetch.missing_error(stopped=False)
    return weights


def load_tensor(checkpoint: Checkpoint, config: ModelConfig, spec: TensorSpec, check_finite: bool = True) -> np.ndarray:
    """One tensor, validated against its spec."""
    fetch = _ValidatingFetch(checkpoint, config, check_finite, None)
    array = fetch(spec)
    if fetch.missing:
        raise fetch.missing_error(stopped=False)
    return array


def _bitwise_equal(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Same shape, dtype and bytes, compared a few thousand rows at a time (bounded memory on a 2 GB embedding)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(np.asarray(a[i:i + rows]).tobytes() == np.asarray(b[i:i + rows]).tobytes()
               for i in range(0, len(a), rows))


def _listing(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- writing -----------------------------------------------------------------------------------------

def _write_config(folder: Path, config: ModelConfig | None) -> None:
    if config is not None:
        (folder / "config.json").write_text(json.dumps(to_hf_dict(config), indent=2))


def write_hf(folder: str | Path, tensors: Mapping[str, np.ndarray], config: ModelConfig | None = None,
             shards: int = 1) -> Path:
    """Write `tensors` (HF names) as `model.safetensors`, or as `shards` files with an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(folder, config)
    if shards == 1:
        write_safetensors(folder / HF_SINGLE, tensors, {"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for shard, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, {name: tensors[name] for name in chunk}, {"format": "pt"})
        weight_map.update({name: file for name in chunk})
    total = sum(int(np.asarray(array).nbytes) for array in tensors.values())
    (folder / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))
    return folder


def write_official(folder: str | Path, tensors: Mapping[str, np.ndarray], config: ModelConfig, mp: int = 1) -> Path:
    """Write `tensors` (HF names) in the official converted layout over `mp` files; MTP tensors are dropped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config.n_routed_experts % mp:
        raise CheckpointError(f"n_routed_experts={config.n_routed_experts} is not divisible by mp={mp}")
    experts_per_file = config.n_routed_experts // mp
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(mp)]
    for name, array in tensors.items():
        if _is_mtp(name, config):
            continue
        official = hf_to_official(name)
        expert = _routed_expert(official)
        dim = _split_dim(official)
        if expert is not None:
            parts[expert // experts_per_file][official] = array
        elif dim is None or mp == 1:
            for part in parts:
                part[official] = array
        else:
            if array.shape[dim] % mp:
                raise CheckpointError(f"tensor {name!r} of shape {list(array.shape)} cannot be split into {mp} "
                                      f"parts along dim {dim}")
            if f"{name}_scale_inv" in tensors and (array.shape[dim] // mp) % BLOCK:
                raise CheckpointError(f"fp8 tensor {name!r} of shape {list(array.shape)} split {mp} ways along dim "
                                      f"{dim} would cut its {BLOCK}x{BLOCK} scale blocks")
            for part, piece in zip(parts, np.split(array, mp, axis=dim)):
                part[official] = np.ascontiguousarray(piece)
    for index, part in enumerate(parts):
        write_safetensors(folder / f"model{index}-mp{mp}.safetensors", part)
    return folder


def _is_mtp(name: str, config: ModelConfig) -> bool:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= config.n_layers
