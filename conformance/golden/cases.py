"""Golden cases (SEMANTICS.md section 8) and checking a backend against them.

A case folder holds `config.json`, the weights (`model.safetensors`, shards with an index, or the
official layout), `expected.safetensors`, an optional `meta.json` and optional `expected-<label>.safetensors`.
`meta.json`'s `gemm_impl` picks the numerics path of `expected.safetensors` (the dequantized path when
absent). An extra file uses the fp8 activation path when its label contains "fp8", unless
`meta.json["expected_files"][file]["gemm_impl"]` says otherwise. Its tokens default to those of
`expected.safetensors`.

Everything is validated when the case is loaded, before any backend runs: every expected tensor must
be finite, of a float (or, for tokens, integer) dtype and of the shape the config and the tokens imply;
tokens must lie in the vocabulary and fit in max_position_embeddings; `tokens.decoded` must be the
greedy choice of the file's own logits; and a case must hold something to compare. A case that fails
any of this is bad input (exit 2), never a conformance failure.

Checking a backend compares every expected tensor it can produce; what it cannot (an `Unsupported` numerics path,
attention form or MTP module) and every tensor this harness does not know are not compared, each named with the
part it belongs to: the verdict is then INCOMPLETE unless the user allows those parts (conformance.verdict).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsv3_conformance.backends import Backend, Runner, Unsupported, resolve_backend
from dsv3_conformance.format.checkpoint import load_weights, open_checkpoint
from dsv3_conformance.format.config import ModelConfig, load_config
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.jsonfile import read_json
from dsv3_conformance.format.numerics import UE8M0_SCOPES, Numerics
from dsv3_conformance.format.safetensors_io import read_all
from dsv3_conformance.format.weights import ModelWeights
from dsv3_conformance.metrics import Comparison
from dsv3_conformance.backends import NonFiniteOutput, greedy
from dsv3_conformance.backends import speculative_generate
from dsv3_conformance.tolerances import Tolerance, tolerance
from dsv3_conformance.verdict import PASSED, Missing, first_failure_ends, outcome, summary_line

EXPECTED = "expected.safetensors"
_EXTRA = re.compile(r"^expected-(?P<label>[A-Za-z0-9_.-]+)\.safetensors$")
_HIDDEN = re.compile(r"^prefill\.layer\.(\d+)\.hidden$")
_POSITION = re.compile(r"^prefill\.position\.(\d+)\.logits$")
_DECODE = re.compile(r"^decode\.(\d+)\.logits$")
_MTP = re.compile(r"^mtp\.(\d+)\.(logits|hidden)$")
_LOGITS = ("prefill.logits_last", "prefill.logits", "prefill.logits_last.naive")
GEMM_IMPLS = ("bf16", "fp8")


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


def _meta_field(meta: dict, path: Path, key: str, allowed: tuple[str, ...] | None, default: Any) -> Any:
    value = meta.get(key, default)
    if allowed is not None and value not in allowed:
        raise GoldenError(f"{path}: field {key!r} must be one of {list(allowed)}, found {value!r}")
    return value


def _read_meta(path: Path) -> dict:
    file = path / "meta.json"
    if not file.exists():
        return {}
    meta = read_json(file, GoldenError, "meta.json")
    if not isinstance(meta, dict):
        raise GoldenError(f"{file}: must be a JSON object, found {type(meta).__name__}")
    overrides = meta.get("expected_files", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise GoldenError(f"{file}: 'expected_files' must map file names to objects, found {overrides!r}")
    for name, override in overrides.items():
        _meta_field(override, file, "gemm_impl", GEMM_IMPLS, "bf16")
    _meta_field(meta, file, "gemm_impl", GEMM_IMPLS, "bf16")
    _meta_field(meta, file, "ue8m0_scope", UE8M0_SCOPES, "official")
    named = meta.get("checkpoint")
    if named is not None and not (isinstance(named, dict) and isinstance(named.get("path"), str)
                                  and re.fullmatch(r"[0-9a-f]{64}", str(named.get("fingerprint")))):
        raise GoldenError(f"{file}: field 'checkpoint' must be {{\"path\": a folder, \"fingerprint\": a sha256}}, "
                          f"found {named!r:.200}")
    if not isinstance(meta.get("case", ""), str):
        raise GoldenError(f"{file}: field 'case' must be a string, found {meta['case']!r}")
    return meta


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
    def load(cls, path: str | Path, allow_fields: tuple[str, ...] = ()) -> "GoldenCase":
        path = Path(path)
        if not (path / EXPECTED).is_file():
            raise GoldenError(f"{path}: not a golden case, no {EXPECTED}")
        meta = _read_meta(path)
        case = cls(path, load_config(path, allow_fields), meta)
        overrides = meta.get("expected_files", {})
        base_impl = meta.get("gemm_impl", "bf16")
        case.files.append(ExpectedFile(path / EXPECTED, "", base_impl, read_all(path / EXPECTED)))
        for extra in sorted(path.glob("expected-*.safetensors")):
            match = _EXTRA.match(extra.name)
            if not match:
                raise GoldenError(f"{extra}: expected files are named expected-<label>.safetensors")
            label = match["label"]
            impl = overrides.get(extra.name, {}).get("gemm_impl", "fp8" if "fp8" in label else base_impl)
            case.files.append(ExpectedFile(extra, label, impl, read_all(extra)))
        for file in case.files:
            _validate(case, file)
        return case

    def weights(self) -> ModelWeights:
        """The case's own weights, or those of the checkpoint its meta.json names (`golden make` without
        --copy-weights), whose tensor names, dtypes and shapes must match the recorded fingerprint."""
        named = self.meta.get("checkpoint")
        if named is None or any(self.path.glob("model*.safetensors")):
            with open_checkpoint(self.path) as checkpoint:
                return load_weights(checkpoint, self.config)
        from dsv3_conformance.golden.make import fingerprint

        with open_checkpoint(named["path"]) as checkpoint:
            if fingerprint(checkpoint) != named["fingerprint"]:
                raise GoldenError(f"{self.path}: the checkpoint {named['path']} is not the one this case was made "
                                  "from (its tensor names, dtypes or shapes differ from the recorded fingerprint)")
            return load_weights(checkpoint, self.config)

    def tokens(self, file: ExpectedFile, name: str) -> np.ndarray | None:
        """Token tensor `name` of `file`, falling back to expected.safetensors."""
        return file.tensors.get(name, self.files[0].tensors.get(name))

    def numerics(self, file: ExpectedFile) -> Numerics:
        """The settings `file` was made with; ue8m0 applies where meta.json's `ue8m0_scope` says (default:
        "official", the official code's own modules)."""
        return Numerics(file.gemm_impl, self.config.scale_fmt, self.meta.get("ue8m0_scope", "official"))

    def device(self, file: ExpectedFile) -> str:
        """Where `file` was computed: meta.json's expected_files[name].device, else "h100" when its label
        says so, else the case's `device` (default "cpu")."""
        override = self.meta.get("expected_files", {}).get(file.path.name, {})
        default = "h100" if "h100" in file.label else self.meta.get("device", "cpu")
        return override.get("device", default)

    def tolerance_for(self, file: ExpectedFile, quantization: str | None = None) -> Tolerance:
        """The file's policy entry; a backend of quantized weights (`quantization`) is judged by its type's
        quantization policy on every file of the dequantized path."""
        if quantization is not None and file.gemm_impl == "bf16":
            own = tolerance(f"quant.{quantization}")
            if self.meta.get("compute_dtype") == "bfloat16":  # expectations that carry bfloat16's own rounding
                return own.loosened_by(tolerance("quant.bfloat16-golden"))
            return own
        compute = self.meta.get("compute_dtype", "float32")
        if compute not in ("float32", "bfloat16") or (compute == "bfloat16" and file.gemm_impl == "fp8"):
            raise GoldenError(f"{self.path}: no tolerance policy for goldens computed in {compute!r} on the "
                              f"{file.gemm_impl} path")
        if compute == "bfloat16":
            return tolerance("golden.bfloat16-path")
        if file.gemm_impl == "fp8":
            return tolerance("golden.fp8-path.h100" if self.device(file) == "h100" else "golden.fp8-path.row")
        return tolerance("golden.float32-path")

    def comparer(self, file: ExpectedFile, entry: Tolerance) -> Callable[[str, np.ndarray], Comparison]:
        """compare(name, output) against file's tensor `name` under the policy entry: every row for the fp8
        activation path and bfloat16 (rounding flips move a minority of tokens), whole tensors otherwise (a
        quantization policy pools every logits tensor of the file instead: check_case)."""
        if entry.per_row:
            return lambda name, output: Comparison.of_rows(file.result_name(name), output, file.tensors[name], entry)
        return lambda name, output: Comparison.of(file.result_name(name), output, file.tensors[name], entry.value)

    def compares_greedy_tokens(self, file: ExpectedFile, entry: Tolerance | None = None) -> bool:
        """Greedy tokens are compared exactly, except for files computed in bfloat16 or on an H100, whose
        near ties break either way (TOLERANCES.md sections 2 and 10: tokens differed in most of the repeated
        official runs), and under a quantization policy (`entry`), which bounds top-1 agreement instead; their
        decode logits are still compared, fed the file's own tokens."""
        return (self.meta.get("compute_dtype", "float32") != "bfloat16" and self.device(file) != "h100"
                and not (entry is not None and entry.per_distribution))



# --- validation --------------------------------------------------------------------------------------------

def _expected_shape(name: str, config: ModelConfig, batch: int, prompt: int, decoded: int | None) -> tuple | None:
    """The shape `name` must have, or None for a name this harness does not compare."""
    if name == "tokens.prompt":
        return (batch, prompt)
    if name == "tokens.decoded":
        return (batch, decoded)
    if name in ("prefill.logits_last", "prefill.logits_last.naive"):
        return (batch, config.vocab_size)
    if name == "prefill.logits":
        return (batch, prompt, config.vocab_size)
    if (position := _POSITION.match(name)) and int(position[1]) < prompt:
        return (batch, config.vocab_size)
    if (hidden := _HIDDEN.match(name)) and int(hidden[1]) < config.n_layers:
        return (batch, prompt, config.dim)
    if (step := _DECODE.match(name)) and decoded is not None and int(step[1]) < decoded:
        return (batch, config.vocab_size)
    if (mtp := _MTP.match(name)) and int(mtp[1]) < config.n_mtp_layers:
        return (batch, prompt, config.vocab_size if mtp[2] == "logits" else config.dim)
    return None


def _check_tokens(where: str, tokens: np.ndarray, config: ModelConfig) -> None:
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise GoldenError(f"{where}: expected shape [batch, length] with both >= 1, found {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise GoldenError(f"{where}: expected integer token ids, found dtype {tokens.dtype}")
    bad = (tokens < 0) | (tokens >= config.vocab_size)
    if bad.any():
        at = [int(i) for i in np.argwhere(bad)[0]]
        raise GoldenError(f"{where}: token id {int(tokens[tuple(at)])} at {at} is outside [0, vocab_size="
                          f"{config.vocab_size})")


def _validate(case: GoldenCase, file: ExpectedFile) -> None:
    """Refuse what cannot be compared honestly: see the module docstring."""
    config = case.config
    prompt = case.tokens(file, "tokens.prompt")
    if prompt is None:
        raise GoldenError(f"{file.path}: lacks tokens.prompt (and {EXPECTED} holds none to fall back on)")
    _check_tokens(f"{file.path}: tokens.prompt", prompt, config)
    decoded = case.tokens(file, "tokens.decoded")
    if decoded is not None:
        _check_tokens(f"{file.path}: tokens.decoded", decoded, config)
        if decoded.shape[0] != prompt.shape[0]:
            raise GoldenError(f"{file.path}: tokens.decoded has {decoded.shape[0]} sequences, tokens.prompt "
                              f"{prompt.shape[0]}")
    length = prompt.shape[1] + (decoded.shape[1] if decoded is not None else 0)
    if length > config.max_seq_len:
        raise GoldenError(f"{file.path}: prompt and decoded tokens reach position {length - 1}, beyond "
                          f"max_position_embeddings={config.max_seq_len}")
    compared = 0
    for name, array in file.tensors.items():
        shape = _expected_shape(name, config, prompt.shape[0], prompt.shape[1],
                                None if decoded is None else decoded.shape[1])
        if shape is None:
            continue
        if tuple(array.shape) != shape:
            raise GoldenError(f"{file.path}: tensor {name!r}: expected shape {list(shape)}, found {list(array.shape)}")
        if name.startswith("tokens."):
            continue
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "V":
            raise GoldenError(f"{file.path}: tensor {name!r}: expected a float dtype, found {array.dtype}")
        bad = int(np.count_nonzero(~np.isfinite(array.astype(np.float64))))
        if bad:
            raise GoldenError(f"{file.path}: tensor {name!r}: expected finite values, found {bad} NaN or Inf")
        compared += 1
    for name in file.tensors:
        if (mtp := _MTP.match(name)) and int(mtp[1]) >= config.n_mtp_layers:
            raise GoldenError(f"{file.path}: tensor {name!r}: expected an MTP depth below num_nextn_predict_layers="
                              f"{config.n_mtp_layers}, found depth {mtp[1]}")
    if any(_MTP.match(name) for name in file.tensors) and (decoded is None or
                                                          decoded.shape[1] < config.n_mtp_layers):
        raise GoldenError(f"{file.path}: MTP tensors need tokens.decoded with at least num_nextn_predict_layers="
                          f"{config.n_mtp_layers} tokens (the tokens after the prompt)")
    if compared == 0 and "tokens.decoded" not in file.tensors:
        raise GoldenError(f"{file.path}: holds no expected tensor this harness compares (logits, block outputs, "
                          "decode logits or tokens.decoded)")
    _check_greedy(file, decoded)


def _check_greedy(file: ExpectedFile, decoded: np.ndarray | None) -> None:
    """tokens.decoded[:, t] must be a maximal logit of the logits before it (prefill.logits_last, decode.t-1)."""
    if decoded is None or "tokens.decoded" not in file.tensors:
        return
    before = [file.tensors.get("prefill.logits_last")] + [file.tensors.get(f"decode.{t}.logits")
                                                          for t in range(decoded.shape[1] - 1)]
    for step, logits in enumerate(before):
        if logits is None:
            continue
        chosen = np.take_along_axis(logits, decoded[:, step:step + 1].astype(np.int64), axis=1)[:, 0]
        wrong = np.flatnonzero(chosen < logits.max(axis=1))
        if wrong.size:
            source = "prefill.logits_last" if step == 0 else f"decode.{step - 1}.logits"
            raise GoldenError(f"{file.path}: tokens.decoded[{int(wrong[0])}, {step}] = {int(decoded[wrong[0], step])} "
                              f"is not the greedy choice of {source} (expected {int(logits[wrong[0]].argmax())})")


# --- checking a backend -------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    """Every expected tensor of a case on one backend: compared (`results`), or not compared (`missing`, each with
    the part it belongs to and why); `by_policy`: tensors the tolerance policy leaves out (greedy tokens of a
    bfloat16 or H100 golden), which are not expected. `allow`: the parts the user allows to be missing."""

    case: str
    backend: str
    results: list[Comparison]
    missing: list[Missing] = field(default_factory=list)
    policy: dict[str, str] = field(default_factory=dict)  # result name -> tolerance policy key
    by_policy: list[str] = field(default_factory=list)
    allow: tuple[str, ...] = ()

    @property
    def failures(self) -> list[Comparison]:
        return [result for result in self.results if not result.passed]

    @property
    def verdict(self) -> str:
        return outcome(bool(self.failures), len(self.results), self.missing, self.allow)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    def summary(self) -> str:
        return summary_line(self.verdict, len(self.results), len(self.failures), "tensors", self.missing, self.allow)

    def to_json(self) -> dict:
        return {"case": self.case, "backend": self.backend, "verdict": self.verdict, "passed": self.passed,
                "results": [result.to_json() for result in self.results],
                "not_compared": [{"tensor": m.what, "part": m.part, "reason": m.reason} for m in self.missing],
                "allowed_missing": list(self.allow), "not_compared_by_policy": self.by_policy}


def _nth(outputs: tuple, index: int) -> np.ndarray | None:
    return outputs[index] if index < len(outputs) else None


def _prefill_checks(runner: Runner, file: ExpectedFile, prompt: np.ndarray, capacity: int, compare,
                    result: CaseResult) -> None:
    output = runner.prefill(prompt, capacity=capacity)
    for name in file.tensors:
        if (hidden := _HIDDEN.match(name)) and output.hidden is None:
            result.missing.append(Missing(file.result_name(name), "hidden",
                                          f"{file.path.name}: {type(runner).__name__} gives no block outputs"))
        elif hidden:
            compare(name, _nth(output.hidden, int(hidden[1])))
        elif name == "prefill.logits_last":
            compare(name, output.logits_last)
        elif name == "prefill.logits":
            compare(name, output.logits)
        elif position := _POSITION.match(name):
            compare(name, output.logits[:, int(position[1])])


def _decode_checks(runner: Runner, file: ExpectedFile, decoded: np.ndarray, compare) -> None:
    steps = sorted(int(m[1]) for m in map(_DECODE.match, file.tensors) if m)
    for step in range(steps[-1] + 1 if steps else 0):
        logits = runner.decode(decoded[:, step]).logits_last
        name = f"decode.{step}.logits"
        if name in file.tensors:
            compare(name, logits)


def _greedy_tokens(file: ExpectedFile, runner: Runner, prompt: np.ndarray, capacity: int, result: CaseResult) -> None:
    expected = file.tensors["tokens.decoded"]
    name = file.result_name("tokens.decoded")
    try:
        tokens = greedy(runner, prompt, expected.shape[1], capacity)  # the caches of the other steps: no new compile
    except NonFiniteOutput:  # a backend's NaN logits are its failure, not the harness's
        result.results.append(Comparison(name, float("inf"), float("inf"), tolerance("tokens.exact").value, False))
        return
    result.results.append(Comparison.of(name, tokens, expected, tolerance("tokens.exact").value))


def _ended(result: CaseResult) -> bool:
    """Whether the check stops here: a comparison failed where the first failure ends checks (verdict.py)."""
    return first_failure_ends() and bool(result.failures)


def _compare_file(case: "GoldenCase", file: ExpectedFile, backend: Backend, weights: ModelWeights,
                  dtype: str | None, compare, result: CaseResult) -> None:
    prompt, decoded = case.tokens(file, "tokens.prompt"), case.tokens(file, "tokens.decoded")
    capacity = prompt.shape[1] + (decoded.shape[1] if decoded is not None else 0)
    runner = backend.make_runner(case.config, weights, case.numerics(file), dtype)
    _prefill_checks(runner, file, prompt, capacity, compare, result)
    if _ended(result):
        return
    if decoded is not None:
        _decode_checks(runner, file, decoded, compare)
    if "tokens.decoded" in file.tensors and case.compares_greedy_tokens(file, case.tolerance_for(
            file, backend.quantization)):
        _greedy_tokens(file, runner, prompt, capacity, result)


def _compare_mtp(case: "GoldenCase", file: ExpectedFile, backend: Backend, weights: ModelWeights,
                 dtype: str | None, compare, result: CaseResult) -> None:
    """Module k over every prompt position; the tokens after the prompt are the decoded ones."""
    names = sorted(name for name in file.tensors if _MTP.match(name))
    if not names:
        return
    prompt, decoded = case.tokens(file, "tokens.prompt"), case.tokens(file, "tokens.decoded")
    runner = backend.make_runner(case.config, weights, case.numerics(file), dtype)
    runner.prefill(prompt, capacity=prompt.shape[1] + 1)
    step = runner.mtp(decoded[:, : case.config.n_mtp_layers])
    for name in names:
        match = _MTP.match(name)
        if match[2] == "hidden" and step.hidden is None:
            result.missing.append(Missing(file.result_name(name), "hidden",
                                          f"{file.path.name}: {type(runner).__name__} gives no MTP block outputs"))
        else:
            compare(name, _nth(step.logits if match[2] == "logits" else step.hidden, int(match[1])))


def _compare_speculative(case: "GoldenCase", file: ExpectedFile, backend: Backend, weights: ModelWeights,
                         dtype: str | None, compare, result: CaseResult) -> None:
    """Greedy speculative decoding (every module drafting, the main model verifying) must return exactly
    `tokens.decoded`."""
    expected = file.tensors["tokens.decoded"]
    runner = backend.make_runner(case.config, weights, case.numerics(file), dtype)
    tokens, _ = speculative_generate(runner, case.tokens(file, "tokens.prompt"), expected.shape[1],
                                     case.config.n_mtp_layers)
    result.results.append(Comparison.of(file.result_name(SPECULATIVE), tokens, expected,
                                        tolerance("tokens.exact").value))


def _compare_naive(case: "GoldenCase", file: ExpectedFile, backend: Backend, weights: ModelWeights,
                   dtype: str | None, compare, result: CaseResult) -> None:
    naive = backend.make_runner(case.config, weights, case.numerics(file), dtype, attention_form="naive")
    compare("prefill.logits_last.naive", naive.prefill(case.tokens(file, "tokens.prompt")).logits_last)


SPECULATIVE = "speculative.tokens.decoded"


def _is_logits(name: str) -> bool:
    return name in _LOGITS or name.endswith(".logits")


def _expected_names(case: "GoldenCase", file: ExpectedFile, entry: Tolerance) -> dict[str, list[str]]:
    """The result names each part of the check must produce for `file` under the policy `entry` (part -> names),
    under "unknown" the tensors this harness does not know, and under "by policy" those the policy leaves out
    (greedy tokens where near ties may break either way; block outputs under a quantization policy, which bounds
    next-token distributions only)."""
    prompt, decoded = case.tokens(file, "tokens.prompt"), case.tokens(file, "tokens.decoded")
    parts: dict[str, list[str]] = {"main": [], "mtp": [], "speculative": [], "naive": [], "unknown": [],
                                   "by policy": []}
    for name in file.tensors:
        if name == "tokens.prompt":
            continue
        if ((name == "tokens.decoded" and not case.compares_greedy_tokens(file, entry))
                or (entry.per_distribution and not _is_logits(name) and name != "tokens.decoded")):
            parts["by policy"].append(name)
            continue
        known = _expected_shape(name, case.config, prompt.shape[0], prompt.shape[1],
                                None if decoded is None else decoded.shape[1]) is not None
        part = ("unknown" if not known else "mtp" if _MTP.match(name) else
                "naive" if name == "prefill.logits_last.naive" else "main")
        parts[part].append(name)
    if parts["mtp"] and "tokens.decoded" in file.tensors and case.compares_greedy_tokens(file, entry):
        parts["speculative"].append(SPECULATIVE)
    return parts


PART_CHECKS = {"main": _compare_file, "mtp": _compare_mtp, "speculative": _compare_speculative,
               "naive": _compare_naive}


def _pooled_distributions(file: ExpectedFile, pooled: list[tuple[str, np.ndarray]], vocab: int,
                          entry: Tolerance) -> Comparison:
    """Every logits row of the file (each sequence's prompt positions and decode steps) as one set of next-token
    distributions, as llama.cpp's `llama-perplexity --kl-divergence` pools a text's tokens: the share of top-1
    agreement needs more rows than one step of a batch holds."""
    names = [name for name, _ in pooled]
    return Comparison.of_distributions(
        file.result_name(f"logits: {len(names)} tensors ({names[0]} ... {names[-1]})" if len(names) > 1 else names[0]),
        np.concatenate([np.reshape(output, (-1, vocab)) for _, output in pooled]),
        np.concatenate([np.reshape(file.tensors[name], (-1, vocab)) for name in names]), entry)


def check_case(case: GoldenCase, backend: Backend | str, dtype: str | None = None,
               weights: ModelWeights | None = None, allow: tuple[str, ...] = ()) -> CaseResult:
    """Run `backend` on the case's tokens and compare every expected tensor.

    Whatever the backend cannot run (`Unsupported`: a numerics path, an attention form, the MTP modules) is
    missing, named by its part; so is every tensor this harness does not know. The verdict is INCOMPLETE
    unless `allow` names every missing part (conformance.verdict).
    """
    backend = resolve_backend(backend)
    if dtype is None and case.meta.get("compute_dtype") == "bfloat16" and "bfloat16" in backend.dtypes:
        dtype = "bfloat16"  # a native bfloat16 golden is checked in bfloat16 where the backend computes in it
    weights = weights if weights is not None else case.weights()
    result = CaseResult(case.name, backend.name, [], allow=tuple(allow))
    for file in case.files:
        entry = case.tolerance_for(file, backend.quantization)
        compare = case.comparer(file, entry)
        expected = _expected_names(case, file, entry)
        left_out = set(expected["by policy"])

        pooled: list[tuple[str, np.ndarray]] = []

        def record(name: str, output: np.ndarray | None, compare=compare, file=file, entry=entry,
                   left_out=left_out, pooled=pooled) -> None:
            """Compare an output with the file's tensor `name`; None (the backend returned no such output) or a
            wrong shape fails; a tensor the policy leaves out is not compared; under a quantization policy, logits
            of the right shape are pooled, to be judged together."""
            if name in left_out:
                return
            if output is None or (entry.per_distribution and np.shape(output) != file.tensors[name].shape):
                result.results.append(Comparison(file.result_name(name), float("inf"), float("inf"), entry.value,
                                                 False))
            elif entry.per_distribution:
                pooled.append((name, output))
            else:
                result.results.append(compare(name, output))

        first = len(result.results)
        result.missing += [Missing(file.result_name(name), "unknown", "a tensor this harness does not compare")
                           for name in expected.pop("unknown")]
        result.by_policy += [file.result_name(name) for name in expected.pop("by policy")]
        for part, names in expected.items():
            if not names or _ended(result):
                continue
            try:
                PART_CHECKS[part](case, file, backend, weights, dtype, record, result)
            except Unsupported as reason:
                done = {c.name for c in result.results} | {file.result_name(name) for name, _ in pooled}
                result.missing += [Missing(file.result_name(name), reason.part or part, f"{file.path.name}: {reason}")
                                   for name in names if file.result_name(name) not in done]
        if pooled:
            result.results.append(_pooled_distributions(file, pooled, case.config.vocab_size, entry))
        result.policy.update({c.name: "tokens.exact" if c.name.endswith("tokens.decoded") else entry.key
                              for c in result.results[first:]})
        if _ended(result):
            break
    return result
