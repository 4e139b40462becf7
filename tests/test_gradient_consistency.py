"""Appendix C diagnostic: cosine between head gradients on the shared backbone."""

import os

import numpy as np
import pytest


def two_heads(keras, negate_b1=False, seed=0):
    """stem_dense (shared) -> b0_classifier, b1_classifier with b1 = b0 or b1 = -b0."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="images")
    h = keras.layers.Dense(3, activation="tanh", name="stem_dense")(inputs)
    b0 = keras.layers.Dense(2, name="b0_classifier")
    b1 = keras.layers.Dense(2, name="b1_classifier")
    network = keras.Model(inputs, {"b0": b0(h), "b1": b1(h)})
    sign = -1.0 if negate_b1 else 1.0
    b1.set_weights([sign * w for w in b0.get_weights()])
    return network


def test_shared_variables_are_the_common_layers():
    import keras

    from dhm_keras.gradient_consistency import shared_variables

    network = two_heads(keras)
    names = [v.path for v in shared_variables(network, "b1")]
    assert names == ["stem_dense/kernel", "stem_dense/bias"]


def test_identical_heads_give_one():
    import keras

    from dhm_keras.gradient_consistency import gradient_cosine

    network = two_heads(keras)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 2, size=8)
    assert gradient_cosine(network, x, y, "b1") == pytest.approx(1.0, abs=1e-12)


def test_negated_head_gives_minus_one():
    """z1 = -z0 with two classes: per example dCE1/dh = -c * dCE0/dh with c > 0, so on
    one example the shared gradients are exactly opposite."""
    import keras

    from dhm_keras.gradient_consistency import gradient_cosine

    network = two_heads(keras, negate_b1=True)
    x = np.array([[0.3, -1.2, 0.8, 0.5]], "float32")
    for label in (0, 1):
        value = gradient_cosine(network, x, np.array([label]), "b1")
        assert value == pytest.approx(-1.0, abs=1e-12)


def test_matches_direct_gradient_tape_on_a_dhm_model():
    import keras
    import tensorflow as tf

    from dhm_keras import models
    from dhm_keras.gradient_consistency import gradient_cosine, shared_variables

    keras.utils.set_random_seed(0)
    network = models.build("resnet32", 7, mode="dhm", input_shape=(16, 16, 3),
                           blocks_per_stage=1, branch_blocks=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 7, size=6)
    # Spec: B1 forks after stage2, B2 after stage1 (Table 1).
    forks = {"b1": ("stem_", "stage1_", "stage2_"), "b2": ("stem_", "stage1_")}
    for head, prefixes in forks.items():
        expected = [v for layer in network.layers if layer.name.startswith(prefixes)
                    for v in layer.trainable_weights]
        assert [v.path for v in shared_variables(network, head)] == [v.path for v in expected]
        for training in (False, True):
            with tf.GradientTape(persistent=True) as tape:
                out = network(x, training=training)
                ce = {h: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=out[h])) for h in ("b0", head)}
            g0 = np.concatenate([g.numpy().ravel() for g in tape.gradient(ce["b0"], expected)])
            gh = np.concatenate([g.numpy().ravel() for g in tape.gradient(ce[head], expected)])
            direct = float(g0.astype(np.float64) @ gh / (np.linalg.norm(g0.astype(np.float64))
                                                         * np.linalg.norm(gh.astype(np.float64))))
            state = [v.numpy().copy() for v in network.non_trainable_variables]
            value = gradient_cosine(network, x, y, head, training=training)
            assert value == pytest.approx(direct, abs=1e-5), (head, training)
            assert -1.0 <= value <= 1.0
            # BN moving statistics are left exactly as they were.
            for before, v in zip(state, network.non_trainable_variables):
                np.testing.assert_array_equal(before, v.numpy())


def test_callback_logs_every_n_steps(tmp_path):
    import keras
    import tensorflow as tf

    from dhm_keras.gradient_consistency import GradientConsistency, gradient_cosine
    from dhm_keras.model import DHMModel

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,), name="images")
    stem = keras.layers.Dense(8, activation="relu", name="stem_dense")(inputs)
    stage = keras.layers.Dense(8, activation="relu", name="stage1_dense")(stem)
    network = keras.Model(inputs, {
        "b0": keras.layers.Dense(3, name="b0_classifier")(stage),
        "b1": keras.layers.Dense(3, name="b1_classifier")(stage),
        "b2": keras.layers.Dense(3, name="b2_classifier")(stem),
    })
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = rng.integers(0, 3, size=48)
    log_dir = str(tmp_path / "logs")
    callback = GradientConsistency((x[:16], y[:16]), every_n_steps=2, log_dir=log_dir)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])  # 6 steps

    assert [e["step"] for e in callback.history] == [0, 2, 4, 6]
    assert all(set(e) == {"step", "b1", "b2"} for e in callback.history)
    assert all(-1.0 <= e[h] <= 1.0 for e in callback.history for h in ("b1", "b2"))
    # The last measurement came after the last update: recompute it directly.
    for head in ("b1", "b2"):
        assert callback.history[-1][head] == pytest.approx(
            gradient_cosine(network, x[:16], y[:16], head), abs=1e-6)

    logged = {}
    for name in os.listdir(log_dir):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                logged.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == ["gradient_cosine/b1", "gradient_cosine/b2"]
    for entry in callback.history:
        assert logged["gradient_cosine/b1"][entry["step"]] == pytest.approx(entry["b1"], rel=1e-6)


def test_callback_rejects_bad_interval():
    from dhm_keras.gradient_consistency import GradientConsistency

    with pytest.raises(ValueError, match="every_n_steps"):
        GradientConsistency((np.zeros((1, 4)), np.zeros(1)), every_n_steps=0)
