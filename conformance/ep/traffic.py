"""Dispatch traffic of expert parallelism: who sends how many token copies to whom, within and across nodes.

A routing (experts [T, k]) over R ranks in nodes of `per_node` ranks: rank r holds experts r*E_r ...
(E_r = E / R), token t lives on rank `source[t]`. A token goes once to each rank that holds one of its
experts (a rank with two of its experts receives it once, as DeepEP dispatches). Two schemes (report
section 3.2.2):
- direct: the source sends the token to every destination rank itself, across nodes where they are;
- two-hop: across nodes the token travels once per destination node, to the rank of that node with the
  source's local index (its peer over the inter-node link), which forwards it inside the node to each
  destination rank there; in the source's own node the source sends directly.

`plan` builds the messages one by one and counts them per rank; `formula` gives the same totals in closed
form from the sets of destination ranks D_t and nodes N_t of each token:
  direct inter-node = sum_t |{r in D_t : node(r) != node(src_t)}|, intra = sum_t |{r in D_t : node(r) ==
  node(src_t), r != src_t}|; two-hop inter-node = sum_t |N_t minus node(src_t)|, intra = sum_t (|{r in D_t:
  node(r) == node(src_t), r != src_t}| + sum over n in N_t minus node(src_t) of |D_t in n minus peer_n|).
Bytes are messages times hidden size times bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Topology:
    ranks: int
    per_node: int
    experts: int

    @property
    def experts_per_rank(self) -> int:
        return self.experts // self.ranks

    def node(self, rank):
        return np.asarray(rank) // self.per_node

    def peer(self, source: int, node: int) -> int:
        """The rank of `node` with the same local index as `source`."""
        return node * self.per_node + source % self.per_node


@dataclass
class Traffic:
    """Token messages per rank: sent and received, inside a node and across nodes."""

    ranks: int
    sent_intra: np.ndarray = field(default=None)
    sent_inter: np.ndarray = field(default=None)
    received_intra: np.ndarray = field(default=None)
    received_inter: np.ndarray = field(default=None)

    def __post_init__(self):
        for name in ("sent_intra", "sent_inter", "received_intra", "received_inter"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.ranks, np.int64))

    def send(self, source: int, target: int, inter: bool) -> None:
        if source == target:
            return
        (self.sent_inter if inter else self.sent_intra)[source] += 1
        (self.received_inter if inter else self.received_intra)[target] += 1

    @property
    def inter(self) -> int:
        return int(self.sent_inter.sum())

    @property
    def intra(self) -> int:
        return int(self.sent_intra.sum())


def destinations(experts: np.ndarray, topology: Topology) -> list[set[int]]:
    """D_t: the ranks holding at least one of each token's experts."""
    return [set((np.asarray(row) // topology.experts_per_rank).tolist()) for row in experts]


def plan(experts: np.ndarray, source: np.ndarray, topology: Topology, scheme: str) -> Traffic:
    """Every message of a dispatch, counted per rank (`scheme`: "direct" or "two-hop")."""
    traffic = Traffic(topology.ranks)
    for src, ranks in zip(source.tolist(), destinations(experts, topology)):
        own = int(topology.node(src))
        if scheme == "direct":
            for rank in ranks:
                traffic.send(src, rank, inter=int(topology.node(rank)) != own)
            continue
        for node in sorted({int(topology.node(rank)) for rank in ranks}):
            if node == own:
                for rank in ranks:
                    if int(topology.node(rank)) == own:
                        traffic.send(src, rank, inter=False)
                continue
            relay = topology.peer(src, node)
            traffic.send(src, relay, inter=True)
            for rank in ranks:
                if int(topology.node(rank)) == node:
                    traffic.send(relay, rank, inter=False)
    return traffic


def formula(experts: np.ndarray, source: np.ndarray, topology: Topology) -> dict[str, int]:
    """The totals of `plan` in closed form (module docstring), vectorized over tokens."""
    per_rank = topology.experts_per_rank
    tokens = len(experts)
    held = np.zeros((tokens, topology.ranks), bool)  # token t goes to rank r
    np.put_along_axis(held, np.asarray(experts) // per_rank, True, axis=1)
    node_of = topology.node(np.arange(topology.ranks))
    own_node = topology.node(source)
    same_node = node_of[None, :] == own_node[:, None]
    self_rank = np.arange(topology.ranks)[None, :] == np.asarray(source)[:, None]
    nodes_reached = np.zeros((tokens, topology.ranks // topology.per_node), bool)
    for node in range(nodes_reached.shape[1]):
        nodes_reached[:, node] = held[:, node_of == node].any(axis=1)
    other_nodes = nodes_reached.copy()
    other_nodes[np.arange(tokens), own_node] = False
    peers = (np.arange(nodes_reached.shape[1])[None, :] * topology.per_node
             + (np.asarray(source) % topology.per_node)[:, None])  # [T, nodes]
    peer_is_destination = np.take_along_axis(held, peers, axis=1) & other_nodes
    in_own_node = int((held & same_node & ~self_rank).sum())
    in_other_nodes = int((held & ~same_node).sum())
    return {"direct.inter": in_other_nodes, "direct.intra": in_own_node,
            "two-hop.inter": int(other_nodes.sum()),
            "two-hop.intra": in_own_node + in_other_nodes - int(peer_is_destination.sum())}


def nodes_per_token(experts: np.ndarray, topology: Topology) -> np.ndarray:
    """How many nodes each token's copies reach."""
    nodes = topology.node(np.asarray(experts) // topology.experts_per_rank)
    return np.array([len(set(row.tolist())) for row in nodes])
