"""Fuzzing the inputs a user hands the harness: only the typed bad-input errors may escape, fast and small.

Safetensors headers, config JSON (both forms), golden manifests and golden case folders are generated or
mutated at random; every call must either succeed or raise `BadInput` (exit status 2), within a time
bound (hypothesis's deadline) and a memory bound (tracemalloc's peak, NumPy included). A safetensors file
this reader accepts must also be accepted by the safetensors library.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3_conformance.format.config import from_hf_dict, from_official_dict, tiny, to_hf_dict
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.safetensors_io import DTYPES, library_refusal, read_all, write_safetensors
from dsv3_conformance.golden.cases import GoldenCase, check_case
from dsv3_conformance.golden.manifest import sha256, verify
from dsv3_conformance.paths import GOLDEN_DIR

MEMORY_BOUND = 256 << 20
FUZZ = settings(deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@contextmanager
def bounded():
    """Only BadInput may escape; Python and NumPy allocations stay under MEMORY_BOUND."""
    tracemalloc.start()
    try:
        yield
    except BadInput:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"peak allocation {peak / 2**20:.0f} MiB"


# --- safetensors headers ------------------------------------------------------------------------------------

entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "Q4", "f32", ""]) | json_scalars,
    "shape": st.lists(st.integers(-3, 2**40) | st.sampled_from([2, 3, 0]), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-8, 64), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries | json_values, max_size=4)


@FUZZ
@given(header=headers, data=st.binary(max_size=72), declared_extra=st.integers(-4, 4))
def test_fuzzed_safetensors_headers(tmp_path, header, data, declared_extra):
    encoded = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", max(len(encoded) + declared_extra, 0)) + encoded + data)
    with bounded():
        read_all(path)
        assert library_refusal(path) is None, "read a file the safetensors library refuses"


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1, max_size=6))
def test_byte_flips_in_a_valid_file(tmp_path, flips):
    path = tmp_path / "flipped.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.int64)})
    raw = bytearray(path.read_bytes())
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    path.write_bytes(bytes(raw))
    with bounded():
        read_all(path)
        assert library_refusal(path) is None


# --- config JSON --------------------------------------------------------------------------------------------

HF_KEYS = sorted(to_hf_dict(tiny())) + ["rope_scaling", "quantization_config", "scale_fmt", "head_dim"]


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(HF_KEYS) | st.text(max_size=6), json_values | st.just("DELETE")),
                        min_size=1, max_size=3))
def test_fuzzed_hf_configs(changes):
    raw = to_hf_dict(tiny())
    for key, value in changes:
        raw.pop(key, None) if value == "DELETE" else raw.__setitem__(key, value)
    with bounded():
        from_hf_dict(raw)


@FUZZ
@given(key=st.sampled_from(["dim", "n_layers", "route_scale", "rope_factor", "score_func", "dtype", "beta_fast",
                            "original_seq_len", "n_routed_experts", "max_seq_len"]), value=json_values)
def test_fuzzed_official_configs(key, value):
    raw = {"vocab_size": 512, "dim": 128, "inter_dim": 256, "moe_inter_dim": 64, "n_layers": 2, "n_heads": 4,
           "n_routed_experts": 16, "n_activated_experts": 4, "score_func": "sigmoid", key: value}
    with bounded():
        from_official_dict(raw)


# --- manifests ----------------------------------------------------------------------------------------------

def _small_golden(root):
    (root / "case").mkdir(parents=True)
    (root / "case" / "a.bin").write_bytes(b"a")
    (root / "case" / "b.bin").write_bytes(b"b")
    files = {name: sha256(root / "case" / name) for name in ("a.bin", "b.bin")}
    return {"cases": [{"path": "case", "files": files}]}


@FUZZ
@given(replacement=json_values, where=st.sampled_from(["whole", "cases", "case", "path", "files", "file"]))
def test_fuzzed_manifests(tmp_path_factory, replacement, where):
    root = tmp_path_factory.mktemp("golden")
    manifest = _small_golden(root)
    if where == "whole":
        manifest = replacement
    elif where == "cases":
        manifest["cases"] = replacement
    elif where == "case":
        manifest["cases"][0] = replacement
    elif where in ("path", "files"):
        manifest["cases"][0][where] = replacement
    else:
        manifest["cases"][0]["files"]["a.bin"] = replacement
    (root / "manifest.json").write_text(json.dumps(manifest))
    with bounded():
        verify(root)


# --- golden case folders ------------------------------------------------------------------------------------

NAMES = ["tokens.prompt", "tokens.decoded", "prefill.logits_last", "prefill.logits", "prefill.layer.0.hidden",
         "prefill.layer.9.hidden", "decode.0.logits", "decode.1.logits", "prefill.logits_last.naive", "other"]
arrays = st.tuples(st.sampled_from(["float32", "int64", "float16", "int32", "uint8"]),
                   st.lists(st.sampled_from([1, 2, 3, 5, 128, 512]), min_size=0, max_size=3),
                   st.sampled_from([0.0, 1.0, np.nan, np.inf, 600.0, -1.0]))


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzcase") / "case"
    shutil.copytree(GOLDEN_DIR / "official" / "v3-tiny", folder)
    return folder


@settings(FUZZ, deadline=30000, max_examples=10)
@given(tensors=st.dictionaries(st.sampled_from(NAMES), arrays, min_size=0, max_size=5),
       meta=st.none() | json_values)
def test_fuzzed_golden_folders(tiny_case, tensors, meta):
    arrays = {name: np.full(shape, fill if dtype.startswith("float") else 3, dtype=dtype)
              for name, (dtype, shape, fill) in tensors.items()}
    write_safetensors(tiny_case / "expected.safetensors", arrays)
    if meta is None:
        (tiny_case / "meta.json").unlink(missing_ok=True)
    else:
        (tiny_case / "meta.json").write_text(json.dumps(meta))
    with bounded():
        case = GoldenCase.load(tiny_case)
        check_case(case, "reference")
