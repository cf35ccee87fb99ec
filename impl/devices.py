"""Devices for the distributed parts (pipeline stages, expert parallelism): logical CPU devices when no other
devices are named, so that CI exercises the same placement code that GPUs or remote workers run."""

from __future__ import annotations

import functools

import tensorflow as tf


def logical_cpus(count: int) -> list[str]:
    """`count` logical CPU devices, configured before TensorFlow's runtime starts (listing logical devices would
    start it)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu) or []
    if len(configured) < count:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError as error:  # the runtime already started with fewer devices
            raise RuntimeError(f"{count} logical CPU devices are needed and TensorFlow's runtime already started: "
                               "configure them before any TensorFlow operation runs") from error
    return [device.name for device in tf.config.list_logical_devices("CPU")[:count]]


@functools.lru_cache(maxsize=None)
def expert_mesh(count: int):
    """One DTensor mesh of `count` logical CPU devices per process, shared by every expert-parallel model."""
    from .expert_parallel import ExpertMesh

    return ExpertMesh(logical_cpus(count))
