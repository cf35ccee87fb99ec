"""The safetensors reader and writer, checked against the `safetensors` package where it can read."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsv3_conformance.format.safetensors_io import (SafetensorsError, SafetensorsFile, library_refusal, read_all,
                                                    write_safetensors)


def _arrays():
    rng = np.random.default_rng(0)
    return {"f64": rng.standard_normal((3, 5)), "f32": rng.standard_normal(7).astype(np.float32),
            "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
            "e4m3": rng.standard_normal((4, 3)).astype(ml_dtypes.float8_e4m3fn),
            "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "u8": np.arange(5, dtype=np.uint8),
            "empty": np.zeros((0, 4), np.float32)}


def test_round_trip_is_bitwise(tmp_path):
    arrays = _arrays()
    write_safetensors(tmp_path / "a.safetensors", arrays, {"format": "pt"})
    back = read_all(tmp_path / "a.safetensors")
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes(), name
    assert SafetensorsFile(tmp_path / "a.safetensors").metadata == {"format": "pt"}


def test_files_are_readable_by_the_safetensors_package_and_back(tmp_path):
    plain = {k: v for k, v in _arrays().items() if k in ("f64", "f32", "i64", "u8")}
    write_safetensors(tmp_path / "ours.safetensors", plain)
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file(plain, tmp_path / "theirs.safetensors")
    ours = read_all(tmp_path / "theirs.safetensors")
    for name, array in plain.items():
        np.testing.assert_array_equal(theirs[name], array)
        np.testing.assert_array_equal(ours[name], array)


def test_tensors_are_memory_mapped_views(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", _arrays())
    view = SafetensorsFile(tmp_path / "a.safetensors").get("f64")
    assert not view.flags.writeable and not view.flags.owndata


def test_truncated_file_names_tensor_and_sizes(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"big": np.ones(100, np.float32)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SafetensorsError, match=r"t.safetensors: truncated: tensor 'big' needs data bytes up to 400 "
                                               r"but the file holds 392"):
        SafetensorsFile(path)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "no header length"),
    (struct.pack("<Q", 10_000) + b"{}", "header claims 10000 bytes"),
    (struct.pack("<Q", 4) + b"{oops", "corrupt header, not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "corrupt header: not a JSON object"),
])
def test_corrupt_headers(tmp_path, content, message):
    path = tmp_path / "c.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype 'F31'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8 bytes but its offsets"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32"}, "corrupt header entry for tensor 'x'"),
])
def test_bad_header_entries(tmp_path, entry, message):
    header = json.dumps({"x": entry}).encode()
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(path)


def test_missing_file_and_tensor(tmp_path):
    with pytest.raises(SafetensorsError, match="no such file"):
        SafetensorsFile(tmp_path / "none.safetensors")
    write_safetensors(tmp_path / "a.safetensors", {"x": np.ones(1, np.float32)})
    with pytest.raises(KeyError, match="no tensor 'y'"):
        SafetensorsFile(tmp_path / "a.safetensors").get("y")


def test_unsupported_dtype_is_refused_on_write(tmp_path):
    with pytest.raises(SafetensorsError, match="dtype complex128"):
        write_safetensors(tmp_path / "z.safetensors", {"z": np.ones(2, np.complex128)})


# --- corrupt files: refused exactly where the safetensors library refuses them ----------------------------------

def _raw(path, header: bytes, data: bytes, pad: bool = True) -> None:
    header += b" " * (-len(header) % 8) if pad else b""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


_DATA = np.arange(8, dtype=np.float32).tobytes()
CORRUPT = {
    "overlapping offsets": ({"a": _entry(shape=(4,), offsets=(0, 16)), "b": _entry(shape=(4,), offsets=(8, 24))},
                            _DATA[:24]),
    "gap between tensors": ({"a": _entry(), "b": _entry(offsets=(16, 24))}, _DATA[:24]),
    "trailing bytes": ({"a": _entry()}, _DATA[:16]),
    "aliased tensors": ({"a": _entry(), "b": _entry()}, _DATA[:8]),
    "first tensor not at 0": ({"a": _entry(offsets=(8, 16))}, _DATA[:16]),
    "non-string metadata": ({"__metadata__": {"format": 1}, "a": _entry()}, _DATA[:8]),
    "metadata not an object": ({"__metadata__": [1], "a": _entry()}, _DATA[:8]),
    "unknown dtype": ({"a": _entry(dtype="Q4")}, _DATA[:8]),
    "shape disagrees with offsets": ({"a": _entry(shape=(3,))}, _DATA[:8]),
    "negative dimension": ({"a": _entry(shape=(-2,))}, _DATA[:8]),
    "fractional dimension": ({"a": _entry(shape=(2.0,))}, _DATA[:8]),
    "reversed offsets": ({"a": _entry(shape=(0,), offsets=(8, 0))}, _DATA[:8]),
    "truncated data": ({"a": _entry(shape=(4,), offsets=(0, 16))}, _DATA[:8]),
    "entry not an object": ({"a": [1, 2]}, _DATA[:8]),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_headers_are_refused_by_both(tmp_path, name):
    header, data = CORRUPT[name]
    path = tmp_path / "corrupt.safetensors"
    _raw(path, json.dumps(header).encode(), data)
    assert library_refusal(path) is not None, f"the safetensors library accepts the {name} file: the corpus is wrong"
    with pytest.raises(SafetensorsError, match="corrupt|truncated|unsupported|invalid|refused"):
        read_all(path)


@pytest.mark.parametrize("raw, what", [(b'{"a":', "not valid JSON"), (b"[1, 2]", "not a JSON object"),
                                       (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\x00\x00\x00',
                                        "not valid JSON")])
def test_malformed_json_is_refused_by_both(tmp_path, raw, what):
    path = tmp_path / "bad.safetensors"
    _raw(path, raw, _DATA[:8], pad=False)
    assert library_refusal(path) is not None
    with pytest.raises(SafetensorsError, match=what):
        read_all(path)


def test_what_the_library_accepts_is_read(tmp_path):
    path = tmp_path / "ok.safetensors"
    _raw(path, json.dumps({"__metadata__": {"format": "pt"}, "b": _entry(shape=(6,), offsets=(8, 32)),
                           "a": _entry(dtype="F8_E4M3", shape=(8,))}).encode(), _DATA)
    assert library_refusal(path) is None
    assert {name: array.shape for name, array in read_all(path).items()} == {"a": (8,), "b": (6,)}


def test_duplicate_names_are_refused_beyond_the_library(tmp_path):
    """The library keeps the last of two equal names silently; an ambiguous file is refused here."""
    path = tmp_path / "dup.safetensors"
    _raw(path, b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
               b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', _DATA[:8])
    with pytest.raises(SafetensorsError, match="tensor name 'a' appears twice"):
        read_all(path)


def test_oversized_headers_are_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", (16 << 20) + 8) + b" " * 64)
    with pytest.raises(SafetensorsError, match="more than the 16777216 this harness reads"):
        SafetensorsFile(path)
