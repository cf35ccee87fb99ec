"""Report figures (matplotlib, written as PNG): error per layer, errors against their tolerances, expert load."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from conformance.golden.cases import CaseResult

_LAYER = re.compile(r"^prefill\.layer\.(\d+)\.hidden$")


def error_per_layer(cases: list[CaseResult], path: Path) -> Path:
    """rel_err of each block's output against the golden: a colour per case, a line style per backend."""
    figure, axis = plt.subplots(figsize=(9, 4.5))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(dict.fromkeys(c.case for c in cases))}
    styles = {backend: style for backend, style in zip(dict.fromkeys(c.backend for c in cases), ("-", "--", ":"))}
    for case in cases:
        points = sorted((int(m[1]), r.rel_err) for r in case.results if (m := _LAYER.match(r.name)))
        if points:
            layers, errors = zip(*points)
            axis.plot(layers, np.maximum(errors, 1e-12), marker="o", color=colours[case.case],
                      linestyle=styles[case.backend], label=f"{case.case} ({case.backend})")
    for value in {r.tolerance for case in cases for r in case.results if _LAYER.match(r.name)}:
        axis.axhline(value, color="red", linestyle="--", linewidth=1)
    axis.set(yscale="log", xlabel="block", ylabel="rel_err of the block output",
             title="Golden cases: error per layer (red: tolerance)")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def error_against_tolerance(rows: list[dict], path: Path) -> Path:
    """Each comparison's rel_err / tolerance, grouped by component: below 1 passes."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        for comparison in row["comparisons"]:
            if comparison["tolerance"] > 0:
                groups.setdefault(row["component"], []).append(comparison["rel_err"] / comparison["tolerance"])
    figure, axis = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(groups), 1)))
    names = sorted(groups)
    for index, name in enumerate(names):
        values = np.maximum(np.array(groups[name]), 1e-8)
        jitter = np.random.default_rng(index).uniform(-0.18, 0.18, len(values))
        axis.scatter(values, index + jitter, s=6, alpha=0.5)
    axis.axvline(1.0, color="red", linestyle="--", linewidth=1)
    axis.set(xscale="log", yticks=range(len(names)), yticklabels=names, xlabel="rel_err / tolerance (fails above 1)",
             title="Every comparison of the suite against its tolerance")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def expert_load(loads: dict[str, np.ndarray], path: Path) -> Path:
    """Tokens routed to each expert per MoE layer (rows), one panel per run, with MaxVio per layer."""
    figure, axes = plt.subplots(len(loads), 1, figsize=(8, 1.0 + 1.4 * sum(len(v) for v in loads.values()) / 2),
                                squeeze=False)
    for axis, (label, counts) in zip(axes[:, 0], loads.items()):
        image = axis.imshow(counts, aspect="auto", cmap="viridis")
        mean = counts.mean(axis=1, keepdims=True)
        max_violation = (counts.max(axis=1) / mean[:, 0]) - 1
        axis.set(title=label, xlabel="expert", ylabel="MoE layer")
        axis.set_yticks(range(len(counts)), [f"{i} (MaxVio {v:.2f})" for i, v in enumerate(max_violation)],
                        fontsize=7)
        figure.colorbar(image, ax=axis, label="tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


_PIPELINE_COLOURS = {"F": "#4c72b0", "B": "#dd8452", "Bzb": "#f2b38a", "W": "#55a868", "FB": "#8172b3"}


def _label(op: list) -> tuple[str, str]:
    if op[0] == "FB":
        return "FB", f"{op[1][2]}|{op[2][2]}"
    if op[0] == "W":
        return "W", ""
    kind = "Bzb" if op[0] == "B" and op[3] else op[0]
    return kind, str(op[2])


def gantt(timelines: list, times, path: Path) -> Path:
    """One chart per pipeline schedule timeline (conformance/pipeline/simulator.py), simulated at `times`: a row
    per rank, a box per operation (micro-batch number inside)."""
    figure, axes = plt.subplots(len(timelines), 1, figsize=(13, 2.1 * len(timelines)), squeeze=False)
    for axis, timeline in zip(axes[:, 0], timelines):
        for interval in timeline.intervals:
            kind, text = _label(interval.op)
            axis.barh(interval.rank, interval.end - interval.start, left=interval.start, color=_PIPELINE_COLOURS[kind],
                      edgecolor="white", height=0.8)
            if text:
                axis.text((interval.start + interval.end) / 2, interval.rank, text, ha="center", va="center",
                          fontsize=6, color="white")
        axis.set_yticks(range(timeline.ranks), [f"rank {r}" for r in range(timeline.ranks)])
        axis.invert_yaxis()
        axis.set_title(f"{timeline.method}: step {timeline.step_time:g}, bubble "
                       f"{max(timeline.idle(r) for r in range(timeline.ranks)):g}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _PIPELINE_COLOURS.values()]
    axes[0, 0].legend(handles, ["forward", "backward", "backward (input grad, zero bubble)", "weight grad",
                                "overlapped F&B"], ncol=5, fontsize=7, loc="lower right", bbox_to_anchor=(1, 1.15))
    axes[-1, 0].set_xlabel(f"time (F={times.F:g}, B={times.B:g}, W={times.W:g}, F&B={times.FB:g})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
