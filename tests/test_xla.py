"""XLA: a jit-compiled DHM step computes what the graph-mode step does, and the
`jit_compile` knob keeps its "auto" semantics."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from dhm_keras import models
from dhm_keras.model import DHMModel
from official.modeling import optimization, performance


def test_jit_compiled_step_matches_graph_mode():
    """One ResNet (BN, zero-pad shortcuts, three heads) DHM step, CPU, XLA vs graph."""
    keras.utils.set_random_seed(0)
    build = dict(mode="dhm", input_shape=(16, 16, 3), blocks_per_stage=1, branch_blocks=1)
    initial = models.build("resnet32", 10, **build).get_weights()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    results = {}
    for jit in (False, True):
        network = models.build("resnet32", 10, **build)
        network.set_weights(initial)
        model = DHMModel(network, mode="dhm", alpha=0.5, temperature=2.0)
        model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.9, l2=1e-4), jit_compile=jit)
        assert model.jit_compile is jit
        logs = model.train_on_batch(x, y, return_dict=True)
        results[jit] = (logs, network.get_weights())
    (graph_logs, graph_w), (xla_logs, xla_w) = results[False], results[True]
    for key in ("loss", "ce/b0", "mimic/b1->b0"):
        np.testing.assert_allclose(xla_logs[key], graph_logs[key], rtol=1e-5, err_msg=key)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(graph_w, initial))
    assert moved > 1e-3  # the step did something to compare
    # Weights (incl. BN moving statistics) after the step: XLA fuses and reorders
    # float32 reductions, so allow rounding-level differences only.
    for a, b in zip(xla_w, graph_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def fake_strategy(replicas):
    return types.SimpleNamespace(num_replicas_in_sync=replicas)


def test_auto_is_xla_only_on_a_single_gpu(monkeypatch):
    assert performance.resolve_jit_compile("auto", fake_strategy(1)) is False  # this CPU machine
    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind)
    )
    assert performance.resolve_jit_compile("auto", fake_strategy(1)) is True
    assert performance.resolve_jit_compile("auto", fake_strategy(2)) is False


def test_explicit_settings():
    assert performance.resolve_jit_compile(True, fake_strategy(1)) is True
    assert performance.resolve_jit_compile(False, fake_strategy(4)) is False
    with pytest.raises(ValueError, match="not supported with 2 replicas"):
        performance.resolve_jit_compile(True, fake_strategy(2))
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        performance.resolve_jit_compile("yes", fake_strategy(1))
