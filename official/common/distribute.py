"""Distribution strategies from a name, the way Model Garden's `distribute_utils` does.

Batch semantics everywhere in this project: the batch size a user configures is
the GLOBAL batch; each of N replicas sees global / N examples per step, and
the learning rate is the one for that global batch.
"""

from __future__ import annotations

import os
from typing import Optional

import gin
import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def _logical_cpus(count: int) -> list[str]:
    """Splits the CPU into `count` logical devices (multi-replica code without GPUs).

    Only possible before TensorFlow initialises its runtime; afterwards the
    existing split must already be large enough.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:  # runtime already initialised
        available = len(tf.config.list_logical_devices("CPU"))
        if available < count:
            raise ValueError(
                f"need {count} logical CPU devices but TensorFlow was initialised with "
                f"{available}; create the strategy before running any TensorFlow op"
            ) from None
    return [f"/cpu:{i}" for i in range(count)]


@gin.configurable(module="official")
def get_strategy(
    name: str = "default",
    num_replicas: Optional[int] = None,
    tpu_address: str = "",
) -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    Args:
      name: one of STRATEGIES. `mirrored` uses every local GPU, or, on a machine
        without GPUs, `num_replicas` logical CPU devices. `multi_worker` reads
        the cluster from the TF_CONFIG environment variable.
      num_replicas: for `mirrored` only: how many local devices to use.
      tpu_address: for `tpu`: the TPU name or grpc address ('' = local).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown distribution strategy {name!r}; expected one of {STRATEGIES}")
    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            devices = [f"/gpu:{i}" for i in range(num_replicas or len(gpus))]
        else:
            devices = _logical_cpus(num_replicas or 1)
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes checkpoints, summaries and exports.

    With a `chief` task in the cluster that task is the chief; otherwise worker 0.
    Single-machine strategies always are.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return True
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0
