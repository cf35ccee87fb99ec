"""The exit-status contract on hostile and malformed inputs: 0 pass, 1 conformance failure, 2 bad input
(the message names the file, tensor or field, expected and found), 3 internal error. Every probe of the
trust issue has a test here; each was a traceback, a silent pass or a hang before."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv3_conformance.cli import main
from dsv3_conformance.format.safetensors_io import SafetensorsFile, read_all, write_safetensors
from dsv3_conformance.paths import GOLDEN_DIR, ROOT

TINY = GOLDEN_DIR / "official" / "v3-tiny"


@pytest.fixture()
def case(tmp_path) -> Path:
    copy = tmp_path / "case"
    shutil.copytree(TINY, copy)
    return copy


def _status(capsys, *args) -> tuple[int, str]:
    status = main(list(map(str, args)))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _rewrite_expected(case: Path, change) -> None:
    expected = read_all(case / "expected.safetensors")
    change(expected)
    write_safetensors(case / "expected.safetensors", expected)


def _edit_config(case: Path, **changes) -> None:
    raw = json.loads((case / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    (case / "config.json").write_text(json.dumps(raw))


def _alias(path: Path, name: str, onto: str) -> None:
    """Point tensor `name`'s header entry at the bytes of `onto` (same size): a crafted, overlapping file."""
    raw = path.read_bytes()
    length, = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header[name]["data_offsets"] = header[onto]["data_offsets"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def test_aliased_expected_tensors_are_refused_not_passed(case, capsys):
    _alias(case / "expected.safetensors", "prefill.logits_last.naive", "prefill.logits_last")
    status, output = _status(capsys, "check-golden", case)
    assert status == 2 and "overlaps the tensor before it" in output and "PASSED" not in output


def test_aliased_expert_weights_are_refused_by_generate(case, capsys):
    _alias(case / "model.safetensors", "model.layers.1.mlp.experts.4.up_proj.weight",
           "model.layers.1.mlp.experts.3.up_proj.weight")
    status, output = _status(capsys, "generate", case, "--prompt", "1,2,3", "--steps", "2", "--backend", "reference")
    assert status == 2 and "model.safetensors" in output and "overlaps" in output


def test_nan_mscale_is_bad_input_not_zeros(case, capsys):
    raw = json.loads((case / "config.json").read_text())
    raw["rope_scaling"]["mscale"] = float("nan")
    (case / "config.json").write_text(json.dumps(raw))
    status, output = _status(capsys, "generate", case, "--prompt", "1,2,3", "--steps", "2", "--backend", "reference")
    assert status == 2 and "rope_scaling.mscale must be a finite number, found NaN" in output


@pytest.mark.parametrize("change, message", [
    (lambda e: e["decode.3.logits"].__setitem__((0, 5), np.nan), "'decode.3.logits': expected finite values, found 1"),
    (lambda e: e["prefill.layer.1.hidden"].__setitem__((0, 0, 0), np.inf), "found 1 NaN or Inf"),
    (lambda e: e.update({"prefill.logits_last": e["prefill.logits_last"][:, :100]}),
     "'prefill.logits_last': expected shape [2, 512], found [2, 100]"),
    (lambda e: e.update({"tokens.decoded": e["tokens.decoded"][:1]}), "tokens.decoded has 1 sequences"),
    (lambda e: e["tokens.decoded"].__setitem__((1, 4), (e["tokens.decoded"][1, 4] + 1) % 512),
     "tokens.decoded[1, 4]"),
    (lambda e: e.update({"tokens.prompt": e["tokens.prompt"] + 1000}), "is outside [0, vocab_size=512)"),
    (lambda e: [e.pop(k) for k in list(e) if k != "tokens.prompt"], "holds no expected tensor this harness compares"),
    (lambda e: e.update({"tokens.prompt": e["tokens.prompt"].astype(np.float32)}), "expected integer token ids"),
])
def test_bad_expected_tensors_are_bad_input(case, capsys, change, message):
    _rewrite_expected(case, change)
    status, output = _status(capsys, "check-golden", case)
    assert status == 2, output
    assert message in output


def test_negative_steps_are_refused(case, capsys):
    status, output = _status(capsys, "generate", case, "--prompt", "1,2", "--steps", "-5")
    assert status == 2 and "expected an integer >= 0, found '-5'" in output


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 10**9, "num_hidden_layers=1000000000 exceeds this harness's bound"),
    ("n_routed_experts", 10**8, "n_routed_experts=100000000 exceeds this harness's bound"),
])
def test_huge_configs_fail_fast(case, capsys, field, value, message):
    _edit_config(case, **{field: value})
    status, output = _status(capsys, "generate", case, "--prompt", "1,2", "--steps", "2", "--backend", "reference")
    assert status == 2 and message in output


def test_a_huge_context_does_not_allocate_a_huge_cache(case):
    """max_position_embeddings 10^7: the tf cache holds only the positions a generation needs."""
    _edit_config(case, max_position_embeddings=10**7)
    # The child reports its own peak from /proc (VmHWM, the high-water mark of its own address space). Not
    # ru_maxrss: Linux carries the parent's peak across fork and exec into it, so a child of a pytest worker that
    # grew to 10 GB reports 10 GB however little the child itself used.
    program = ("import re, sys\nfrom pathlib import Path\nfrom dsv3_conformance.cli import main\n"
               "status = main(sys.argv[1:])\n"
               "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1]\n"
               "print('peak_kib', hwm, file=sys.stderr)\nsys.exit(status)")
    command = [sys.executable, "-c", program, "generate", str(case), "--prompt", "1,2,3", "--steps", "3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_gib = int(done.stderr.rsplit("peak_kib ", 1)[1].split()[0]) / 2**20
    assert peak_gib < 4, f"peak resident memory {peak_gib:.1f} GiB"


def test_a_folder_where_a_file_belongs_is_bad_input(case, capsys):
    (case / "meta.json").unlink()
    (case / "meta.json").mkdir()
    status, output = _status(capsys, "check-golden", case)
    assert status == 2 and "meta.json" in output


def test_unreadable_files_are_bad_input(case, capsys, monkeypatch):
    """Permission denied on the config (simulated: the tests may run as root, whom chmod does not stop)."""
    original = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    status, output = _status(capsys, "check-golden", case)
    assert status == 2 and "config.json: Permission denied" in output


@pytest.mark.parametrize("meta, message", [
    ([1, 2], "meta.json: must be a JSON object, found list"),
    ({"gemm_impl": "int8"}, "field 'gemm_impl' must be one of ['bf16', 'fp8'], found 'int8'"),
    ({"expected_files": [1]}, "'expected_files' must map file names to objects"),
])
def test_malformed_meta_is_bad_input(case, capsys, meta, message):
    (case / "meta.json").write_text(json.dumps(meta))
    status, output = _status(capsys, "check-golden", case)
    assert status == 2 and message in output


@pytest.mark.parametrize("value", [["model.safetensors"], 3, "../model.safetensors"])
def test_weight_map_values_must_name_shards(tmp_path, capsys, value):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    names = SafetensorsFile(folder / "model.safetensors").keys()
    index = {"weight_map": {name: "model.safetensors" for name in names}}
    index["weight_map"][names[0]] = value
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    status, output = _status(capsys, "generate", folder, "--prompt", "1,2", "--backend", "reference")
    assert status == 2 and f"weight_map['{names[0]}'] must name a shard file" in output


def test_an_unwritable_json_path_is_bad_input(case, capsys, tmp_path):
    status, output = _status(capsys, "check-golden", case, "--json", tmp_path)
    assert status == 2 and f"{tmp_path}: cannot write the output file" in output


@pytest.mark.parametrize("args, message", [
    (["check-golden", TINY, "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["check-golden", TINY, "--backend", "nosuch.module:BACKEND"], "cannot import module 'nosuch.module'"),
    (["check-golden", TINY, "--backend", "dsv3_conformance.backends:BUILTIN"],
     "is a dict, not a dsv3_conformance.backends.Backend"),
    (["generate", TINY, "--prompt", "1,x"], "--prompt takes comma-separated integer token ids"),
    (["generate", TINY, "--prompt", "1,9999", "--backend", "reference"], "token id 9999 at [0, 1] is outside"),
    (["mutants", "--mutant", "no-such-mutant"], "unknown mutant(s) ['no-such-mutant']"),
    (["check-golden", "/nonexistent/case"], "not a golden case"),
])
def test_bad_arguments_are_bad_input(capsys, args, message):
    status, output = _status(capsys, *args)
    assert status == 2 and message in output


def test_a_crashing_backend_is_an_internal_error(capsys, monkeypatch, tmp_path):
    module = tmp_path / "crashing_backend.py"
    module.write_text("from dsv3_conformance.backends import Backend\n"
                      "def runner(*args):\n    raise RuntimeError('boom')\n"
                      "BACKEND = Backend('crashing', runner)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, output = _status(capsys, "check-golden", TINY, "--backend", "crashing_backend:BACKEND")
    assert status == 3 and "RuntimeError: boom" in output and "internal error" in output


def test_a_wrong_tensor_is_a_conformance_failure(case, capsys):
    _rewrite_expected(case, lambda e: e.update({"decode.4.logits": e["decode.4.logits"] * np.float32(1.001)}))
    status, output = _status(capsys, "check-golden", case)
    assert status == 1 and "FAILED: 1 of 18 tensors out of tolerance" in output
