"""The DHM training model: any multi-head functional network plus the DHM objective.

`DHMModel` wraps a functional Keras model whose outputs are a dict of logits
keyed ``b0`` (main branch), ``b1``, ``b2``, ... and supplies the custom
``train_step``/``test_step`` that apply per-head cross-entropy plus the
mimicking KL over the edges of a mimicking graph (all ordered pairs for DHM;
see `dhm_keras.losses` and `dhm_keras.mimicking_graph`). It works under any
`tf.distribute` strategy: the loss is a per-replica batch mean divided by the
number of replicas (what Keras 3's built-in losses do internally), so the
summed gradients do not depend on the replica count.

Mixed precision: the heads' logits are cast to float32 before any loss or
metric, so the cross-entropy and mimicking math never runs in float16/bfloat16.
Under ``mixed_float16`` Keras wraps the optimizer in a `LossScaleOptimizer`,
whose overflow test looks only at replica 0's gradients under
`tf.distribute` (docs/keras3-notes.md); `train_step` therefore all-reduces a
"some gradient is non-finite" count first and, if any replica overflowed,
makes every replica's gradients NaN, so that every replica (and every worker)
skips the step and halves the loss scale identically.

Bernoulli branch sampling (Appendix D) is a per-head weight vector held in a
non-trainable variable; `BernoulliBranchSampler` sets it at the start of each
epoch from ``(seed, epoch)`` alone, so the draw is reproducible and a resumed
run sees exactly the masks an uninterrupted one would.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from dhm_keras import heads as heads_lib
from dhm_keras import losses
from dhm_keras import mimicking_graph
from official.common import distribute
from official.core import base_task


# What a run of a DHMModel records and ranks: every head's accuracies (the
# metrics below are named top1/bK and top5/bK), "best" by the main head's top-1.
HEAD_ACCURACY = base_task.Scoring(result_metrics=("top1/", "top5/"), score_metrics=(f"top1/{heads_lib.MAIN}",))


def scale_loss_for_distribution(loss: tf.Tensor) -> tf.Tensor:
    """Divides a per-replica mean loss by the replica count.

    Gradients are summed across replicas when applied, so each replica must
    contribute loss / N. Keras 3 does this inside every built-in `Loss`
    (keras/src/losses/loss.py); a hand-written objective has to do it itself.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss * (1.0 / replicas)


def all_finite_across_replicas(gradients) -> tf.Tensor:
    """Scalar bool: every gradient on EVERY replica is finite.

    Each replica counts whether its own (un-reduced) gradients hold an inf or
    NaN; the counts are summed over all replicas (and workers), so every
    replica gets the same answer. Outside a multi-replica context it is the
    local test.
    """
    tensors = [g.values if isinstance(g, tf.IndexedSlices) else g for g in gradients if g is not None]
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in tensors]))
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    bad = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    return tf.equal(bad, 0.0)


def poison_unless(finite: tf.Tensor, gradients) -> list:
    """`gradients` unchanged where `finite`, else all NaN (so the step is skipped).

    Adding 0.0 leaves a finite gradient's value unchanged; adding NaN makes every
    replica's gradients non-finite, which `LossScaleOptimizer` turns into a
    skipped step and a halved scale whichever replica it looks at.
    """
    offset = tf.where(finite, 0.0, float("nan"))

    def poison(g):
        if g is None:
            return None
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values + tf.cast(offset, g.dtype), g.indices, g.dense_shape)
        return g + tf.cast(offset, g.dtype)

    return [poison(g) for g in gradients]


def sample_branch_mask(
    seed: int, epoch: int, branches: Sequence[str], probability: float
) -> dict[str, float]:
    """Independent Bernoulli(p) draw per auxiliary branch for one epoch.

    Depends only on (seed, epoch), so it is reproducible and resume-safe; the
    main branch is not drawn (it always takes part).
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    draws = rng.random(len(branches)) < probability
    return {branch: float(d) for branch, d in zip(branches, draws)}


def _reducible_logs(logs: dict) -> dict:
    """Scalar logs as shape [1] under multi-worker training, else unchanged.

    Keras 3.15 averages a step's logs over workers with
    `strategy.reduce("MEAN", value, axis=0)` (backend/tensorflow/trainer.py,
    `reduce_per_replica`), which rejects a scalar: "Invalid reduction dimension
    0 for input with 0 dimensions" (keras-team/keras#20585). A length-1 vector
    reduces to the same scalar mean over replicas.
    """
    if not distribute.is_multi_worker(tf.distribute.get_strategy()):
        return logs
    return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}


def _float32(logits: dict) -> dict:
    """Heads' logits in float32 (a no-op for the builder's float32 classifiers)."""
    return {h: tf.cast(z, tf.float32) for h, z in logits.items()}


class DHMModel(keras.Model):
    """Trains a multi-head network with the DHM (or DSL / baseline) objective.

    Args:
      network: functional model, outputs dict ``{"b0": logits, "b1": ..., ...}``.
      mode: "baseline" (CE of b0), "dsl" (CE of every head) or "dhm" (+ mimicking).
      temperature, alpha, epsilon: of the mimicking term (see `losses`).
      bernoulli_p: if set, auxiliary branches take part in mimicking with this
        probability per epoch (needs `BernoulliBranchSampler` in the callbacks).
      top_k: the k of the second accuracy metric (top-5 by default).
      graph: who mimics whom in "dhm" mode: a preset of
        `dhm_keras.mimicking_graph` or explicit (teacher, student[, weight])
        edges. Resolved once here; the loss and the logged `mimic/...`
        metrics use the same edges.
      cross_replica_finite_check: with a `LossScaleOptimizer` (mixed_float16)
        and several replicas, skip a step on every replica when ANY replica's
        gradients overflow (see module doc). Only a test turns it off.
    """

    def __init__(
        self,
        network: keras.Model,
        mode: str = "dhm",
        temperature: float = 1.0,
        alpha: float = 1.0,
        epsilon: float = 0.0,
        bernoulli_p: Optional[float] = None,
        top_k: int = 5,
        cross_replica_finite_check: bool = True,
        label_smoothing: float = 0.0,
        graph: mimicking_graph.GraphSpec = mimicking_graph.DEFAULT,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in losses.MODES:
            raise ValueError(f"Unknown mode {mode!r}; expected one of {losses.MODES}")
        if bernoulli_p is not None and not 0.0 <= bernoulli_p <= 1.0:
            raise ValueError(f"bernoulli_p must lie in [0, 1], got {bernoulli_p}")
        self.network = network
        self.mode = mode
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)
        self.bernoulli_p = bernoulli_p
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.cross_replica_finite_check = bool(cross_replica_finite_check)
        outputs = heads_lib.check_outputs(network.output, "network DHMModel wraps")
        self.heads = heads_lib.ordered(outputs)
        self.trained_heads = [heads_lib.MAIN] if mode == "baseline" else self.heads
        self.branches = heads_lib.branches(outputs)
        # The mimicking terms this model trains and logs (none outside "dhm").
        self.mimicking_edges = mimicking_graph.resolve(graph, self.heads) if mode == "dhm" else ()
        num_classes = int(outputs[heads_lib.MAIN].shape[-1])
        # Per-head participation in mimicking (1 = in); b0 stays 1.
        self.head_weights = self.add_weight(
            shape=(len(self.heads),), initializer="ones", trainable=False, name="head_weights"
        )
        self._trackers = {"loss": keras.metrics.Mean(name="loss")}
        for head in self.trained_heads:
            self._trackers[f"ce/{head}"] = keras.metrics.Mean(name=f"ce/{head}")
        for edge in self.mimicking_edges:
            name = f"mimic/{edge.name}"
            self._trackers[name] = keras.metrics.Mean(name=name)
        self._accuracies = {}
        for head in self.heads:
            self._accuracies[f"top1/{head}"] = keras.metrics.SparseCategoricalAccuracy(
                name=f"top1/{head}"
            )
            if num_classes > top_k:
                self._accuracies[f"top{top_k}/{head}"] = keras.metrics.SparseTopKCategoricalAccuracy(
                    k=top_k, name=f"top{top_k}/{head}"
                )
        # The wrapped functional network is already built, and so is every
        # variable of this wrapper: mark it so (BackupAndRestore requires it).
        self.built = True

    # -- Keras plumbing -------------------------------------------------------
    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' pre-fit build, made to work under MultiWorkerMirroredStrategy.

        Keras 3.15 (backend/tensorflow/trainer.py) takes the first distributed
        batch and passes the whole (images, labels) tuple to one
        `strategy.reduce("MEAN", ...)`: MirroredStrategy maps over the tuple,
        MultiWorkerMirroredStrategy does not and fails ("Attempt to convert a
        value (PerReplica...)"; keras-team/keras#20585). The build only needs
        shapes and dtypes, so this takes the first local replica's batch
        instead: the same shapes, and no collective op outside the step.
        """
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            strategy = self._distribute_strategy
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v,
                    batch,
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @property
    def metrics(self):
        return list(self._trackers.values()) + list(self._accuracies.values())

    def set_branch_mask(self, mask: dict[str, float]) -> None:
        """Sets which auxiliary heads take part in mimicking (b0 always does)."""
        unknown = set(mask) - set(self.branches)
        if unknown:
            raise ValueError(f"Unknown branches {sorted(unknown)}; model has {self.branches}")
        self.head_weights.assign(
            np.array([1.0 if h == heads_lib.MAIN else mask.get(h, 1.0) for h in self.heads], np.float32)
        )

    def branch_mask(self) -> dict[str, float]:
        values = keras.ops.convert_to_numpy(self.head_weights)
        return {h: float(v) for h, v in zip(self.heads, values) if h != heads_lib.MAIN}

    # -- the objective ----------------------------------------------------------
    def _objective(self, labels, logits, use_mask: bool):
        active = None
        if use_mask and self.bernoulli_p is not None:
            active = {h: self.head_weights[i] for i, h in enumerate(self.heads)}
        return losses.dhm_loss(
            labels,
            logits,
            mode=self.mode,
            temperature=self.temperature,
            alpha=self.alpha,
            active=active,
            epsilon=self.epsilon,
            label_smoothing=self.label_smoothing,
            graph=self.mimicking_edges,
        )

    def _update_metrics(self, labels, logits, total, ce, pairs):
        # Each loss is a mean over the batch: weighting it by the batch size
        # makes the epoch value a mean over examples, also when the last
        # evaluation batch is short.
        # (A replica given no examples contributes nothing, not its NaN mean.)
        examples = tf.cast(tf.shape(labels)[0], tf.float32)
        for name, value in [("loss", total), *(("ce/" + h, v) for h, v in ce.items()),
                            *(("mimic/" + p, v) for p, v in pairs.items())]:
            value = tf.where(examples > 0, value, tf.zeros_like(value))
            self._trackers[name].update_state(value, sample_weight=examples)
        for name, metric in self._accuracies.items():
            metric.update_state(labels, logits[name.split("/")[1]])
        logs = {name: m.result() for name, m in self._trackers.items()}
        logs.update({name: m.result() for name, m in self._accuracies.items()})
        return logs

    def _needs_finite_check(self) -> bool:
        """Decided while tracing: loss scaling is on and several replicas train."""
        return (
            self.cross_replica_finite_check
            and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
            and tf.distribute.get_strategy().num_replicas_in_sync > 1
        )

    def train_step(self, data):
        images, labels = data[0], data[1]
        with tf.GradientTape() as tape:
            logits = _float32(self.network(images, training=True))
            total, ce, pairs = self._objective(labels, logits, use_mask=True)
            scaled = self.optimizer.scale_loss(scale_loss_for_distribution(total))
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if self._needs_finite_check():
            gradients = poison_unless(all_finite_across_replicas(gradients), gradients)
        self.optimizer.apply(gradients, variables)
        logs = self._update_metrics(labels, logits, total, ce, pairs)
        if self.bernoulli_p is not None:  # this epoch's draw, for TensorBoard
            for i, head in enumerate(self.heads):
                if head != heads_lib.MAIN:
                    logs[f"active/{head}"] = self.head_weights[i]
        return _reducible_logs(logs)

    def test_step(self, data):
        images, labels = data[0], data[1]
        logits = _float32(self._inference_logits(images))
        total, ce, pairs = self._objective(labels, logits, use_mask=False)
        return _reducible_logs(self._update_metrics(labels, logits, total, ce, pairs))

    def _inference_logits(self, images):
        """The heads' logits, with an empty batch answered without the network.

        A replica gets an empty batch when the last evaluation batch has fewer
        examples than there are replicas. TensorFlow 2.21's oneDNN convolution
        (on by default on CPU) returns a wrongly shaped tensor for it and the
        next layer fails, so the network is skipped; the metrics ignore it.
        """
        outputs = self.network.output

        def empty():
            return {h: tf.zeros([0, t.shape[-1]], t.dtype) for h, t in outputs.items()}

        return tf.cond(
            tf.shape(images)[0] > 0, lambda: self.network(images, training=False), empty
        )

    def main_branch(self) -> keras.Model:
        """The deployable network: input -> b0 logits, sharing the trained layers."""
        return keras.Model(
            self.network.inputs, self.network.output[heads_lib.MAIN], name=heads_lib.MAIN
        )


class BernoulliBranchSampler(keras.callbacks.Callback):
    """Draws the per-epoch branch mask (Appendix D) at the start of every epoch."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        if model.bernoulli_p is None or not model.branches:
            return
        model.set_branch_mask(
            sample_branch_mask(self.seed, epoch, model.branches, model.bernoulli_p)
        )
