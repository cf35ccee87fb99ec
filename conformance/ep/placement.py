"""Redundant experts for inference balance (report section 3.4): duplicate the hottest experts and place the
replicas so that the most loaded device carries as little as possible.

Given a measured load per expert (tokens routed to it), R devices and S slots per device (E + extra
slots in all): first, one replica per expert; then each extra slot goes to the expert whose load per
replica is largest (its load is split evenly among its replicas); then replicas are placed largest first,
each on the least loaded device that still has a free slot and does not hold that expert yet. The baseline
is the plain layout: device d holds experts d*E/R ... (d+1)*E/R - 1, no replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    devices: list[list[int]]  # per device, the experts it holds a replica of
    load: np.ndarray  # per device, the tokens it computes

    @property
    def max_over_mean(self) -> float:
        return float(self.load.max() / self.load.mean()) if self.load.mean() else 1.0


def contiguous(expert_load: np.ndarray, devices: int) -> Placement:
    per = len(expert_load) // devices
    layout = [list(range(d * per, (d + 1) * per)) for d in range(devices)]
    return Placement(layout, np.array([expert_load[experts].sum() for experts in layout], np.float64))


def with_redundancy(expert_load: np.ndarray, devices: int, extra_per_device: int) -> Placement:
    experts = len(expert_load)
    if experts % devices:
        raise ValueError(f"{experts} experts do not split over {devices} devices")
    slots = experts // devices + extra_per_device
    replicas = np.ones(experts, np.int64)
    for _ in range(devices * extra_per_device):
        per_replica = np.where(replicas < devices, expert_load / replicas, -np.inf)  # at most one per device
        replicas[np.argmax(per_replica)] += 1
    share = expert_load / replicas
    pieces = sorted(((share[e], e) for e in range(experts) for _ in range(replicas[e])), reverse=True)
    layout: list[list[int]] = [[] for _ in range(devices)]
    load = np.zeros(devices, np.float64)
    for amount, expert in pieces:
        free = [d for d in range(devices) if len(layout[d]) < slots]
        target = min([d for d in free if expert not in layout[d]] or free, key=lambda d: (load[d], d))
        layout[target].append(expert)
        load[target] += amount
    return Placement(layout, load)
