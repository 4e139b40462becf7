"""DHM losses as pure functions of head logits.

Nothing here knows about models or data: every function takes logits (a dict
keyed by head name, ``b0`` the main branch) and returns per-example or scalar
float32 tensors. The training step is the only place that combines these with a
model, a strategy and an optimizer.

The mimicking term:

    M(h <- g) = T^2 * mean_batch KL(stopgrad(p_g^T) || p_h^T),   p^T = softmax(z / T)

summed over the edges g -> h of the mimicking graph (`dhm_keras.mimicking_graph`;
DHM: every ordered pair h != g) whose heads are *active*, each times its edge
weight, and the sum weighted by alpha.
It is computed in float32 log space (exact KL). ``epsilon > 0`` reproduces the
reference implementation's smoothing p <- (p + eps) / (1 + C * eps).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import tensorflow as tf

from dhm_keras import heads as heads_lib
from dhm_keras import mimicking_graph

MODES = ("baseline", "dsl", "dhm")

# `active` may name the heads taking part, or weight them (1.0 = in, 0.0 = out).
# Weights let the Bernoulli mask live in a variable and change per epoch
# without retracing the training function.
Active = Optional[Union[Sequence[str], Mapping[str, Union[float, tf.Tensor]]]]


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Per-example sparse softmax cross-entropy in float32.

    With `label_smoothing` s the target is (1 - s) * one_hot + s / C (the
    PyTorch `CrossEntropyLoss(label_smoothing=s)` convention), i.e.
    (1 - s) * CE + s * mean over classes of -log p. Off (0) in every
    reference recipe; an option for ImageNet-style training.
    """
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if not label_smoothing:
        return nll
    uniform = -tf.reduce_mean(tf.nn.log_softmax(logits, axis=-1), axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def _log_probs(logits: tf.Tensor, temperature: float, epsilon: float) -> tf.Tensor:
    scaled = tf.cast(logits, tf.float32) / temperature
    if not epsilon:
        return tf.nn.log_softmax(scaled, axis=-1)
    num_classes = tf.cast(tf.shape(scaled)[-1], tf.float32)
    probs = tf.nn.softmax(scaled, axis=-1)
    return tf.math.log((probs + epsilon) / (1.0 + num_classes * epsilon))


def kl_per_example(
    teacher_logits: tf.Tensor,
    student_logits: tf.Tensor,
    temperature: float = 1.0,
    epsilon: float = 0.0,
) -> tf.Tensor:
    """T^2 * KL(stopgrad(p_teacher^T) || p_student^T) per example, float32.

    The teacher is wrapped in ``stop_gradient``: a head receives gradient only
    in its student role, as in the reference implementation.
    """
    teacher_log_p = tf.stop_gradient(_log_probs(teacher_logits, temperature, epsilon))
    student_log_p = _log_probs(student_logits, temperature, epsilon)
    kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return (temperature**2) * kl


def _head_weights(heads: Sequence[str], active: Active) -> dict[str, tf.Tensor]:
    if active is None:
        return {h: tf.constant(1.0) for h in heads}
    if isinstance(active, Mapping):
        unknown = set(active) - set(heads)
        if unknown:
            raise ValueError(f"`active` names unknown heads {sorted(unknown)}; heads are {list(heads)}")
        return {h: tf.cast(active.get(h, 1.0), tf.float32) for h in heads}
    active = list(active)
    unknown = set(active) - set(heads)
    if unknown:
        raise ValueError(f"`active` names unknown heads {sorted(unknown)}; heads are {list(heads)}")
    return {h: tf.constant(1.0 if h in active else 0.0) for h in heads}


def pairwise_mimicking(
    logits: Mapping[str, tf.Tensor],
    temperature: float = 1.0,
    active: Active = None,
    epsilon: float = 0.0,
    graph: mimicking_graph.GraphSpec = mimicking_graph.DEFAULT,
) -> dict[str, tf.Tensor]:
    """Batch-mean mimicking term of every edge of `graph`, keyed ``teacher->student``.

    Each term is multiplied by its edge weight; inactive heads (weight 0)
    contribute exactly zero to every term they are in. The values are not
    multiplied by alpha.
    """
    weights = _head_weights(heads_lib.ordered(logits), active)
    terms = {}
    for edge in mimicking_graph.resolve(graph, logits):
        kl = kl_per_example(logits[edge.teacher], logits[edge.student], temperature, epsilon)
        terms[edge.name] = (
            edge.weight * weights[edge.teacher] * weights[edge.student] * tf.reduce_mean(kl)
        )
    return terms


def mimicking_loss(
    logits: Mapping[str, tf.Tensor],
    temperature: float = 1.0,
    alpha: float = 1.0,
    active: Active = None,
    epsilon: float = 0.0,
    return_pairs: bool = False,
    graph: mimicking_graph.GraphSpec = mimicking_graph.DEFAULT,
):
    """alpha * sum over the graph's edges between active heads of M(student <- teacher).

    Args:
      logits: dict head name -> [batch, classes] logits (any number of heads).
      temperature: softmax temperature T; the term is multiplied by T^2.
      alpha: weight of the whole mimicking term.
      active: heads taking part (names, or a name -> 0/1 weight mapping); None = all.
      epsilon: reference-style probability smoothing; 0 gives the exact KL.
      return_pairs: also return the per-pair dict (unweighted by alpha).
      graph: which pairs mimic (a preset name or explicit edges, see
        `dhm_keras.mimicking_graph`); default every ordered pair.

    Returns:
      The scalar float32 term, or ``(term, pairs)`` when ``return_pairs``.
    """
    pairs = pairwise_mimicking(logits, temperature, active, epsilon, graph)
    total = alpha * tf.add_n(list(pairs.values())) if pairs else tf.constant(0.0)
    return (total, pairs) if return_pairs else total


def dhm_loss(
    labels: tf.Tensor,
    logits: Mapping[str, tf.Tensor],
    mode: str = "dhm",
    temperature: float = 1.0,
    alpha: float = 1.0,
    active: Active = None,
    epsilon: float = 0.0,
    label_smoothing: float = 0.0,
    graph: mimicking_graph.GraphSpec = mimicking_graph.DEFAULT,
):
    """The training objective of one mode, as (total, per-head CE, per-pair mimic).

    baseline: CE of b0 only (other heads, if present, are ignored);
    dsl:      sum of every head's CE;
    dhm:      dsl + alpha * mimicking term over the edges of `graph`.
    All values are batch means in float32, not scaled for distribution.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}")
    heads = heads_lib.ordered(logits) if mode != "baseline" else [heads_lib.MAIN]
    ce = {h: tf.reduce_mean(cross_entropy(labels, logits[h], label_smoothing)) for h in heads}
    total = tf.add_n(list(ce.values()))
    pairs = {}
    if mode == "dhm":
        mimic, pairs = mimicking_loss(
            {h: logits[h] for h in heads}, temperature, alpha, active, epsilon,
            return_pairs=True, graph=graph,
        )
        total = total + mimic
    return total, ce, pairs
