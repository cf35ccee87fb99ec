"""Report figures (matplotlib, written as PNG): error per layer, errors against their tolerances, expert load."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dsv3_conformance.golden.cases import CaseResult

_LAYER = re.compile(r"^prefill\.layer\.(\d+)\.hidden$")


FLOOR = 1e-12  # where an exact match (rel_err 0) is drawn on a log axis


def error_per_layer(cases: list[CaseResult], path: Path) -> Path:
    """rel_err of each block's output against the golden: a panel per backend, one series per case (a colour and a
    marker of its own), each tolerance a labelled line, exact matches marked at the floor."""
    backends = list(dict.fromkeys(c.backend for c in cases)) or ["-"]
    names = list(dict.fromkeys(c.case for c in cases))
    markers = "osD^vP*X<>"
    look = {name: (plt.cm.tab20(i % 20), markers[i % len(markers)]) for i, name in enumerate(names)}
    figure, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends) + 2.5, 4.5), sharey=True,
                                squeeze=False)
    for axis, backend in zip(axes[0], backends):
        for case in (c for c in cases if c.backend == backend):
            points = sorted((int(m[1]), r.rel_err) for r in case.results if (m := _LAYER.match(r.name)))
            if not points:
                continue
            layers, errors = (np.array(v, dtype=float) for v in zip(*points))
            colour, marker = look[case.case]
            axis.plot(layers, np.maximum(errors, FLOOR), marker=marker, color=colour, label=case.case)
            exact = errors == 0
            if exact.any():
                axis.scatter(layers[exact], np.full(exact.sum(), FLOOR), marker="_", s=200, color="black", zorder=3)
        for value in sorted({r.tolerance for c in cases for r in c.results if _LAYER.match(r.name)}):
            axis.axhline(value, color="red", linestyle="--", linewidth=1)
            axis.annotate(f"tolerance {value:.0e}", (0, value), xycoords=("axes fraction", "data"), fontsize=7,
                          color="red", va="bottom")
        axis.set(yscale="log", xlabel="block", title=f"{backend}")
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel(f"rel_err of the block output (exact: drawn at {FLOOR:.0e})")
    handles = {label: handle for axis in axes[0] for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
    figure.suptitle("Golden cases: error per layer")
    figure.tight_layout(rect=(0, 0, 1 - 2.3 / (5.5 * len(backends) + 2.5), 1))
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
