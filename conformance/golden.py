"""Golden cases (SPEC section 8) and checking a backend against them.

A case folder holds `config.json`, the weights (`model.safetensors`, shards with an index, or the
official layout), `expected.safetensors`, an optional `meta.json` and optional `expected-<label>.safetensors`.
`meta.json`'s `gemm_impl` picks the numerics path of `expected.safetensors` (the dequantized path when
absent). An extra file uses the fp8 activation path when its label contains "fp8", unless
`meta.json["expected_files"][file]["gemm_impl"]` says otherwise. Its tokens default to those of
`expected.safetensors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conformance.format.checkpoint import load_weights, open_checkpoint
from conformance.format.config import ModelConfig, load_config
from conformance.format.jsonfile import read_json
from conformance.format.numerics import Numerics
from conformance.format.safetensors_io import SafetensorsError, read_all
from conformance.format.weights import ModelWeights

from .backends import Backend, Runner, resolve_backend
from .format.errors import BadInput
from .metrics import Comparison
from .runners import greedy
from .tolerances import Tolerance, tolerance

EXPECTED = "expected.safetensors"
_EXTRA = re.compile(r"^expected-(?P<label>[A-Za-z0-9_.-]+)\.safetensors$")
_HIDDEN = re.compile(r"^prefill\.layer\.(\d+)\.hidden$")
_DECODE = re.compile(r"^decode\.(\d+)\.logits$")
_INPUTS = {"tokens.prompt"}


class GoldenError(BadInput):
    """A golden case folder that is incomplete or inconsistent."""


@dataclass(frozen=True)
class ExpectedFile:
    path: Path
    label: str  # "" for expected.safetensors; result names of other files carry "<label>:"
    gemm_impl: str
    tensors: dict[str, np.ndarray]

    def result_name(self, name: str) -> str:
        return f"{self.label}:{name}" if self.label else name


@dataclass
class GoldenCase:
    path: Path
    config: ModelConfig
    meta: dict
    files: list[ExpectedFile] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta.get("case", self.path.name)

    @classmethod
    def load(cls, path: str | Path) -> "GoldenCase":
        path = Path(path)
        if not (path / EXPECTED).is_file():
            raise GoldenError(f"{path}: not a golden case, no {EXPECTED}")
        meta = read_json(path / "meta.json", GoldenError, "meta.json") if (path / "meta.json").is_file() else {}
        case = cls(path, load_config(path), meta)
        overrides = meta.get("expected_files", {})
        base_impl = meta.get("gemm_impl", "bf16")
        case.files.append(ExpectedFile(path / EXPECTED, "", base_impl, _read(path / EXPECTED)))
        for extra in sorted(path.glob("expected-*.safetensors")):
            match = _EXTRA.match(extra.name)
            if not match:
                raise GoldenError(f"{extra}: expected files are named expected-<label>.safetensors")
            label = match["label"]
            impl = overrides.get(extra.name, {}).get("gemm_impl", "fp8" if "fp8" in label else base_impl)
            case.files.append(ExpectedFile(extra, label, impl, _read(extra)))
        if "tokens.prompt" not in case.files[0].tensors:
            raise GoldenError(f"{path / EXPECTED}: lacks tokens.prompt")
        return case

    def weights(self) -> ModelWeights:
        with open_checkpoint(self.path) as checkpoint:
            return load_weights(checkpoint, self.config)

    def tokens(self, file: ExpectedFile, name: str) -> np.ndarray | None:
        """Token tensor `name` of `file`, falling back to expected.safetensors."""
        return file.tensors.get(name, self.files[0].tensors.get(name))

    def tolerance_for(self, file: ExpectedFile) -> Tolerance:
        if file.gemm_impl == "fp8":
            return tolerance("golden.fp8-path")
        compute = self.meta.get("compute_dtype", "float32")
        if compute != "float32":
            raise GoldenError(f"{self.path}: no tolerance policy for goldens computed in {compute}")
        return tolerance("golden.float32-path")


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        return read_all(path)
    except SafetensorsError as error:
        raise GoldenError(str(error)) from None


@dataclass
class CaseResult:
    case: str
    backend: str
    results: list[Comparison]
    not_compared: list[str]
    policy: dict[str, str] = field(default_factory=dict)  # result name -> tolerance policy key

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    def to_json(self) -> dict:
        return {"case": self.case, "backend": self.backend, "passed": self.passed,
                "results": [result.to_json() for result in self.results]}


def _prefill_checks(runner: Runner, file: ExpectedFile, prompt: np.ndarray, limit: float) -> list[Comparison]:
    output = runner.prefill(prompt)
    results = []
    for name, expected in file.tensors.items():
        hidden = _HIDDEN.match(name)
        if hidden and int(hidden[1]) < len(output.hidden):
            results.append(Comparison.of(file.result_name(name), output.hidden[int(hidden[1])], expected, limit))
        elif name == "prefill.logits_last":
            results.append(Comparison.of(file.result_name(name), output.logits_last, expected, limit))
        elif name == "prefill.logits":
            results.append(Comparison.of(file.result_name(name), output.logits, expected, limit))
    return results


def _decode_checks(runner: Runner, file: ExpectedFile, decoded: np.ndarray, limit: float) -> list[Comparison]:
    steps = sorted(int(m[1]) for m in map(_DECODE.match, file.tensors) if m)
    results = []
    for step in range(steps[-1] + 1 if steps else 0):
        logits = runner.decode(decoded[:, step]).logits_last
        name = f"decode.{step}.logits"
        if name in file.tensors:
            results.append(Comparison.of(file.result_name(name), logits, file.tensors[name], limit))
    return results


def _known(name: str) -> bool:
    return bool(name in _INPUTS or _HIDDEN.match(name) or _DECODE.match(name)
                or name in ("prefill.logits_last", "prefill.logits", "prefill.logits_last.naive", "tokens.decoded"))


def check_case(case: GoldenCase, backend: Backend | str, dtype: str | None = None,
               weights: ModelWeights | None = None) -> CaseResult:
    """Run `backend` on the case's tokens and compare every expected tensor it knows."""
    backend = resolve_backend(backend)
    weights = weights if weights is not None else case.weights()
    results: list[Comparison] = []
    not_compared: list[str] = []
    policy: dict[str, str] = {}
    for file in case.files:
        numerics = Numerics(file.gemm_impl, case.config.scale_fmt)
        entry = case.tolerance_for(file)
        limit = entry.value
        prompt = case.tokens(file, "tokens.prompt")
        decoded = case.tokens(file, "tokens.decoded")
        runner = backend.make_runner(case.config, weights, numerics, dtype)
        results += _prefill_checks(runner, file, prompt, limit)
        if decoded is not None:
            results += _decode_checks(runner, file, decoded, limit)
        if "prefill.logits_last.naive" in file.tensors:
            naive = backend.make_runner(case.config, weights, numerics, dtype, attention="naive")
            results.append(Comparison.of(file.result_name("prefill.logits_last.naive"),
                                         naive.prefill(prompt).logits_last,
                                         file.tensors["prefill.logits_last.naive"], limit))
        if "tokens.decoded" in file.tensors:
            expected_tokens = file.tensors["tokens.decoded"]
            generated = greedy(runner, prompt, expected_tokens.shape[1])
            results.append(Comparison.of(file.result_name("tokens.decoded"), generated, expected_tokens,
                                         tolerance("tokens.exact").value))
        compared = {result.name for result in results}
        policy.update({name: entry.key for name in compared if name not in policy})
        policy[file.result_name("tokens.decoded")] = "tokens.exact"
        not_compared += [file.result_name(name) for name in file.tensors
                         if not _known(name) or (file.result_name(name) not in compared and name not in _INPUTS)]
    return CaseResult(case.name, backend.name, results, not_compared, policy)
