"""Training epochs as a function of (seed, epoch): the order and the augmentation keys.

A resumed run must read what an uninterrupted run would have read. tf.data's
`shuffle(reshuffle_each_iteration=True)` and `Dataset.random` advance with
every iterator opened on the dataset object, so a new process (a resume)
starts their streams again from "epoch 0", and Keras opens iterators at
moments of its own. Here nothing carries state from one epoch to the next:

* the order of epoch e is a permutation drawn statelessly from (seed, e),
  applied to consecutive windows of `window` examples (the whole split when
  it fits in memory, so a true uniform permutation; a bounded window on
  large splits, like a shuffle buffer);
* the augmentation key of the i-th example of epoch e is drawn statelessly
  from (seed, e, i).

`stream` chains the epochs from any first epoch on, each cut into its whole
batches, so `fit(steps_per_epoch=...)` reads epoch e exactly in its e-th
epoch, however it was started.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

_ORDER, _KEYS = 1, 2  # which stream of randomness a seed serves


def seed_pair(seed: int, epoch: tf.Tensor, purpose: int) -> tf.Tensor:
    """The int64 [2] stateless seed of one purpose in one epoch."""
    epoch = tf.cast(epoch, tf.int64)
    return tf.stack([tf.constant(int(seed), tf.int64), epoch * 8 + purpose])


def shuffled(
    examples: tf.data.Dataset, seed: int, epoch: tf.Tensor, window: int, count: int = -1
) -> tf.data.Dataset:
    """`examples` in the order of (seed, epoch): each window of `window`
    consecutive examples permuted by a stateless draw. `count`, the number of
    examples when known, keeps the dataset's length known (`len`, Keras)."""
    for spec in tf.nest.flatten(examples.element_spec):
        if spec.dtype != tf.string and not spec.shape.is_fully_defined():
            raise ValueError(
                f"an epoch's permutation batches examples, so they need one shape; got {spec.shape} "
                "(resize images before caching them)"
            )
    base = seed_pair(seed, epoch, _ORDER)

    def permute(w, block):
        size = tf.shape(tf.nest.flatten(block)[0])[0]
        keys = tf.random.stateless_uniform([size], seed=tf.random.experimental.stateless_fold_in(base, w))
        order = tf.argsort(keys)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), block)

    # prefetch(1): the next window is gathered while this one is consumed.
    ds = examples.batch(max(1, int(window))).enumerate().map(permute).prefetch(1).unbatch()
    return ds.apply(tf.data.experimental.assert_cardinality(count)) if count >= 0 else ds


def with_keys(examples: tf.data.Dataset, seed: int, epoch: tf.Tensor) -> tf.data.Dataset:
    """(example, key): a scalar int64 augmentation key per example, from (seed, epoch, position)."""
    base = seed_pair(seed, epoch, _KEYS)

    def key(i):
        return tf.random.stateless_uniform(
            [], seed=tf.random.experimental.stateless_fold_in(base, i), minval=None, maxval=None, dtype=tf.int64
        )

    return examples.enumerate().map(lambda i, example: (example, key(i)))


def stream(one_epoch: Callable[[tf.Tensor], tf.data.Dataset], first_epoch: int = 0) -> tf.data.Dataset:
    """Epochs `first_epoch`, `first_epoch + 1`, ... of `one_epoch(epoch)` (an
    int64 scalar tensor -> that epoch's batches), endlessly."""
    return tf.data.Dataset.counter(start=int(first_epoch)).flat_map(one_epoch)
