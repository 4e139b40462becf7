"""Distribution strategies from a name, the way Model Garden's `distribute_utils` does.

Batch semantics everywhere in this project: the batch size a user configures is
the GLOBAL batch; each of N replicas sees global / N examples per step, and
the learning rate is the one for that global batch.

Multi-worker file layout: only the chief writes into the model directory
(checkpoints, summaries, results, exports). Every other worker writes what it
must (its BackupAndRestore state) to a private directory from `worker_dir`,
the way TF Model Garden and tf_keras' `distributed_file_utils` do.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
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
    collective_implementation: str = "auto",
) -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    Args:
      name: one of STRATEGIES. `mirrored` uses every local GPU, or, on a machine
        without GPUs, `num_replicas` logical CPU devices. `multi_worker` reads
        the cluster from the TF_CONFIG environment variable.
      num_replicas: for `mirrored` only: how many local devices to use.
      tpu_address: for `tpu`: the TPU name or grpc address ('' = local).
      collective_implementation: for `multi_worker`: "auto", "ring" (gRPC; what
        CPU-only clusters use) or "nccl" (GPUs).
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
        implementations = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }
        if collective_implementation not in implementations:
            raise ValueError(
                f"Unknown collective_implementation {collective_implementation!r}; "
                f"expected one of {sorted(implementations)}"
            )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementations[collective_implementation]
            )
        )
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True when `strategy` spans several worker processes (TF_CONFIG with >1 task).

    A MultiWorkerMirroredStrategy built without a cluster runs as one local
    worker and answers False. TensorFlow exposes this only privately; this is
    the one place that asks it.
    """
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()  # noqa: SLF001
    )


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


def worker_dir(path: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes files that the chief writes to `path`.

    The chief (and every single-worker run) gets `path` itself. Any other worker
    gets a private directory outside the model directory,
    ``<tmp>/dhm_workertemp/<hash of path>/<task_type>_<task_id>``, so workers never
    overwrite the chief's files or each other's.
    """
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(
        tempfile.gettempdir(), "dhm_workertemp", digest, f"{resolver.task_type}_{resolver.task_id}"
    )


def worker_backup_dir(backup_dir: str, strategy: tf.distribute.Strategy) -> str:
    """The BackupAndRestore directory of this worker; restores the CHIEF's backup.

    A non-chief worker writes its backups to `worker_dir(backup_dir)`, which is
    first replaced by a copy of the chief's backup files (if any): after a
    restart every worker restores the same epoch and weights, even on a machine
    whose temporary directory did not survive. (Needs the model directory on a
    file system all workers see, as multi-worker checkpointing always does.)
    """
    target = worker_dir(backup_dir, strategy)
    if target == backup_dir:
        return backup_dir
    if tf.io.gfile.exists(target):
        tf.io.gfile.rmtree(target)
    if tf.io.gfile.isdir(backup_dir):
        tf.io.gfile.makedirs(target)
        for name in tf.io.gfile.listdir(backup_dir):
            source = os.path.join(backup_dir, name)
            if not tf.io.gfile.isdir(source):
                tf.io.gfile.copy(source, os.path.join(target, name), overwrite=True)
    return target


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's auto-sharding across workers set to DATA.

    Under `multi_worker` tf.data's default (AUTO) shards by FILE and fails when
    a split has fewer files than there are workers (the quick-start splits are
    one file each). DATA sharding works for any file count: every worker reads
    the split and keeps its share of every global batch, which needs the same
    order on every worker (the training pipeline is seeded, so it is). Other
    strategies ignore the setting.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
