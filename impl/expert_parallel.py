"""Expert parallelism on TensorFlow's own distributed runtime (DTensor): the routed experts sharded over N
devices, each token's routed copies dispatched to the devices holding their experts and combined back.

Layout. A one-dimensional DTensor mesh `ep` of N devices. Tokens are sharded over it (the batch of T tokens
is padded to N * T_l; device s holds tokens s*T_l ...), routed experts too: device d holds experts
d*E_l ... (d+1)*E_l - 1, E_l = E / N. The gate and the shared experts are replicated.

Dispatch, in global terms (the GShard formulation, every step a dense einsum so that DTensor shards it):
each source device s has J = T_l * k copies; copy j goes to device dest(j) = expert // E_l into the next
free slot of the (s, dest) buffer, whose capacity is C = J: enough for any routing (all copies to one
device), so no token is ever dropped. A one-hot mask M[s, j, d, c] places the copies into send[s, d, c, :]
(sharded on s); the all-to-all is a DTensor relayout of send to sharding on d, which DTensor lowers to its
all-to-all collective (`CollectiveAllToAllV2`) with DTENSOR_USE_ALL_TO_ALL_RELAYOUT=1, set here before
DTensor starts: a relayout between two sharded dimensions is exactly an all-to-all, and it is what DTensor
provides on CPUs, GPUs and multi-host meshes alike. Device d then runs each received row through the local
expert its one-hot names (every local expert computed, the others masked off), the results go back by the
inverse relayout, and each source combines its copies with the gating weights. Gradients flow through every
step (the relayout's gradient is the inverse relayout).

Node limit. With devices grouped into nodes (N / n_group devices per node, one expert group per node), each
token's copies reach at most `topk_group` nodes; `moe` asserts it on every dispatch.
"""

from __future__ import annotations

import os

os.environ.setdefault("DTENSOR_USE_ALL_TO_ALL_RELAYOUT", "1")  # before DTensor expands any relayout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

from dsv3_conformance.format.config import ModelConfig  # noqa: E402
from dsv3_conformance.format.numerics import Numerics  # noqa: E402
from dsv3_conformance.format.weights import FFNWeights, LinearWeight  # noqa: E402

from .fp8 import BLOCK, activation_scales, dequantize_weight, e4m3_grid, e4m3_values  # noqa: E402
from .layers import silu  # noqa: E402
from .moe import StackedMoE, route, shared_experts  # noqa: E402
from .trees import leaves, rebuild, structure_of  # noqa: E402

U = dtensor.UNSHARDED


class ExpertMesh:
    """N devices in a DTensor mesh named `ep`, and the layouts the expert-parallel layer uses."""

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self.size = len(self.devices)
        self.mesh = dtensor.create_mesh([("ep", self.size)], devices=self.devices)

    def sharded(self, rank: int, axis: int = 0) -> dtensor.Layout:
        return dtensor.Layout([("ep" if i == axis else U) for i in range(rank)], self.mesh)

    def replicated(self, rank: int) -> dtensor.Layout:
        return dtensor.Layout.replicated(self.mesh, rank)

    def put(self, tensor: tf.Tensor, axis: int | None = None) -> tf.Tensor:
        """A regular tensor as a DTensor: replicated, or sharded along `axis`."""
        tensor = tf.convert_to_tensor(tensor)
        replicated = dtensor.copy_to_mesh(tensor, self.replicated(tensor.shape.rank))
        return replicated if axis is None else dtensor.relayout(replicated, self.sharded(tensor.shape.rank, axis))

    def get(self, tensor: tf.Tensor) -> tf.Tensor:
        """A DTensor back as a regular tensor (gathered, then device 0's copy)."""
        return dtensor.unpack(dtensor.relayout(tensor, self.replicated(tensor.shape.rank)))[0]

    def node_of_rank(self, config: ModelConfig) -> int:
        """Devices per node: one expert group per node when N is a multiple of n_group, else one per device."""
        return self.size // config.n_expert_groups if self.size % config.n_expert_groups == 0 else 1


# fp8 expert weights cross the mesh as their bytes, since DTensor does not carry float8 tensors, and are decoded
# (impl.fp8.e4m3_values) on the device that holds them.
def e4m3_bytes(weight) -> np.ndarray:
    """An e4m3 tensor's bytes (uint8), read on the host (the model's routed expert stacks already are)."""
    return np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight).view(np.uint8)


def shard_experts(mesh: ExpertMesh, experts: FFNWeights, dtype: tf.DType) -> FFNWeights:
    """Stacked expert weights [E, out, in] (and block scales) as DTensors [N, E_l, ...] sharded on devices;
    fp8 weights as their bytes (uint8)."""
    def split(tensor):
        tensor = tf.convert_to_tensor(tensor)
        if tensor.shape[0] % mesh.size:
            raise ValueError(f"{tensor.shape[0]} experts cannot be split evenly over {mesh.size} devices")
        return mesh.put(tf.reshape(tensor, [mesh.size, -1, *tensor.shape[1:]]), axis=0)

    def shard(weight: LinearWeight) -> LinearWeight:
        if weight.scale_inv is None:
            return LinearWeight(split(tf.cast(weight.weight, dtype)))
        return LinearWeight(split(e4m3_bytes(weight.weight)), split(weight.scale_inv))
    return FFNWeights(shard(experts.gate_proj), shard(experts.up_proj), shard(experts.down_proj))


def dispatch_masks(experts: tf.Tensor, devices: int, per_device: int, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
    """For experts [S, T_l, k]: the placement mask [S, J, N, C] (copy j of source s into slot c of device d's
    buffer, C = J = T_l * k) and each copy's local expert as a one-hot [S, J, E_l]."""
    sources, tokens, k = experts.shape
    flat = tf.reshape(experts, [sources, tokens * k])
    to_device = tf.one_hot(flat // per_device, devices, dtype=dtype)  # [S, J, N]
    slot = tf.reduce_sum(tf.cumsum(to_device, axis=1, exclusive=True) * to_device, axis=-1)  # [S, J]
    position = tf.one_hot(tf.cast(slot, tf.int32), tokens * k, dtype=dtype)  # [S, J, C]
    mask = tf.expand_dims(to_device, -1) * tf.expand_dims(position, -2)  # [S, J, N, C]
    return mask, tf.one_hot(flat % per_device, per_device, dtype=dtype)


def _local_linear(rows: tf.Tensor, weight: LinearWeight, numerics: Numerics) -> tf.Tensor:
    """rows [S, N, C, in] through every local expert's weight [N, E_l, out, in] -> [S, N, C, E_l, out]."""
    if weight.scale_inv is None:
        return tf.einsum("sdcm,deom->sdceo", rows, tf.cast(weight.weight, rows.dtype))
    weight = LinearWeight(e4m3_values(weight.weight), weight.scale_inv)
    if numerics.gemm_impl != "fp8":
        return tf.einsum("sdcm,deom->sdceo", rows, dequantize_weight(weight.weight, weight.scale_inv, rows.dtype))
    # fp8 path: activations quantized per row and 128 channels, blockwise GEMM with float32 promotion per block.
    # (Broadcast axes by reshape: DTensor crashes on new-axis indexing of sharded tensors.)
    sources, devices, slots, width = rows.shape
    blocks = width // BLOCK
    scales = activation_scales(rows, numerics.scale_format("expert"))  # [S, N, C, blocks]
    grouped = tf.reshape(tf.cast(rows, tf.float32), [sources, devices, slots, blocks, BLOCK])
    q = e4m3_grid(grouped / tf.reshape(scales, [sources, devices, slots, blocks, 1]))
    _, local, out, _ = weight.weight.shape
    w = tf.reshape(weight.weight, [devices, local, out, blocks, BLOCK])
    partial = tf.einsum("sdcbk,deobk->sdceob", q, w)
    column_scale = tf.repeat(weight.scale_inv, BLOCK, axis=-2)[:, :, :out, :]  # [N, E_l, out, blocks]
    scaled = (partial * tf.reshape(scales, [sources, devices, slots, 1, 1, blocks])
              * tf.reshape(column_scale, [1, devices, 1, local, out, blocks]))
    return tf.cast(tf.reduce_sum(scaled, axis=-1), rows.dtype)


def expert_parallel_experts(mesh: ExpertMesh, x: tf.Tensor, gating: tf.Tensor, experts: tf.Tensor,
                            sharded: FFNWeights, numerics: Numerics) -> tf.Tensor:
    """sum over each token's chosen experts of gating * expert(x), dispatched and combined across the mesh.

    x [S, T_l, dim], gating [S, T_l, k] and experts [S, T_l, k] sharded on S (DTensors); `sharded` from
    `shard_experts`. Returns [S, T_l, dim] sharded on S.
    """
    sources, tokens, k = experts.shape
    per_device = sharded.gate_proj.weight.shape[1]
    mask, local = dispatch_masks(experts, mesh.size, per_device, x.dtype)
    copies = tf.repeat(x, k, axis=1)  # [S, J, dim]
    send = tf.einsum("sjdc,sjm->sdcm", mask, copies)
    send_local = tf.einsum("sjdc,sje->sdce", mask, local)
    # The all-to-all: from sharded by source to sharded by destination.
    received = dtensor.relayout(send, mesh.sharded(4, axis=1))
    received_local = dtensor.relayout(send_local, mesh.sharded(4, axis=1))
    hidden = silu(_local_linear(received, sharded.gate_proj, numerics)) * \
        _local_linear(received, sharded.up_proj, numerics)  # [S, N, C, E_l, inter]
    down = sharded.down_proj
    if down.scale_inv is None or numerics.gemm_impl != "fp8":
        weight = tf.cast(down.weight, x.dtype) if down.scale_inv is None else \
            dequantize_weight(down.weight, down.scale_inv, x.dtype)
        out = tf.einsum("sdcei,demi->sdcem", hidden, weight)
    else:  # each local expert's own rows through its own down projection
        out = tf.stack([_local_linear(hidden[:, :, :, e], LinearWeight(down.weight[:, e:e + 1],
                                                                        down.scale_inv[:, e:e + 1]), numerics)[:, :, :, 0]
                        for e in range(per_device)], axis=3)
    results = tf.einsum("sdcem,sdce->sdcm", out, received_local)
    # Back to the sources, then each copy weighted by its gate and summed per token.
    returned = dtensor.relayout(results, mesh.sharded(4, axis=0))
    per_copy = tf.einsum("sjdc,sdcm->sjm", mask, returned) * tf.reshape(tf.cast(gating, x.dtype), [sources, -1, 1])
    return tf.reduce_sum(tf.reshape(per_copy, [sources, tokens, k, -1]), axis=2)


def nodes_reached(experts: tf.Tensor, config: ModelConfig, devices: int, per_node: int) -> tf.Tensor:
    """Distinct nodes each token's copies reach, [..., tokens]."""
    per_device = config.n_routed_experts // devices
    nodes = experts // per_device // per_node
    return tf.reduce_sum(tf.cast(tf.reduce_any(tf.one_hot(nodes, devices // per_node, on_value=True,
                                                          off_value=False), axis=-2), tf.int32), axis=-1)


class ExpertParallelMoE:
    """The MoE block with its routed experts spread over a mesh; a drop-in for impl.moe.moe in the model."""

    def __init__(self, mesh: ExpertMesh, config: ModelConfig, numerics: Numerics):
        if config.n_routed_experts % mesh.size:
            raise ValueError(f"n_routed_experts={config.n_routed_experts} cannot be split over {mesh.size} devices")
        self.mesh, self.config, self.numerics = mesh, config, numerics
        self.per_node = mesh.node_of_rank(config)
        self._steps: dict = {}  # weight-tree structure -> its DTensor function

    def prepare(self, weights: StackedMoE, dtype: tf.DType) -> StackedMoE:
        """The block's weights on the mesh: the gate replicated, the routed experts sharded; the shared experts
        stay as they are (they run on the block's input, outside the mesh)."""
        if weights.slots is not None:
            raise ValueError("expert parallelism shards every routed expert: this block holds only some")

        def replicate(tensor):
            return None if tensor is None else self.mesh.put(tf.convert_to_tensor(tensor))
        gate = type(weights.gate)(replicate(weights.gate.weight), replicate(weights.gate.bias))
        return StackedMoE(gate, shard_experts(self.mesh, weights.experts, dtype), weights.shared)

    def _routed(self, x: tf.Tensor, tensors: list, structure) -> tuple[tf.Tensor, tf.Tensor]:
        """On the mesh: route the sharded tokens x [S, T_l, dim], assert the node limit, dispatch, combine."""
        gate, experts = rebuild(structure, iter(tensors))
        sources, tokens, dim = x.shape
        gating, chosen = route(tf.reshape(x, [sources * tokens, dim]), gate, self.config)
        chosen = tf.reshape(chosen, [sources, tokens, -1])
        reached = nodes_reached(chosen, self.config, self.mesh.size, self.per_node)
        check = tf.debugging.assert_less_equal(
            tf.reduce_max(reached), self.config.n_limited_groups,
            message=f"a token reached more than topk_group={self.config.n_limited_groups} nodes")
        with tf.control_dependencies([check]):
            routed = expert_parallel_experts(self.mesh, x, tf.reshape(gating, [sources, tokens, -1]), chosen,
                                             experts, self.numerics)
        return routed, chosen

    def __call__(self, x: tf.Tensor, weights: StackedMoE) -> tuple[tf.Tensor, tf.Tensor]:
        """x [T, dim] (a regular tensor) -> (output [T, dim], chosen experts [T, k]), like impl.moe.moe;
        `weights` from `prepare`."""
        tokens, dim = x.shape
        per_device = -(-tokens // self.mesh.size)
        padded = tf.pad(x, [[0, per_device * self.mesh.size - tokens], [0, 0]])
        sharded = self.mesh.put(tf.reshape(padded, [self.mesh.size, per_device, dim]), axis=0)
        tree = (weights.gate, weights.experts)
        structure = structure_of(tree)
        if structure not in self._steps:
            self._steps[structure] = tf.function(self._routed, autograph=False)
        out, chosen = self._steps[structure](sharded, leaves(tree), structure)
        routed = tf.reshape(self.mesh.get(out), [-1, dim])[:tokens]
        # The shared experts (replicated weights) on the block's input as it is.
        return (routed + shared_experts(x, weights.shared, self.numerics),
                tf.reshape(self.mesh.get(chosen), [-1, chosen.shape[-1]])[:tokens])

