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

import contextlib
import hashlib
import inspect
import os
import tempfile
from typing import Callable, Optional

import gin
import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
CLUSTER_RESOLVERS = ("tf_config", "slurm")

# SlurmClusterResolver hands each task GPU ids from a per-node pool and drops
# tasks for which the pool has no ids left. On CPU nodes there are no GPUs to
# hand out, so it is given a pool of this many placeholder ids, one per task,
# and told not to set CUDA_VISIBLE_DEVICES.
_CPU_TASK_SLOTS = 1 << 16


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


def resolve_cluster(kind: str = "tf_config", port_base: int = 8888) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster of a multi-worker run, as the cluster manager describes it.

    `tf_config`: the TF_CONFIG environment variable, which Kubernetes (the
    Kubeflow training operator's TFJob) and Vertex AI set on every replica.
    `slurm`: Slurm's job-step variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE), one task per worker;
    worker i is Slurm rank i and listens on `port_base` + its index on its
    node. GPUs come from SLURM_GPUS_ON_NODE (split evenly over the node's
    tasks through CUDA_VISIBLE_DEVICES); without it the tasks run on CPU.
    """
    if kind not in CLUSTER_RESOLVERS:
        raise ValueError(f"Unknown cluster_resolver {kind!r}; expected one of {CLUSTER_RESOLVERS}")
    if kind == "tf_config":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' with cluster_resolver 'tf_config' needs the "
                             "TF_CONFIG environment variable (or set get_strategy.cluster_resolver = 'slurm')")
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    missing = [v for v in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                           "SLURM_STEP_TASKS_PER_NODE") if v not in os.environ]
    if missing:
        raise ValueError(f"cluster_resolver 'slurm' needs Slurm's job-step variables; {', '.join(missing)} "
                         "unset: start the trainer with srun inside an sbatch/salloc allocation")
    gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0)
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base,
        gpus_per_node=gpus or _CPU_TASK_SLOTS,
        gpus_per_task=None if gpus else 1,
        auto_set_gpu=bool(gpus),
    )


@gin.configurable(module="official")
def get_strategy(
    name: str = "default",
    num_replicas: Optional[int] = None,
    tpu_address: str = "",
    collective_implementation: str = "auto",
    cluster_resolver: str = "tf_config",
    slurm_port_base: int = 8888,
    collective_timeout_s: Optional[float] = None,
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
      cluster_resolver: for `multi_worker`: where the cluster comes from,
        "tf_config" (TF_CONFIG: Kubernetes TFJob, Vertex AI, by hand) or
        "slurm" (see `resolve_cluster`).
      slurm_port_base: for "slurm": the first port of a node's workers.
      collective_timeout_s: for `multi_worker`: a collective (one gradient
        all-reduce) that has not completed after this many seconds fails, so
        a worker whose peer died stops with an error instead of waiting
        forever. None: no limit, and only TensorFlow's own peer health check
        (a probe every 30 s) notices a dead peer. It must exceed the longest
        time one worker can spend outside collectives while the others wait
        (the chief's checkpoint writes, startup skew between workers).
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
        resolver = resolve_cluster(cluster_resolver, slurm_port_base)
        if collective_timeout_s is not None and collective_timeout_s <= 0:
            raise ValueError(f"get_strategy.collective_timeout_s must be positive or None, got {collective_timeout_s}")
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
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementations[collective_implementation],
                timeout_seconds=collective_timeout_s,
            ),
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
    ``<tmp>/workertemp/<hash of path>/<task_type>_<task_id>``, so workers never
    overwrite the chief's files or each other's.
    """
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(
        tempfile.gettempdir(), "workertemp", digest, f"{resolver.task_type}_{resolver.task_id}"
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


# What a collective raises when a peer is gone: the health check's abort
# (Unavailable), the collective timeout (DeadlineExceeded), a peer that
# restarted (FailedPrecondition), or ops cancelled by either.
_PEER_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.FailedPreconditionError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


def _cause(message: str) -> str:
    """The informative part of a TF graph-execution error: the text after the
    "Detected at node ..." traceback block, on one line, at most 240 chars."""
    lines = message.splitlines()
    block = [i for i, line in enumerate(lines) if line.startswith(("Detected at node", "  File ", "    "))]
    rest = [line.strip() for line in lines[block[-1] + 1:] if line.strip()] if block else lines
    return " ".join(" ".join(rest).split())[:240]


@contextlib.contextmanager
def lost_workers_raise(strategy: tf.distribute.Strategy, error_type: Callable[[str], Exception] = RuntimeError):
    """Under several workers, a collective that fails because a peer is gone
    becomes one `error_type` with a one-line message saying what to do.

    TensorFlow reports a dead peer as an OpError with pages of traceback and
    a message about collective keys; the user needs to know that a worker is
    lost and that re-running every worker resumes. Other strategies and
    other errors pass through unchanged.
    """
    if not is_multi_worker(strategy):
        yield
        return
    try:
        yield
    except _PEER_FAILURES as e:
        options = getattr(strategy.extended, "_communication_options", None)
        timeout = getattr(options, "timeout_seconds", None)
        limit = f"collective timeout {timeout:g} s" if timeout else "no collective timeout set"
        detail = _cause(str(e.message or e))
        raise error_type(
            f"lost contact with another worker of this {strategy.num_replicas_in_sync}-replica run "
            f"({type(e).__name__}, {limit}: {detail}); start every worker again with the same command: "
            "the run resumes from its last finished epoch"
        ) from e


def accepts_input_context(build_train_inputs: Callable) -> bool:
    """True when a task's `build_train_inputs` takes `input_context` (tasks
    written before it existed do not, and keep DATA sharding)."""
    try:
        parameters = inspect.signature(build_train_inputs).parameters
    except (TypeError, ValueError):
        return False
    return "input_context" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def train_inputs(strategy: tf.distribute.Strategy, build_train_inputs: Callable, first_epoch: int):
    """The training stream `fit` reads, built the way the strategy scales.

    Across several workers, each worker builds its own pipeline through
    `distribute_datasets_from_function`, which passes it a
    `tf.distribute.InputContext` (worker index, worker count, per-replica
    batch): a task that takes `input_context` reads only its share of the
    data, so decoding work per worker falls as 1/N. Every other case, a task
    without that argument included, gets the one dataset of
    `build_train_inputs(first_epoch)` with DATA sharding (`shard_by_data`),
    which is what single-machine strategies ignore.
    """
    if is_multi_worker(strategy) and accepts_input_context(build_train_inputs):
        return strategy.distribute_datasets_from_function(
            lambda context: build_train_inputs(first_epoch, input_context=context)
        )
    if is_multi_worker(strategy):
        logging.warning("the task's build_train_inputs takes no input_context: every worker reads the "
                     "whole training split (DATA sharding)")
    return shard_by_data(build_train_inputs(first_epoch))


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's auto-sharding across workers set to DATA.

    Under `multi_worker` tf.data's default (AUTO) shards by FILE and fails when
    a split has fewer files than there are workers (the quick-start splits are
    one file each). DATA sharding works for any file count: every worker reads
    the split and keeps its share of every global batch, which needs the same
    order on every worker (the training pipeline is seeded, so it is). Other
    strategies ignore the setting. Evaluation uses it (each example lands in
    exactly one worker's share, so metrics are exact); training under
    several workers reads by file instead where it can (`train_inputs`).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
