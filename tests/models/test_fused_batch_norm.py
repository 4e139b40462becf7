"""The fused training path of `layers.BatchNormalization` computes what Keras' own does.

Checked against a NumPy formula (output, moving statistics with the BIASED batch
variance), against Keras' unfused path (gradients of input, gamma and beta), and
for the cases that must NOT take the fused kernel.
"""

import numpy as np
import pytest
import tensorflow as tf

import official  # noqa: F401  (oneDNN on, as in every entry point)
from dhm_keras.models import layers


def _bn(fused: bool, momentum=0.9, **kw):
    layer = layers.BatchNormalization(axis=-1, momentum=momentum, epsilon=1e-5, **kw)
    layer.fused = fused
    layer.build((None, 5, 6, 3))
    layer.gamma.assign([1.5, 0.5, 2.0])
    layer.beta.assign([0.1, -0.2, 0.3])
    layer.moving_mean.assign([0.2, -0.1, 0.0])
    layer.moving_variance.assign([1.0, 2.0, 0.5])
    return layer


def _input(seed=0, shape=(4, 5, 6, 3)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * [2.0, 0.3, 5.0] + [1.0, -3.0, 0.5]).astype(np.float32)


def test_training_step_matches_numpy():
    x = _input()
    layer = _bn(fused=True)
    y = layer(tf.constant(x), training=True).numpy()

    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))  # biased, as Keras
    want = (x - mean) / np.sqrt(var + 1e-5) * [1.5, 0.5, 2.0] + [0.1, -0.2, 0.3]
    np.testing.assert_allclose(y, want, atol=2e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               0.9 * np.float32([0.2, -0.1, 0.0]) + 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               0.9 * np.float32([1.0, 2.0, 0.5]) + 0.1 * var, rtol=1e-5)


def test_fused_and_keras_paths_give_the_same_gradients_and_statistics():
    x = tf.constant(_input(1))
    weights = tf.constant(_input(2))  # a loss that weighs every output differently
    results = []
    for fused in (True, False):
        layer = _bn(fused=fused)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * weights)
        grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        results.append(([g.numpy() for g in grads], y.numpy(),
                        layer.moving_mean.numpy(), layer.moving_variance.numpy()))
    (g_fused, y_fused, m_fused, v_fused), (g_keras, y_keras, m_keras, v_keras) = results
    np.testing.assert_allclose(y_fused, y_keras, atol=2e-5)
    for a, b in zip(g_fused, g_keras):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    np.testing.assert_allclose(m_fused, m_keras, atol=1e-6)
    np.testing.assert_allclose(v_fused, v_keras, rtol=1e-5)


def test_the_fused_kernel_is_in_a_training_graph_only():
    x = tf.constant(_input())

    def op_types(layer, training):
        fn = tf.function(lambda t: layer(t, training=training))
        return {n.op for n in fn.get_concrete_function(x).graph.as_graph_def().node}

    assert "FusedBatchNormV3" in op_types(_bn(fused=True), True)
    assert "FusedBatchNormV3" not in op_types(_bn(fused=True), False)  # moving stats
    assert "FusedBatchNormV3" not in op_types(_bn(fused=False), True)
    # Cross-replica statistics need Keras' path (the kernel sees one replica).
    assert "FusedBatchNormV3" not in op_types(_bn(fused=True, synchronized=True), True)


def test_inference_uses_the_moving_statistics():
    x = _input()
    y = _bn(fused=True)(tf.constant(x), training=False).numpy()
    want = ((x - [0.2, -0.1, 0.0]) / np.sqrt(np.float32([1.0, 2.0, 0.5]) + 1e-5)
            * [1.5, 0.5, 2.0] + [0.1, -0.2, 0.3])
    np.testing.assert_allclose(y, want, atol=2e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_statistics(policy):
    x = _input(3)
    layer = layers.BatchNormalization(axis=-1, momentum=0.0, epsilon=1e-5, dtype=policy)
    y = layer(tf.constant(x).numpy().astype(layer.compute_dtype), training=True)
    assert y.dtype == layer.compute_dtype
    assert layer.moving_mean.dtype == "float32"
    # momentum 0: the moving statistics ARE the batch's (of the rounded input).
    rounded = x.astype(layer.compute_dtype).astype(np.float32)
    np.testing.assert_allclose(layer.moving_mean.numpy(), rounded.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), rounded.var((0, 1, 2)), rtol=1e-3)
    want = (rounded - rounded.mean((0, 1, 2))) / np.sqrt(rounded.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2)
