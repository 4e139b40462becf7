"""Gradient consistency between each auxiliary head and the main head (Appendix C).

Supplement, Appendix C ("Implicit Penalty on Inconsistent Gradients"): the mimicking
loss implicitly penalises inconsistent gradients of the branches' objectives on the
parameters they share. The diagnostic measured here, on a fixed batch, for each
auxiliary head bK:

    cos_K = <g_K, g_0> / (|g_K| |g_0|),   g_h = d CE_h / d theta_shared

* ``CE_h`` is head h's own batch-mean softmax cross-entropy with the true labels, and
  NOTHING else: the mimicking terms are deliberately excluded. Appendix C's argument is
  that the mimicking term penalises inconsistency between these per-head objectives,
  so the quantity to watch is the consistency of the CE gradients themselves; adding
  the mimicking terms would measure (part of) the penalty instead of its effect, and
  DSL and baseline runs (which have no mimicking term) could not be compared with
  DHM on the same footing. The measure does not depend on the training mode.
* ``theta_shared`` are the trainable variables of the layers that BOTH heads' outputs
  depend on: the stem and the backbone stages up to the point where bK forks (for the
  builder's models exactly the ``stem_*`` / ``stage<i>_*`` layers with
  `builder.head_of_layer(name) == "b0"` that precede the fork; layers named ``bK_*`` or
  ``b0_*`` -- branch and head layers -- are never shared). They are found from the
  functional graph (the layers of ``keras.Model(inputs, outputs[h])`` for both heads),
  so any functional model with a dict of logits works.
* The forward pass runs with ``training=True`` by default (batch statistics in
  BatchNorm, dropout live: the gradients the optimizer actually sees); the network's
  non-trainable variables (BN moving statistics, RNG state) are restored afterwards so
  the measurement leaves no trace on training. ``training=False`` uses inference mode.
* Under a float16 policy the losses are multiplied by a constant 2**10 before
  differentiation against underflow; a cosine is invariant to that scale.
* A zero gradient (e.g. a head that does not reach the variables) gives NaN.

`GradientConsistency` is a Keras callback that measures every ``every_n_steps``
optimizer steps (and once before the first step of a fresh run), writes
``gradient_cosine/bK`` scalars to TensorBoard under ``log_dir`` at step = optimizer
iterations, and keeps ``history`` ([{"step": s, "b1": cos, ...}, ...]).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import keras
import tensorflow as tf

from dhm_keras import heads as heads_lib

MAIN_HEAD = heads_lib.MAIN
_FLOAT16_LOSS_SCALE = 2.0**10


def _outputs(network) -> dict:
    return heads_lib.check_outputs(network.output)


def auxiliary_heads(network) -> List[str]:
    """Output keys other than b0, in numeric order (b1, b2, ...)."""
    return heads_lib.branches(_outputs(network))


def _path_layers(network, head: str) -> list:
    """Layers that `head`'s output depends on (via a sub-model of the graph)."""
    outputs = _outputs(network)
    if head not in outputs:
        raise ValueError(f"network has no head {head!r}; heads: {sorted(outputs)}")
    return keras.Model(network.inputs, outputs[head]).layers


def shared_variables(network, head: str, main_head: str = MAIN_HEAD) -> List[tf.Variable]:
    """Trainable variables used by both `head` and `main_head`, in the network's order."""
    main_layers = {id(layer) for layer in _path_layers(network, main_head)}
    shared_layers = [l for l in _path_layers(network, head) if id(l) in main_layers]
    wanted = {id(v) for layer in shared_layers for v in layer.trainable_weights}
    seen, result = set(), []
    for variable in network.trainable_variables:
        if id(variable) in wanted and id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result


_find_shared_variables = shared_variables  # `gradient_cosine` has an argument of that name


def _cross_entropy(labels, logits) -> tf.Tensor:
    """Batch-mean sparse softmax cross-entropy in float32 (as `dhm_keras.losses`)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(tf.reshape(labels, [-1]), tf.int32),
            logits=tf.cast(logits, tf.float32),
        )
    )


def _loss_scale() -> float:
    return _FLOAT16_LOSS_SCALE if keras.mixed_precision.global_policy().compute_dtype == "float16" else 1.0


def _cosine(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
    """Cosine between two gradient lists taken as one flat vector each, in float64."""
    dot = tf.constant(0.0, tf.float64)
    na = tf.constant(0.0, tf.float64)
    nb = tf.constant(0.0, tf.float64)
    for x, y in zip(a, b):
        x = tf.cast(x, tf.float64)
        y = tf.cast(y, tf.float64)
        dot += tf.reduce_sum(x * y)
        na += tf.reduce_sum(x * x)
        nb += tf.reduce_sum(y * y)
    denominator = tf.sqrt(na) * tf.sqrt(nb)
    return tf.where(denominator > 0, dot / tf.where(denominator > 0, denominator, 1.0),
                    tf.constant(float("nan"), tf.float64))


def _head_cosines(network, images, labels, shared: Dict[str, List[tf.Variable]],
                  training: bool, main_head: str = MAIN_HEAD) -> Dict[str, tf.Tensor]:
    """One forward pass, then cos(g_head, g_main) on shared[head] for every head."""
    scale = _loss_scale()
    with tf.GradientTape(persistent=True) as tape:
        outputs = network(images, training=training)
        losses = {h: _cross_entropy(labels, outputs[h]) * scale for h in (main_head, *shared)}
    result = {}
    zero = tf.UnconnectedGradients.ZERO
    for head, variables in shared.items():
        g_main = tape.gradient(losses[main_head], variables, unconnected_gradients=zero)
        g_head = tape.gradient(losses[head], variables, unconnected_gradients=zero)
        result[head] = _cosine(g_head, g_main)
    del tape
    return result


class _StatePreserved:
    """Restores a network's non-trainable variables (BN statistics, RNG state) on exit."""

    def __init__(self, network, active: bool):
        self.variables = list(network.non_trainable_variables) if active else []

    def __enter__(self):
        self.saved = [v.numpy() for v in self.variables]
        return self

    def __exit__(self, *exc):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)
        return False


def gradient_cosine(model_network, images, labels, head: str,
                    shared_variables: Optional[Sequence[tf.Variable]] = None,
                    training: bool = True, main_head: str = MAIN_HEAD) -> float:
    """Cosine between d CE_head / d theta and d CE_b0 / d theta on one batch.

    Args:
      model_network: functional model with a dict of logits (``DHMModel.network``).
      images, labels: the batch (labels: integer class ids).
      head: auxiliary head, e.g. "b1".
      shared_variables: theta; default `shared_variables(model_network, head)`.
      training: forward pass in training mode (state restored afterwards).
      main_head: the head to compare against (b0).

    Returns:
      The cosine as a Python float in [-1, 1] (NaN if a gradient is zero).
    """
    variables = list(shared_variables) if shared_variables is not None else (
        _find_shared_variables(model_network, head, main_head)
    )
    if not variables:
        raise ValueError(f"{head} and {main_head} share no trainable variables")
    with _StatePreserved(model_network, training):
        values = _head_cosines(model_network, images, labels, {head: variables}, training, main_head)
    return float(values[head].numpy())


def _first_batch(batch):
    """(images, labels) from a tuple/list or the first element of a tf.data.Dataset."""
    if isinstance(batch, tf.data.Dataset):
        batch = next(iter(batch))
    if isinstance(batch, dict):
        raise ValueError("batch must be (images, labels), not a dict")
    images, labels = batch[0], batch[1]
    return tf.convert_to_tensor(images), tf.convert_to_tensor(labels)


class GradientConsistency(keras.callbacks.Callback):
    """Logs cos(grad CE_bK, grad CE_b0) on the shared backbone every N training steps.

    Args:
      batch: the fixed batch, ``(images, labels)`` (arrays or tensors) or a
        `tf.data.Dataset` whose first element is used.
      every_n_steps: measure when the optimizer's iteration count is a multiple of it
        (and at step 0 before training starts from scratch).
      log_dir: TensorBoard directory for ``gradient_cosine/bK`` scalars; None = no
        summaries, history only.
      heads: auxiliary heads to measure (default: all of the network's).
      training: forward pass in training mode (see the module docstring).

    Attributes:
      history: list of {"step": int, "b1": float, ...}, one per measurement.
    """

    def __init__(self, batch, every_n_steps: int = 100, log_dir: Optional[str] = None,
                 heads: Optional[Iterable[str]] = None, training: bool = True):
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.batch = batch
        self.every_n_steps = int(every_n_steps)
        self.log_dir = log_dir
        self.heads = list(heads) if heads is not None else None
        self.training = bool(training)
        self.history: List[dict] = []
        self._writer = None
        self._function = None
        self._last_step = None

    # -- setup -----------------------------------------------------------------
    def _network(self):
        return getattr(self.model, "network", self.model)

    def _setup(self):
        network = self._network()
        heads = self.heads if self.heads is not None else auxiliary_heads(network)
        self._shared = {h: shared_variables(network, h) for h in heads}
        empty = [h for h, v in self._shared.items() if not v]
        if empty:
            raise ValueError(f"heads {empty} share no trainable variables with {MAIN_HEAD}")
        self._images, self._labels = _first_batch(self.batch)
        shared, training = self._shared, self.training

        @tf.function(reduce_retracing=True)
        def measure(images, labels):
            return _head_cosines(network, images, labels, shared, training)

        self._function = measure
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    # -- measuring -------------------------------------------------------------
    def measure(self, step: Optional[int] = None) -> dict:
        """Measures now; records and logs at `step` (default: optimizer iterations)."""
        if self._function is None:
            self._setup()
        step = self._step() if step is None else int(step)
        if not self._shared:
            return {}
        with _StatePreserved(self._network(), self.training):
            values = self._function(self._images, self._labels)
        entry = {"step": step, **{h: float(v.numpy()) for h, v in values.items()}}
        self.history.append(entry)
        self._last_step = step
        if self._writer is not None:
            with self._writer.as_default():
                for head in self._shared:
                    value = entry[head]
                    tf.summary.scalar(f"gradient_cosine/{head}", value, step=step)
        return entry

    # -- Keras hooks -----------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._setup()
        if self._step() == 0:
            self.measure(0)

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step % self.every_n_steps == 0 and step != self._last_step:
            self.measure(step)

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


__all__ = [
    "GradientConsistency",
    "auxiliary_heads",
    "gradient_cosine",
    "shared_variables",
]
