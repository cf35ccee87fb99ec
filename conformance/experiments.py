"""The report's training claims, each reproduced by one command at a small scale (report sections 2.1.2, 2.2,
3.3): `dsv3-conformance experiment balance|fp8|mtp [--steps N]`.

Data: byte-level tokens (vocabulary 256) of the Python standard library's own source files, which exist on
every machine with Python: the files in name order, concatenated, split into a training stream and a
held-out stream (the last 10%). Batches are random windows of the training stream (seeded).

- balance: the same small MoE model from the same seed trained three ways: no balancing, the sequence-wise
  loss only (alpha 1e-2), and bias balancing only (gamma 1e-2): both raised from the report's 1e-4 and 1e-3,
  which act over trillions of tokens, so that they act within a few hundred steps. MaxVio per step (the
  worst MoE layer) and the loss.
- fp8: the same model, seed and batches in bfloat16 and with every linear GEMM in fp8; the relative gap of
  the final losses (the report: under 0.25%).
- mtp: without and with one MTP module; the main loss of each on held-out text, and the trained module's
  draft acceptance in greedy speculative decoding on held-out prompts.
Results go to benchmarks/results/experiment-<name>.json and .png; the report shows them.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .format.config import ModelConfig, tiny
from .format.training import TrainSettings

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
EXPERIMENTS = ("balance", "fp8", "mtp")
BATCH, LENGTH, CORPUS_BYTES = 8, 128, 4 << 20
DEFAULT_STEPS = {"balance": 300, "fp8": 400, "mtp": 300}


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
    from .checks.strategies import build_weights

    return build_weights(config, seed=seed, bias_mean=0.0)


def train(config: ModelConfig, settings: TrainSettings, steps: int, seed: int = 0, label: str = "") -> dict:
    """Train from seed; per step the losses and MaxVio (worst MoE layer); the final held-out loss."""
    from impl.training import Trainer
    from reference.training import max_violation

    train_stream, held_out = corpus()
    trainer = Trainer(config, _weights(config, seed), settings)
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


def balance(steps: int) -> dict:
    config = model_config()
    runs = {name: train(config, TrainSettings(total_steps=steps, balancing=mode, balance_alpha=1e-2,
                                              bias_gamma=1e-2), steps, label=f"balance: {name}")
            for name, mode in (("no balancing", "none"), ("sequence-wise loss", "sequence-loss"),
                               ("bias balancing", "bias"))}
    summary = {name: {"MaxVio (last 20% of steps)": _tail(r["history"]["max_violation"]),
                      "train loss (last 20%)": _tail(r["history"]["main"]), "held-out loss": r["held_out_loss"],
                      "seconds": r["seconds"]} for name, r in runs.items()}
    bias, none, aux = (summary[k] for k in ("bias balancing", "no balancing", "sequence-wise loss"))
    claim = {"bias MaxVio clearly below no balancing (< 0.7x)":
             bias["MaxVio (last 20% of steps)"] < 0.7 * none["MaxVio (last 20% of steps)"],
             "bias held-out loss not worse than the sequence-wise loss run (within 1%)":
             bias["held-out loss"] <= 1.01 * aux["held-out loss"]}
    return {"summary": summary, "claims": claim, "curves": {n: r["history"] for n, r in runs.items()}}


def fp8(steps: int) -> dict:
    config = model_config()
    runs = {name: train(config, TrainSettings(total_steps=steps, fp8=flag), steps, label=f"fp8: {name}")
            for name, flag in (("bfloat16", False), ("fp8", True))}
    plain, low = runs["bfloat16"], runs["fp8"]
    gap = (low["held_out_loss"] - plain["held_out_loss"]) / plain["held_out_loss"]
    train_gap = (_tail(low["history"]["main"]) - _tail(plain["history"]["main"])) / _tail(plain["history"]["main"])
    summary = {name: {"held-out loss": r["held_out_loss"], "train loss (last 20%)": _tail(r["history"]["main"]),
                      "seconds": r["seconds"]} for name, r in runs.items()}
    return {"summary": summary, "relative gap (held-out)": gap, "relative gap (train, last 20%)": train_gap,
            "claims": {"relative loss gap under 0.25% (report)": abs(gap) < 0.0025},
            "curves": {n: r["history"] for n, r in runs.items()}}


def mtp(steps: int) -> dict:
    from impl.training import export

    from .backends import TF
    from .speculative import SpeculativeStats, speculative_generate

    runs = {name: train(model_config(depth), TrainSettings(total_steps=steps), steps, label=f"mtp: {name}")
            for name, depth in (("without MTP", 0), ("with one MTP module", 1))}
    trained = runs["with one MTP module"]
    config = model_config(1)
    _, held_out = corpus()
    prompts = _held_out_batches(held_out, 1)[0][:4, :32]
    weights = export(trained["trainer"])
    # One sequence at a time: a batch shares one cache length, so it keeps only the drafts every sequence
    # accepts, which would measure the batch, not the module.
    runs_per_prompt = [speculative_generate(TF.make_runner(config, weights), prompt[None], 48, 1)[1]
                       for prompt in prompts]
    stats = SpeculativeStats(sum(s.generated for s in runs_per_prompt), sum(s.main_steps for s in runs_per_prompt),
                             sum(s.drafted for s in runs_per_prompt), sum(s.accepted for s in runs_per_prompt))
    summary = {name: {"held-out main loss": r["held_out_loss"], "train main loss (last 20%)":
                      _tail(r["history"]["main"]), "seconds": r["seconds"]} for name, r in runs.items()}
    summary["with one MTP module"]["draft acceptance"] = stats.acceptance
    summary["with one MTP module"]["main-model steps per token"] = stats.steps_per_token
    return {"summary": summary, "acceptance": stats.acceptance, "steps per token": stats.steps_per_token,
            "claims": {}, "curves": {n: r["history"] for n, r in runs.items()}}


def plot(name: str, result: dict, path: Path) -> Path:
    from .plots import plt

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


def run(name: str, steps: int | None = None, out: Path = RESULTS) -> dict:
    steps = steps or DEFAULT_STEPS[name]
    result = {"balance": balance, "fp8": fp8, "mtp": mtp}[name](steps)
    result.update(experiment=name, steps=steps, batch=BATCH, length=LENGTH, data="Python standard library source, "
                  "byte-level tokens")
    out.mkdir(parents=True, exist_ok=True)
    plot(name, result, out / f"experiment-{name}.png")
    (out / f"experiment-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report_section(golden_dir, backends: list[str], out: Path):
    """The last results of each experiment (benchmarks/results), with their plots."""
    import shutil

    from .report import Section

    rows, figures = [], {}
    for name in EXPERIMENTS:
        path = RESULTS / f"experiment-{name}.json"
        if not path.is_file():
            rows.append({"experiment": name, "status": f"not run: dsv3-conformance experiment {name}"})
            continue
        result = json.loads(path.read_text())
        for run_name, numbers in result["summary"].items():
            rows.append({"experiment": f"{name} ({result['steps']} steps)", "run": run_name,
                         **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in numbers.items()}})
        for claim, held in result["claims"].items():
            rows.append({"experiment": name, "run": f"claim: {claim}", "status": "holds" if held else "does not hold"})
        figure = out / f"experiment-{name}.png"
        shutil.copyfile(RESULTS / f"experiment-{name}.png", figure)
        figures[f"Training experiment: {name}"] = figure
    intro = ("The report's training claims at a small scale (conformance/experiments.py; data: the Python standard "
             "library's source as bytes). Claims are reported as measured, whichever way they go.")
    return Section("Training experiments", intro, rows, figures)


def _experiment(args: argparse.Namespace) -> int:
    result = run(args.name, args.steps)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2, default=float))
    return 0


def add_command(commands, integer) -> None:
    parser = commands.add_parser("experiment", help="train a small model to test a claim of the report "
                                                    "(results and plot into benchmarks/results)")
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--steps", type=integer(1), help="training steps per run (default: "
                                                         + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.set_defaults(run=_experiment)
