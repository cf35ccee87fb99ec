"""Memory-mapped safetensors files, fp8 included.

The `safetensors` package's NumPy API cannot represent float8, so tensors are read here as raw bytes at
the offsets of the header and returned as read-only NumPy views of a memory map: reading one tensor never
reads the rest of the file. The header itself is validated twice: by the rules of the format (an 8-byte
little-endian length, a JSON object of tensors whose byte ranges tile the data exactly: no overlap, no
gap, no trailing byte; string metadata), with messages that name the tensor, and then by the safetensors
library's own parser, so that nothing it refuses is read. Two things are refused beyond the library:
duplicate tensor names (it keeps the last one silently) and headers over 16 MiB (a released shard's
header is about 100 KB; parsing an 85 MB header took 1.1 GB).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from dsv3_conformance.format.errors import BadInput

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 16 << 20


class SafetensorsError(BadInput):
    """A safetensors file that cannot be read as written."""


class _Duplicate(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _Duplicate(next(name for name in names if names.count(name) > 1))
    return dict(pairs)


def library_refusal(path: str | Path) -> str | None:
    """Why the safetensors library's own parser refuses the file's header, or None when it accepts it."""
    try:
        with safe_open(path, framework="numpy") as opened:
            opened.keys()
    except Exception as error:  # SafetensorError, or anything else the parser raises
        return str(error).removeprefix("Error while deserializing header: ")
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One safetensors file, opened lazily: `get(name)` maps only that tensor's bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None
        self._map: mmap.mmap | None = None
        self.metadata, self.tensors, self._data_start = self._read_header()

    def _fail(self, message: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {message}")

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._fail(f"truncated or not a safetensors file ({size} bytes, no header length)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail(f"header of {header_len} bytes, more than the {MAX_HEADER_BYTES} this harness "
                                     "reads")
                if header_len > size - 8:
                    raise self._fail(f"corrupt or truncated: header claims {header_len} bytes but the file has "
                                     f"{size - 8} after the length field")
                header_bytes = handle.read(header_len)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such file") from None
        try:
            header = json.loads(header_bytes, object_pairs_hook=_refuse_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._fail(f"corrupt header, not valid JSON ({error})") from None
        except _Duplicate as duplicate:
            raise self._fail(f"corrupt header: tensor name {duplicate.args[0]!r} appears twice") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail(f"corrupt header: __metadata__ must map strings to strings, found {metadata!r:.200}")
        data_start = 8 + header_len
        data_len = size - data_start
        tensors = {name: self._parse_entry(name, entry, data_len) for name, entry in header.items()}
        self._check_tiling(tensors, data_len)
        self._library_check()
        return metadata, tensors, data_start

    def _check_tiling(self, tensors: dict[str, TensorInfo], data_len: int) -> None:
        """The tensors' byte ranges, in offset order, cover [0, data_len) exactly once."""
        end = 0
        for info in sorted(tensors.values(), key=lambda info: (info.begin, info.end)):
            if info.begin != end:
                what = "overlaps the tensor before it" if info.begin < end else f"leaves a gap after byte {end}"
                raise self._fail(f"corrupt header: tensor {info.name!r} at bytes [{info.begin}, {info.end}) {what}")
            end = info.end
        if end != data_len:
            raise self._fail(f"corrupt: {data_len - end} trailing byte(s) after the last tensor (data ends at {end}, "
                             f"the file holds {data_len})")

    def _library_check(self) -> None:
        """The safetensors library's parser must accept the header too."""
        refusal = library_refusal(self.path)
        if refusal is not None:
            raise self._fail(f"refused by the safetensors library: {refusal}")

    def _parse_entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise self._fail(f"corrupt header entry for tensor {name!r}: {entry!r:.200}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {dtype!r:.40}")
        if any(not _is_count(d) for d in shape):
            raise self._fail(f"tensor {name!r} has an invalid shape {list(shape)!r:.200}")
        if not (_is_count(begin) and _is_count(end)):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {[begin, end]!r:.200}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise self._fail(f"corrupt header: tensor {name!r} of {dtype}{list(shape)} needs {expected} bytes "
                             f"but its offsets [{begin}, {end}) span {end - begin}")
        if end > data_len:
            raise self._fail(f"truncated: tensor {name!r} needs data bytes up to {end} but the file holds "
                             f"{data_len}")
        return TensorInfo(name, dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name`, backed by the memory map."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if self._map is None:
            self._handle = open(self.path, "rb")
            self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        count = info.end - info.begin
        array = np.frombuffer(self._map, dtype=DTYPES[info.dtype], count=count // DTYPES[info.dtype].itemsize,
                              offset=self._data_start + info.begin)
        return array.reshape(info.shape)

    def release(self) -> None:
        """Give the pages read so far back to the kernel (they count as resident memory while mapped); views
        handed out stay valid and read them again on access."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        # Views handed out keep the map alive through their buffer; only our references are dropped.
        self._map = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (NumPy arrays of a dtype in DTYPES) to `path`, in name order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {array.dtype} that safetensors cannot hold")
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for array in arrays:
            handle.write(array.tobytes())


def write_safetensors_streamed(path: str | Path, layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                               produce, metadata: Mapping[str, str] | None = None) -> int:
    """Write the tensors of `layout` (name -> dtype, shape) to `path` in name order, each made by `produce(name)`
    just before it is written and dropped after: a file of any size holds one tensor in memory at a time.
    Returns the bytes written after the header."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(layout):
        dtype, shape = layout[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in sorted(layout):
            array = np.ascontiguousarray(produce(name))
            dtype, shape = layout[name]
            if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise SafetensorsError(f"{path}: tensor {name!r} was produced as {array.dtype} {list(array.shape)}, "
                                       f"its header says {np.dtype(dtype)} {list(shape)}")
            handle.write(array.reshape(-1).view(np.uint8).data)
    return offset


def read_all(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a small file, copied into memory."""
    file = SafetensorsFile(path)
    try:
        return {name: np.array(file.get(name)) for name in file.keys()}
    finally:
        file.close()
