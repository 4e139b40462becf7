"""Mixed precision: the DHM step under mixed_float16 / mixed_bfloat16, and the
cross-replica overflow check that Keras' LossScaleOptimizer lacks.

Every test restores Keras' global dtype policy to float32 (fixture), so the
rest of the suite is unaffected.
"""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_report_script
from dhm_keras import models
from dhm_keras.model import DHMModel, all_finite_across_replicas, poison_unless
from official.modeling import optimization, performance


@pytest.fixture(autouse=True)
def float32_policy_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


def small_resnet():
    """ResNet-32's layout with one block per stage and branch, 16x16 inputs: BN included."""
    return models.build("resnet32", 10, mode="dhm", input_shape=(16, 16, 3), blocks_per_stage=1, branch_blocks=1)


def one_step(policy, initial_weights, x, y):
    """(loss of the step, weights before, weights after, model) under `policy`."""
    performance.set_precision_policy(policy)
    network = small_resnet()
    network.set_weights(initial_weights)
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.0), jit_compile=False)
    before = [w.numpy().copy() for w in network.trainable_weights]
    logs = model.train_on_batch(x, y, return_dict=True)
    after = [w.numpy() for w in network.trainable_weights]
    return logs["loss"], before, after, model


@pytest.fixture(scope="module")
def data_and_weights():
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    weights = small_resnet().get_weights()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")
    return x, y, weights


# Measured on this model and batch: loss within 1.3e-5 (fp16) / 1.0e-5 (bf16)
# relative of float32; update cosine 0.99985 / 0.9984, norm ratio 1.0001 / 0.9999.
# Tolerances leave ~10x headroom for other CPUs' kernels.
@pytest.mark.parametrize("policy, loss_rtol, min_cosine", [("mixed_float16", 1e-3, 0.999), ("mixed_bfloat16", 3e-3, 0.99)])
def test_one_step_matches_float32(data_and_weights, policy, loss_rtol, min_cosine):
    x, y, weights = data_and_weights
    ref_loss, before, ref_after, _ = one_step("float32", weights, x, y)
    loss, _, after, model = one_step(policy, weights, x, y)

    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=loss_rtol)
    # Variables stay float32; compute runs in the low-precision type; logits are float32.
    assert all(w.dtype == "float32" for w in model.network.weights)
    assert model.network.get_layer("stage1_block0_conv1").compute_dtype == policy.split("_")[1]
    logits = model.network(x[:2], training=False)
    assert all(z.dtype == tf.float32 for z in logits.values())
    # The update equals float32's: same direction and size. A custom step that forgot
    # optimizer.scale_loss would make fp16 updates 32768x too small (docs/keras3-notes.md).
    ref_delta = np.concatenate([(a - b).ravel() for a, b in zip(ref_after, before)])
    delta = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    cosine = ref_delta @ delta / (np.linalg.norm(ref_delta) * np.linalg.norm(delta))
    assert cosine > min_cosine, cosine
    np.testing.assert_allclose(np.linalg.norm(delta) / np.linalg.norm(ref_delta), 1.0, rtol=0.02)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15  # no overflow, no skip


def test_float16_classifier_logits_are_cast_to_float32():
    """A network whose heads output float16 still gets float32 loss math."""
    performance.set_precision_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(images))
    network = keras.Model(images, {h: keras.layers.Dense(5, name=f"{h}_classifier")(pooled) for h in ("b0", "b1")})
    assert network(np.zeros((1, 6, 6, 3), "float32"))["b0"].dtype == tf.float16
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.1))
    rng = np.random.default_rng(0)
    logs = model.test_on_batch(rng.standard_normal((4, 6, 6, 3)).astype("float32"), np.arange(4) % 5, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["mimic/b1->b0"] >= 0.0


def test_precision_policy_knob():
    assert performance.set_precision_policy("mixed_bfloat16") == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    with pytest.raises(ValueError, match="Unknown precision policy"):
        performance.set_precision_policy("float16")


def test_finite_helpers_single_replica():
    finite = [tf.constant([1.0, 2.0]), None]
    assert bool(all_finite_across_replicas(finite))
    assert not bool(all_finite_across_replicas([tf.constant([1.0, np.inf]), None]))
    same = poison_unless(tf.constant(True), finite)
    np.testing.assert_array_equal(same[0].numpy(), [1.0, 2.0])
    assert same[1] is None
    assert np.isnan(poison_unless(tf.constant(False), finite)[0].numpy()).all()


OVERFLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras, tensorflow as tf
    import official
    from official.common import distribute
    from official.modeling import optimization, performance
    from dhm_keras.model import DHMModel

    strategy = distribute.get_strategy("mirrored", num_replicas=2)
    performance.set_precision_policy("mixed_float16")

    def network():
        keras.utils.set_random_seed(0)
        images = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(images)
        x = keras.layers.GlobalAveragePooling2D(dtype="float32")(x)
        return keras.Model(images, {h: keras.layers.Dense(5, dtype="float32", name=f"{h}_classifier")(x)
                                    for h in ("b0", "b1")})

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 5, 16).astype("int32")
    bad = x.copy()
    bad[12, 2, 2, 0] = np.inf  # example 12: in replica 1's half of the global batch (8 + 8)

    def replica_values(model):  # every replica's copy of every trainable variable
        return [[c.numpy() for c in w.value.values] for w in model.network.trainable_weights]

    report = {}
    for check in (True, False):
        with strategy.scope():
            model = DHMModel(network(), mode="dhm", cross_replica_finite_check=check)
            model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.9), jit_compile=False)
        start = [w.numpy().copy() for w in model.network.trainable_weights]
        model.fit(tf.data.Dataset.from_tensors((bad, y)), epochs=1, verbose=0)
        after_bad = replica_values(model)
        scale_after_bad = float(model.optimizer.dynamic_scale.numpy())
        model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
        after_good = replica_values(model)
        report[str(check)] = {
            "bad_all_finite": all(np.isfinite(c).all() for copies in after_bad for c in copies),
            "bad_replicas_equal": all(np.array_equal(copies[0], copies[1]) for copies in after_bad),
            "bad_unchanged": all(np.array_equal(copies[0], s) and np.array_equal(copies[1], s)
                                 for copies, s in zip(after_bad, start)),
            "scale_after_bad": scale_after_bad,
            "good_all_finite": all(np.isfinite(c).all() for copies in after_good for c in copies),
            "good_replicas_equal": all(np.array_equal(copies[0], copies[1]) for copies in after_good),
            "good_moved": max(float(np.abs(copies[0] - s).max()) for copies, s in zip(after_good, start)),
            "iterations": int(model.optimizer.iterations.numpy()),
        }
    print("REPORT " + json.dumps(report))
    """
)


def test_overflow_on_one_replica_skips_the_step_on_every_replica():
    report = run_report_script(OVERFLOW_SCRIPT)
    on, off = report["True"], report["False"]
    # With the all-reduced check: both replicas skip the poisoned step identically,
    # the loss scale halves, and the next clean step trains normally.
    assert on["bad_all_finite"] and on["bad_replicas_equal"] and on["bad_unchanged"], on
    assert on["scale_after_bad"] == 2.0**14, on
    assert on["good_all_finite"] and on["good_replicas_equal"] and on["good_moved"] > 1e-4, on
    # Negative control, Keras alone: LossScaleOptimizer looks at replica 0 only,
    # applies the summed (NaN) gradients and keeps its scale.
    assert not off["bad_all_finite"], off
    assert off["scale_after_bad"] == 2.0**15, off
