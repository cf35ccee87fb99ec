"""`dsv3-conformance golden generate`: golden cases produced by the PyTorch oracle.

Each case is a seeded random checkpoint of a small config, a prompt, and what transformers'
DeepseekV3ForCausalLM (float32, CPU) computes from them: every block's output and the logits of the
prompt, then a greedy continuation fed one token at a time with the logits of every step. The format is
that of the official cases (SEMANTICS.md section 8), so check-golden reads both alike. The official cases are
kept as shipped data and never regenerated.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.format.checkpoint import load_weights, open_checkpoint, write_hf
from dsv3_conformance.format.config import ModelConfig, YarnScaling, tiny
from dsv3_conformance.format.safetensors_io import write_safetensors
from dsv3_conformance.reference.rope import yarn_active
from dsv3_conformance.reference.synthetic import random_tensors

from dsv3_conformance.golden.manifest import MANIFEST, describe_case, load_manifest
from dsv3_conformance.golden.oracle import OracleRunner, oracle_versions

ORACLE_DIR = "oracle"


@dataclass(frozen=True)
class OracleCase:
    name: str
    purpose: str
    config: Callable[[], ModelConfig]
    seed: int
    batch: int = 2
    prompt_len: int = 12
    decode_steps: int = 6
    # Weights rescaled so that a recorded divergence of the oracle cannot show (`accepts` names it); the
    # golden check of the reference then shows it did not.
    prepare: Callable[[dict, ModelConfig], dict] | None = None
    accepts: tuple[str, ...] = ()


def loud_latents(tensors: dict, config: ModelConfig, factor: float = 1e4) -> dict:
    """q_a_proj and the latent rows of kv_a_proj scaled by `factor`: the latent norms' inputs have a mean square
    near 1e8, where neither 1e-6 nor rms_norm_eps moves their output above 1e-10 (transformers fixes the latent
    norms' eps at 1e-6: hf-latent-norm-eps), while the other norms see rms_norm_eps at full strength."""
    scaled = dict(tensors)
    for name, array in tensors.items():
        if name.endswith("q_a_proj.weight"):
            scaled[name] = array * factor
        elif name.endswith("kv_a_proj_with_mqa.weight"):
            scaled[name] = np.concatenate([array[: config.kv_lora_rank] * factor, array[config.kv_lora_rank:]])
    return scaled


ORACLE_CASES = [
    OracleCase("dense-only", "every layer a dense FFN (first_k_dense_replace = num_hidden_layers)",
               lambda: tiny(n_layers=2, n_dense_layers=2, name="dense-only"), seed=101),
    OracleCase("moe-groups", "8 groups of 4 experts, top-3 groups, top-6 experts, strongly negative biases",
               lambda: tiny(n_layers=3, n_dense_layers=1, n_routed_experts=32, n_expert_groups=8, n_limited_groups=3,
                            n_activated_experts=6, name="moe-groups"), seed=102, batch=3),
    OracleCase("q-lora-0", "no query compression (q_lora_rank null)",
               lambda: tiny(q_lora_rank=0, name="q-lora-0"), seed=103),
    OracleCase("yarn-off", "no rope scaling",
               lambda: tiny(rope_scaling=None, name="yarn-off"), seed=104),
    OracleCase("yarn-on-mscale", "YaRN active with mscale = mscale_all_dim = 0.707 and factor 4",
               lambda: tiny(rope_scaling=YarnScaling(factor=4.0, original_seq_len=16, mscale=0.707,
                                                     mscale_all_dim=0.707), name="yarn-on-mscale"),
               seed=105, prompt_len=20, decode_steps=8),
    OracleCase("fp8-weights", "e4m3 weights with 128x128 block scales, widths not multiples of 128 (padding)",
               lambda: tiny(dim=160, inter_dim=200, moe_inter_dim=72, fp8_weights=True, name="fp8-weights"),
               seed=106),
    OracleCase("eps-theta", "rms_norm_eps 1e-2 and rope_theta 500 (released: 1e-6 and 10000), YaRN active: a "
                            "backend that hard-codes either fails; latent norms' inputs scaled (loud_latents)",
               lambda: tiny(rms_norm_eps=1e-2, rope_theta=500.0, name="eps-theta"), seed=107,
               prepare=loud_latents, accepts=("hf-latent-norm-eps",)),
]
BIAS_MEAN = -2.0


def generate_case(case: OracleCase, folder: Path) -> dict:
    """Write one oracle case into `folder`; returns its meta."""
    config = case.config()
    rng = np.random.default_rng(case.seed)
    if folder.exists():
        shutil.rmtree(folder)
    tensors = random_tensors(config, case.seed, bias_mean=BIAS_MEAN)
    write_hf(folder, case.prepare(tensors, config) if case.prepare else tensors, config)
    with open_checkpoint(folder) as checkpoint:
        weights = load_weights(checkpoint, config)
    prompt = rng.integers(0, config.vocab_size, (case.batch, case.prompt_len))
    oracle = OracleRunner(config, weights, accept_divergences=bool(case.accepts))
    prefill = oracle.prefill(prompt)
    expected = {"tokens.prompt": prompt, "prefill.logits_last": prefill.logits_last,
                "prefill.logits": prefill.logits}
    expected.update({f"prefill.layer.{k}.hidden": hidden for k, hidden in enumerate(prefill.hidden)})
    logits, decoded = prefill.logits_last, []
    for step in range(case.decode_steps):
        token = np.argmax(logits, axis=-1)
        decoded.append(token)
        logits = oracle.decode(token).logits_last
        expected[f"decode.{step}.logits"] = logits
    # tokens.decoded[:, t] is fed at position S+t: the greedy choice after the prompt and the tokens before it.
    expected["tokens.decoded"] = np.stack(decoded, axis=1)
    write_safetensors(folder / "expected.safetensors",
                      {name: np.ascontiguousarray(value, np.int64 if name.startswith("tokens.") else np.float32)
                       for name, value in expected.items()})
    meta = {"case": f"oracle-{case.name}", "purpose": case.purpose, **oracle_versions(), "seed": case.seed,
            "bias_mean": BIAS_MEAN, "batch": case.batch, "prompt_len": case.prompt_len,
            "decode_steps": case.decode_steps, "gemm_impl": "bf16", "compute_dtype": "float32",
            "producer": "transformers DeepseekV3ForCausalLM, eager attention, float32, CPU"}
    if case.accepts:
        meta["accepted_divergences"] = {"keys": list(case.accepts), "why": (case.prepare.__doc__ or "").strip()}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def generate_all(golden_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Regenerate the oracle cases (all, or those named) and their manifest entries."""
    chosen = [case for case in ORACLE_CASES if names is None or case.name in names]
    unknown = set(names or []) - {case.name for case in ORACLE_CASES}
    if unknown:
        raise ValueError(f"unknown oracle case(s) {sorted(unknown)}: expected some of "
                         f"{[case.name for case in ORACLE_CASES]}")
    manifest = load_manifest(golden_dir)
    entries = {entry["path"]: entry for entry in manifest["cases"]}
    written = []
    for case in tqdm(chosen, desc="oracle golden cases", unit="case"):
        path = f"{ORACLE_DIR}/{case.name}"
        meta = generate_case(case, golden_dir / path)
        config = case.config()
        summary = {"hidden_size": config.dim, "num_hidden_layers": config.n_layers,
                   "first_k_dense_replace": config.n_dense_layers, "n_routed_experts": config.n_routed_experts,
                   "num_experts_per_tok": config.n_activated_experts, "n_group": config.n_expert_groups,
                   "topk_group": config.n_limited_groups, "q_lora_rank": config.q_lora_rank,
                   "yarn": yarn_active(config), "fp8_weights": config.fp8_weights,
                   "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta}
        provenance = {"producer": meta["producer"], "torch": meta["torch"], "transformers": meta["transformers"],
                      "purpose": case.purpose, "generated_by": "dsv3-conformance golden generate"}
        entries[path] = describe_case(golden_dir, path, provenance, case.seed, summary)
        written.append(golden_dir / path)
    manifest["cases"] = sorted(entries.values(), key=lambda entry: (not entry["path"].startswith("official"),
                                                                    entry["path"]))
    (golden_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return written
