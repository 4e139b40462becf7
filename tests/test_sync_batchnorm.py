"""Batch norm under several replicas: synchronised BN trains like one replica with the
global batch, and the moving statistics stay identical on every replica.

The replica comparison runs in a subprocess: logical CPU devices must be
configured before TensorFlow initialises its runtime.
"""

import textwrap

import keras

from conftest import run_report_script
from dhm_keras import models
from dhm_keras.models import layers


def bn_layers(network):
    return [l for l in network.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_moving_statistics_are_averaged_over_replicas():
    bn = bn_layers(models.build("resnet32", 10, input_shape=(8, 8, 3), blocks_per_stage=1))[0]
    assert isinstance(bn, layers.BatchNormalization)
    assert bn.moving_mean.aggregation == bn.moving_variance.aggregation == "mean"


def test_off_by_default_and_on_inside_the_context():
    small = dict(input_shape=(8, 8, 3), blocks_per_stage=1, branch_blocks=1)
    plain = models.build("resnet32", 10, **small)
    assert bn_layers(plain) and not any(l.synchronized for l in bn_layers(plain))
    with layers.synchronized_batch_norm():
        synced = models.build("resnet32", 10, **small)
    assert all(l.synchronized for l in bn_layers(synced))
    assert len(bn_layers(synced)) == len(bn_layers(plain))
    # The context ends with the block; the saved config keeps the flag.
    assert not any(l.synchronized for l in bn_layers(models.build("resnet32", 10, **small)))
    assert bn_layers(synced)[0].get_config()["synchronized"] is True
    # The builder flag and the Gin knob (model.sync_batchnorm) reach the same switch.
    flagged = models.build("resnet32", 10, sync_batchnorm=True, **small)
    assert all(l.synchronized for l in bn_layers(flagged))


def test_gin_knob_reaches_the_built_network():
    import gin

    from dhm_keras import experiment, tasks
    from dhm_keras.main import parse_gin

    gin.clear_config()
    try:
        parse_gin(["gin/quickstart.gin"], ["model.sync_batchnorm = True", "model.overrides = {'blocks_per_stage': 1}"])
        network = tasks.get_task(experiment.from_gin()).build_network((8, 8, 3), num_classes=10)
    finally:
        gin.clear_config()
    assert bn_layers(network) and all(l.synchronized for l in bn_layers(network))


SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np, keras, tensorflow as tf
    import official
    from official.common import distribute
    from official.modeling import optimization
    from dhm_keras import models
    from dhm_keras.model import DHMModel
    from dhm_keras.models import layers

    two = distribute.get_strategy("mirrored", num_replicas=2)
    one = tf.distribute.get_strategy()
    small = dict(mode="dhm", input_shape=(8, 8, 3), blocks_per_stage=1, branch_blocks=1)
    keras.utils.set_random_seed(0)
    initial = models.build("resnet32", 10, **small).get_weights()
    rng = np.random.default_rng(0)
    # The two halves (one per replica) have different statistics.
    x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    x[8:] = 2.0 * x[8:] + 0.5
    y = rng.integers(0, 10, 16).astype("int32")

    def step(strategy, sync):
        with strategy.scope():
            with layers.synchronized_batch_norm(sync):
                network = models.build("resnet32", 10, **small)
            network.set_weights(initial)
            model = DHMModel(network, mode="dhm")
            model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.9, l2=1e-4), jit_compile=False)
        model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
        stats = [w.value for w in network.non_trainable_weights]
        mirrored = all(
            np.array_equal(v.values[0].numpy(), v.values[-1].numpy()) for v in stats
        ) if strategy is two else None
        # get_weights: trainable weights and BN moving statistics (replica 0's copy).
        return network.get_weights(), mirrored

    reference, _ = step(one, sync=False)  # plain BN, one replica, global batch of 16
    def diff(weights):
        return max(float(np.abs(a - b).max()) for a, b in zip(weights, reference))
    two_sync, two_sync_mirrored = step(two, sync=True)
    two_plain, two_plain_mirrored = step(two, sync=False)

    # Control: Keras' own BatchNormalization lets the replicas' moving statistics drift apart.
    with two.scope():
        keras_bn = keras.layers.BatchNormalization(momentum=0.5)
        inputs = keras.Input((2,))
        tiny = keras.Model(inputs, keras_bn(inputs))
    halves = np.concatenate([np.zeros((4, 2)), np.full((4, 2), 10.0)]).astype("float32")
    batch = next(iter(two.experimental_distribute_dataset(tf.data.Dataset.from_tensors(halves))))
    tf.function(lambda b: two.run(lambda v: tiny(v, training=True), args=(b,)))(batch)
    copies = [v.numpy() for v in keras_bn.moving_mean.value.values]

    report = {
        "moved": diff(initial),
        "two_sync": diff(two_sync),
        "two_plain": diff(two_plain),
        "two_sync_mirrored": two_sync_mirrored,
        "two_plain_mirrored": two_plain_mirrored,
        "keras_bn_copies_differ": bool(not np.array_equal(copies[0], copies[1])),
    }
    print("REPORT " + json.dumps(report))
    """
)


def test_two_replicas_with_sync_bn_update_like_one_replica():
    report = run_report_script(SCRIPT)
    assert report["moved"] > 1e-2, report  # the step changed the weights noticeably
    assert report["two_sync"] < 1e-5, report
    # Negative control: per-replica statistics (the default) give another update.
    assert report["two_plain"] > 1e-3, report
    # Either way, the replicas' copies of the moving statistics stay identical
    # (layers.BatchNormalization averages the updates), unlike Keras' own layer.
    assert report["two_sync_mirrored"] and report["two_plain_mirrored"], report
    assert report["keras_bn_copies_differ"], report
