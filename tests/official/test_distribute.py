"""official.common.distribute helpers that need no cluster.

The multi-worker True case is covered end to end by tests/test_multi_worker.py:
DHMModel's Keras workarounds only switch on through `is_multi_worker`, and two
real workers do not train identically without them.
"""

import tensorflow as tf

from official.common import distribute


def test_single_process_strategies_are_not_multi_worker():
    assert not distribute.is_multi_worker(tf.distribute.get_strategy())
    assert not distribute.is_multi_worker(distribute.get_strategy("one_device"))
    assert distribute.is_chief(tf.distribute.get_strategy())
