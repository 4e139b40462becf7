"""WRN dropout (Appendix F): live between the two convolutions of every block of every head
in training, absent at inference, and absent altogether at the default rate 0.

The reference accepts a dropout rate but never passes it on, so its "dropout 0.3" runs train
without dropout; ours must apply it. The behavioural checks use a WRN-16-1 built by the
same family constructor as the registered WRNs (same blocks, branches and fork points, 1/64
of the weights), so that they run in a second.
"""

import keras
import numpy as np
import pytest

from dhm_keras import models
from dhm_keras.model import DHMModel
from dhm_keras.models import specs
from official.modeling import optimization

RATE = 0.3


def wrn_16_1(dropout):
    spec = specs.wide_resnet("wrn_16_1", n=2, k=1, b2_blocks=(2, 1), b1_blocks=2)
    spec = models.with_overrides(spec, dropout=dropout, input_shape=(8, 8, 3))
    keras.utils.set_random_seed(0)
    return models.build_from_spec(spec, 10, mode="dhm"), spec


@pytest.fixture(scope="module")
def twins():
    """The same network with and without dropout, sharing identical weights."""
    with_dropout, spec = wrn_16_1(RATE)
    without, _ = wrn_16_1(0.0)
    without.set_weights(with_dropout.get_weights())
    return with_dropout, without, spec


def block_names(spec):
    names = [f"{s.name}_block{i}" for s in spec.stages for i in range(s.blocks)]
    for branch in spec.branches:
        names += [f"{branch.name}_{s.name}_block{i}" for s in branch.stages for i in range(s.blocks)]
    return names


def test_dropout_sits_between_the_convs_of_every_block_of_every_head(twins):
    model, plain, spec = twins
    names = block_names(spec)
    assert len(names) == 3 * 2 + 2 + 3  # backbone 2+2+2, B1 2, B2 2+1
    dropouts = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
    assert sorted(l.name for l in dropouts) == sorted(f"{n}_dropout" for n in names)
    for name in names:
        layer = model.get_layer(f"{name}_dropout")
        assert layer.rate == RATE
        assert layer.input is model.get_layer(f"{name}_relu2").output
        assert model.get_layer(f"{name}_conv2").input is layer.output
    # Rate 0 (the default) builds no dropout layer at all; the weights are the same.
    assert not [l for l in plain.layers if isinstance(l, keras.layers.Dropout)]
    assert [w.shape for w in plain.weights] == [w.shape for w in model.weights]


def test_dropout_is_off_at_inference_and_on_in_training(twins):
    model, plain, _ = twins
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    # Inference first (training=True calls below move the BN moving statistics).
    inference = model(x, training=False)
    for head, value in model(x, training=False).items():  # deterministic
        np.testing.assert_array_equal(np.asarray(value), np.asarray(inference[head]))
    for head, value in plain(x, training=False).items():  # dropout is the identity
        np.testing.assert_allclose(np.asarray(value), np.asarray(inference[head]), atol=1e-6)

    # Training: with batch statistics BN is deterministic, so the dropout-free twin gives
    # the same logits twice; the dropout model gives different ones on every head, and
    # differs from the twin. Without a working dropout these assertions fail.
    plain_a, plain_b = plain(x, training=True), plain(x, training=True)
    first, second = model(x, training=True), model(x, training=True)
    for head in inference:
        np.testing.assert_allclose(np.asarray(plain_a[head]), np.asarray(plain_b[head]), atol=1e-6)
        assert np.abs(np.asarray(first[head]) - np.asarray(second[head])).max() > 1e-3, head
        assert np.abs(np.asarray(first[head]) - np.asarray(plain_a[head])).max() > 1e-3, head


def test_dropout_layer_drops_the_configured_fraction(twins):
    model, _, _ = twins
    layer = model.get_layer("b1_stage3_block1_dropout")
    ones = np.ones((1, 100, 100, 10), "float32")
    y = np.asarray(layer(ones, training=True))
    assert abs(np.mean(y == 0) - RATE) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / (1 - RATE), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer(ones, training=False)), ones)


def test_dhm_training_step_with_dropout(twins):
    model, _, _ = twins
    dhm = DHMModel(model, mode="dhm")
    dhm.compile(optimizer=optimization.L2SGD(0.01), run_eagerly=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    before = model.get_layer("b2_stage2_block0_conv2").kernel.numpy().copy()
    logs = dhm.train_on_batch(x, rng.integers(0, 10, 2), return_dict=True)
    assert np.isfinite(logs["loss"])
    assert np.abs(model.get_layer("b2_stage2_block0_conv2").kernel.numpy() - before).max() > 0


def test_dropout_override_on_the_registered_models():
    for name in ("wrn_16_8", "wrn_28_10"):
        spec = models.get_spec(name)
        assert spec.options == {"dropout": 0.0}
        assert models.with_overrides(spec, dropout=RATE).options == {"dropout": RATE}
    with pytest.raises(ValueError, match="dropout rate"):
        wrn_16_1(1.0)
