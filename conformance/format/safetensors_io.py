"""Memory-mapped safetensors files, fp8 included.

The `safetensors` package's NumPy API cannot represent float8, so files are parsed here from the format
definition (an 8-byte little-endian header length, a JSON header, then the raw data) and tensors are
returned as read-only NumPy views of a memory map: reading one tensor never reads the rest of the file.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from .errors import BadInput

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
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(BadInput):
    """A safetensors file that cannot be read as written."""


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
                if header_len > min(size - 8, _MAX_HEADER_BYTES):
                    raise self._fail(f"corrupt or truncated: header claims {header_len} bytes but the file has "
                                     f"{size - 8} after the length field")
                header_bytes = handle.read(header_len)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such file") from None
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._fail(f"corrupt header, not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        data_len = size - data_start
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry, data_len)
        return metadata, tensors, data_start

    def _parse_entry(self, name: str, entry: object, data_len: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise self._fail(f"corrupt header entry for tensor {name!r}: {entry!r}") from None
        if dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an invalid shape {list(shape)}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
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


def read_all(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a small file, copied into memory."""
    file = SafetensorsFile(path)
    try:
        return {name: np.array(file.get(name)) for name in file.keys()}
    finally:
        file.close()
