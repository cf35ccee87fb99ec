"""The report's training claims, each reproduced by one command at a small scale (report sections 2.1.2, 2.2,
3.3): `dsv3-conformance experiment balance|fp8|mtp [--steps N]`.

Data: byte-level tokens (vocabulary 256) of the Python standard library's own source files, which exist on
every machine with Python: the files in name order, concatenated, split into a training stream and a
held-out stream (the last 10%). Batches are random windows of the training stream (seeded).

- balance: the same small MoE model trained three ways from each of three seeds, every correction bias starting
  at zero (the report's setting): no balancing, the sequence-wise loss only (alpha, default 1e-2), and bias
  balancing only (gamma, default 1e-2): both raised from the report's 1e-4 and 1e-3, which act over trillions
  of tokens, so that they act within a few hundred steps. MaxVio per step (the worst MoE layer) and the loss;
  mean and spread over the seeds.
- fp8: the same model, seed and batches in bfloat16 and with every linear GEMM in fp8; the relative gap of
  the final losses (the report: under 0.25%).
- mtp: without and with two MTP modules; the main loss of each on held-out text; on held-out prompts, greedy
  speculative decoding with the trained modules, checked to return exactly the greedy tokens, and its draft
  acceptance at each depth (drafting one token, and two).
Results go to benchmarks/results/experiment-<name>.json and .png; the report shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dsv3_conformance.format.config import ModelConfig, tiny
from dsv3_conformance.format.errors import BadInput
from dsv3_conformance.format.training import TrainSettings
from dsv3_conformance.paths import RESULTS_DIR


EXPERIMENTS = ("balance", "fp8", "mtp")
BATCH, LENGTH, CORPUS_BYTES = 8, 128, 4 << 20
DEFAULT_STEPS = {"balance": 300, "fp8": 400, "mtp": 300}
SEEDS = 3  # balance runs per setting


def corpus(limit: int = CORPUS_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) byte streams of the standard library's source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    stream = np.frombuffer(b"".join(chunks)[:limit], np.uint8).astype(np.int32)
    cut = int(len(stream) * 0.9)
    return stream[:cut], stream[cut:]


def batches(stream: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - LENGTH - 1, BATCH)
        yield np.stack([stream[s:s + LENGTH] for s in starts])


def model_config(mtp: int = 0) -> ModelConfig:
    """A small DeepSeek-V3: 2 MoE layers of 16 experts in 4 groups (top-2 groups, k = 2) and a shared expert;
    widths of 128 so that the fp8 path applies."""
    return tiny(vocab_size=256, dim=128, inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=0,
                n_heads=2, n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2,
                q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                max_seq_len=LENGTH, rope_scaling=None, n_mtp_layers=mtp, name="experiment")


def _weights(config: ModelConfig, seed: int):
    """Seeded weights with every correction bias at zero: balancing starts from the router's own affinities."""
    import dataclasses

    from dsv3_conformance.checks.strategies import build_weights
    from dsv3_conformance.format.weights import MoEWeights

    def unbiased(layer):
        if not isinstance(layer.ffn, MoEWeights) or layer.ffn.gate.bias is None:
            return layer
        gate = dataclasses.replace(layer.ffn.gate, bias=np.zeros_like(layer.ffn.gate.bias))
        return dataclasses.replace(layer, ffn=dataclasses.replace(layer.ffn, gate=gate))

    weights = build_weights(config, seed=seed)
    mtp = tuple(dataclasses.replace(module, block=unbiased(module.block)) for module in weights.mtp)
    return dataclasses.replace(weights, layers=tuple(unbiased(layer) for layer in weights.layers), mtp=mtp)


def train(config: ModelConfig, settings: TrainSettings, steps: int, seed: int = 0, label: str = "",
          trainer=None) -> dict:
    """Train from seed; per step the losses and MaxVio (worst MoE layer); the final held-out loss. `trainer`: one
    of the same config and settings to restart from the seed's weights (its compiled step is reused)."""
    from dsv3_conformance.impl.training import Trainer
    from dsv3_conformance.reference.training import max_violation

    train_stream, held_out = corpus()
    if trainer is None:
        trainer = Trainer(config, _weights(config, seed), settings)
    else:
        trainer.restart(_weights(config, seed))
    history = {"main": [], "mtp": [], "balance": [], "max_violation": []}
    start = time.perf_counter()
    for _, tokens in zip(tqdm(range(steps), desc=label or "training", unit="step"), batches(train_stream, seed)):
        out = trainer.step(tokens)
        loads = out["loads"][: config.n_layers].astype(np.float64)
        history["max_violation"].append(max(max_violation(load) for load in loads))
        for key in ("main", "mtp", "balance"):
            history[key].append(float(out[key]))
    seconds = time.perf_counter() - start
    evaluation = [trainer.losses(list(trainer.variables), _as_tensor(tokens))["main"].numpy()
                  for tokens in _held_out_batches(held_out)]
    return {"label": label, "history": history, "held_out_loss": float(np.mean(evaluation)),
            "seconds": round(seconds, 1), "trainer": trainer}


def _as_tensor(tokens):
    import tensorflow as tf

    return tf.constant(tokens, tf.int32)


def _held_out_batches(stream: np.ndarray, count: int = 4):
    return [stream[i * BATCH * LENGTH:(i + 1) * BATCH * LENGTH].reshape(BATCH, LENGTH) for i in range(count)]


def _tail(values: list[float], fraction: float = 0.2) -> float:
    return float(np.mean(values[-max(1, int(len(values) * fraction)):]))


def _spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "per seed": [float(v) for v in values]}


def balance(steps: int, seed: int = 0, alpha: float = 1e-2, gamma: float = 1e-2) -> dict:
    config = model_config()
    modes = (("no balancing", "none"), ("sequence-wise loss", "sequence-loss"), ("bias balancing", "bias"))
    runs = {}
    for name, mode in modes:
        settings = TrainSettings(total_steps=steps, balancing=mode, balance_alpha=alpha, bias_gamma=gamma)
        runs[name] = [train(config, settings, steps, seed, label=f"balance: {name}, seed {seed}")]
        runs[name] += [train(config, settings, steps, seed + offset, label=f"balance: {name}, seed {seed + offset}",
                             trainer=runs[name][0]["trainer"]) for offset in range(1, SEEDS)]
    summary = {name: {"MaxVio at step 1": _spread([r["history"]["max_violation"][0] for r in seeded]),
                      "MaxVio (last 20% of steps)": _spread([_tail(r["history"]["max_violation"]) for r in seeded]),
                      "held-out loss": _spread([r["held_out_loss"] for r in seeded]),
                      "seconds": sum(r["seconds"] for r in seeded)} for name, seeded in runs.items()}
    bias, none, aux = (summary[k] for k in ("bias balancing", "no balancing", "sequence-wise loss"))
    claim = {"bias MaxVio below no balancing's, every seed":
             all(b < n for b, n in zip(bias["MaxVio (last 20% of steps)"]["per seed"],
                                       none["MaxVio (last 20% of steps)"]["per seed"])),
             "bias MaxVio below the sequence-wise loss's, every seed":
             all(b < a for b, a in zip(bias["MaxVio (last 20% of steps)"]["per seed"],
                                       aux["MaxVio (last 20% of steps)"]["per seed"])),
             "bias held-out loss within 1% of the sequence-wise loss run's (mean over seeds)":
             bias["held-out loss"]["mean"] <= 1.01 * aux["held-out loss"]["mean"]}
    return {"summary": summary, "claims": claim, "seeds": [seed + offset for offset in range(SEEDS)],
            "alpha": alpha, "gamma": gamma, "curves": {n: seeded[0]["history"] for n, seeded in runs.items()}}


def fp8(steps: int, seed: int = 0) -> dict:
    config = model_config()
    runs = {name: train(config, TrainSettings(total_steps=steps, fp8=flag), steps, seed, label=f"fp8: {name}")
            for name, flag in (("bfloat16", False), ("fp8", True))}
    plain, low = runs["bfloat16"], runs["fp8"]
    gap = (low["held_out_loss"] - plain["held_out_loss"]) / plain["held_out_loss"]
    train_gap = (_tail(low["history"]["main"]) - _tail(plain["history"]["main"])) / _tail(plain["history"]["main"])
    summary = {name: {"held-out loss": r["held_out_loss"], "train loss (last 20%)": _tail(r["history"]["main"]),
                      "seconds": r["seconds"]} for name, r in runs.items()}
    return {"summary": summary, "relative gap (held-out)": gap, "relative gap (train, last 20%)": train_gap,
            "claims": {"relative loss gap under 0.25% (report)": abs(gap) < 0.0025},
            "curves": {n: r["history"] for n, r in runs.items()}}


def mtp(steps: int, seed: int = 0, continuation: int = 48) -> dict:
    """`continuation`: tokens each held-out prompt is continued by, speculatively and greedily."""
    from dsv3_conformance.impl.training import export

    from dsv3_conformance.backends import TF
    from dsv3_conformance.backends import greedy
    from dsv3_conformance.backends import speculative_generate

    runs = {name: train(model_config(depth), TrainSettings(total_steps=steps), steps, seed, label=f"mtp: {name}")
            for name, depth in (("without MTP", 0), ("with two MTP modules", 2))}
    trained = runs["with two MTP modules"]
    config = model_config(2)
    _, held_out = corpus()
    prompts = _held_out_batches(held_out, 1)[0][:4, :32]
    weights = export(trained["trainer"])
    summary = {name: {"held-out main loss": r["held_out_loss"], "train main loss (last 20%)":
                      _tail(r["history"]["main"]), "seconds": r["seconds"]} for name, r in runs.items()}
    exact, by_depth = True, {}
    for depth in (1, 2):
        # One sequence at a time: a batch shares one cache length, so it keeps only the drafts every sequence
        # accepts, which would measure the batch, not the modules.
        accepted, drafted, steps_taken, generated = np.zeros(depth), 0, 0, 0
        for prompt in prompts:
            tokens, stats = speculative_generate(TF.make_runner(config, weights), prompt[None], continuation, depth)
            exact &= bool(np.array_equal(tokens, greedy(TF.make_runner(config, weights), prompt[None], continuation)))
            accepted += np.array(stats.accepted_by_depth)
            drafted += stats.drafted // depth
            steps_taken, generated = steps_taken + stats.main_steps, generated + stats.generated
        by_depth[f"drafting {depth}"] = {"acceptance by depth": [float(a / drafted) for a in accepted],
                                         "main-model steps per token": steps_taken / generated}
    summary["with two MTP modules"].update({f"{k}: {m}": v for k, d in by_depth.items() for m, v in d.items()})
    return {"summary": summary, "speculative": by_depth,
            "claims": {"speculative decoding returns exactly the greedy tokens": exact},
            "curves": {n: r["history"] for n, r in runs.items()}}


def plot(name: str, result: dict, path: Path) -> Path:
    from dsv3_conformance.report.plots import plt

    curves = result["curves"]
    panels = ["main", "max_violation"] if name == "balance" else ["main"] + (["mtp"] if name == "mtp" else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, key in zip(axes[0], panels):
        for label, history in curves.items():
            values = np.array(history[key])
            if not values.any():
                continue
            smooth = np.convolve(values, np.ones(10) / 10, mode="valid") if len(values) > 10 else values
            axis.plot(smooth, label=label)
        axis.set(xlabel="step", ylabel={"main": "next-token loss", "max_violation": "MaxVio (worst layer)",
                                        "mtp": "MTP loss (lambda-weighted)"}[key], title=f"{name}: {key}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cores": os.cpu_count()}


def run(name: str, steps: int | None, out: Path, seed: int = 0, **knobs) -> dict:
    """One experiment; `knobs`: alpha and gamma for balance, continuation for mtp."""
    steps = steps or DEFAULT_STEPS[name]
    result = {"balance": balance, "fp8": fp8, "mtp": mtp}[name](steps, seed, **knobs)
    result.update(experiment=name, steps=steps, batch=BATCH, length=LENGTH, seed=seed,
                  data="Python standard library source, byte-level tokens", machine=_machine(),
                  date=datetime.now(timezone.utc).date().isoformat())
    out.mkdir(parents=True, exist_ok=True)
    plot(name, result, out / f"experiment-{name}.png")
    (out / f"experiment-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _experiment(args: argparse.Namespace) -> int:
    knobs = {k: v for k, v in (("alpha", args.alpha), ("gamma", args.gamma)) if v is not None}
    if knobs and args.name != "balance":
        raise BadInput("--alpha and --gamma apply to the balance experiment only")
    out = RESULTS_DIR if args.write else Path(args.out)
    result = run(args.name, args.steps, out, seed=args.seed, **knobs)
    print(f"wrote {out / f'experiment-{args.name}.json'} and .png", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2, default=float))
    return 0


def add_command(commands, integer) -> None:
    parser = commands.add_parser("experiment", help="train a small model to test a claim of the report")
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--steps", type=integer(1), help="training steps per run (default: "
                                                         + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--seed", type=integer(0), default=0, help="seed of the weights and batches (balance: the "
                                                                  f"first of {SEEDS})")
    parser.add_argument("--alpha", type=float, help="balance: the sequence-wise loss's alpha (default 1e-2)")
    parser.add_argument("--gamma", type=float, help="balance: the bias update speed gamma (default 1e-2)")
    parser.add_argument("--out", default="experiments", help="folder for the result's JSON and plot (default: "
                                                             "experiments)")
    parser.add_argument("--write", action="store_true", help="write into the project's recorded results "
                                                             "(benchmarks/results), which the report shows")
    parser.set_defaults(run=_experiment)
