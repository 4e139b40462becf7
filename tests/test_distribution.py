"""Replica-count invariance of the DHM step: catches a missing or doubled loss scaling.

Runs in a subprocess because logical CPU devices must be configured before
TensorFlow initialises its runtime.
"""

import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

# A three-head network small enough for a subprocess test; `batch_norm` adds a BN
# after the convolution (BN-free keeps the replica-invariance test exact).
NETWORK = """
def network(batch_norm=False):
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(images)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    outs = {h: keras.layers.Dense(5, name=f"{h}_classifier")(
                x if h == "b0" else keras.layers.Dense(6, activation="relu", name=f"{h}_fc")(x))
            for h in ("b0", "b1", "b2")}
    return keras.Model(images, outs)
"""

SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, tensorflow as tf
    import official
    from official.common import distribute
    from official.modeling import optimization
    from dhm_keras.model import DHMModel

    strategy_2 = distribute.get_strategy("mirrored", num_replicas=2)
    assert strategy_2.num_replicas_in_sync == 2

    {network}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 5, 16).astype("int32")
    weights = []
    for strategy in (tf.distribute.get_strategy(), strategy_2):
        with strategy.scope():
            model = DHMModel(network(), mode="dhm", alpha=0.7, temperature=2.0)
            model.compile(optimizer=optimization.L2SGD(0.5, momentum=0.9, l2=1e-3), jit_compile=False)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(2)
        history = model.fit(ds, epochs=1, verbose=0).history
        weights.append([w.numpy() for w in model.network.trainable_weights])
        print("loss", strategy.num_replicas_in_sync, history["loss"][0])
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*weights))
    moved = max(float(np.max(np.abs(a))) for a in weights[0])
    print("max weight difference", diff)
    assert diff < 1e-5, diff
    """
).replace("{network}", NETWORK)


def test_two_replicas_update_weights_like_one():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "max weight difference" in result.stdout


EVAL_SCRIPT = textwrap.dedent(
    """
    import json, numpy as np, keras, tensorflow as tf
    import official
    from official.common import distribute
    from official.modeling import optimization
    from dhm_keras.model import DHMModel

    strategy_2 = distribute.get_strategy("mirrored", num_replicas=2)

    {network}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 5, 9).astype("int32")
    logs = {}
    # 9 examples in batches of 8: the last batch has 1 example, so with 2 replicas
    # one replica gets none (oneDNN's convolution mis-shapes an empty batch).
    for strategy, batch in ((tf.distribute.get_strategy(), 9), (strategy_2, 8)):
        with strategy.scope():
            model = DHMModel(network(batch_norm=True), mode="dhm")
            model.compile(optimizer=optimization.L2SGD(0.1), jit_compile=False)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
        logs[strategy.num_replicas_in_sync] = model.evaluate(ds, return_dict=True, verbose=0)
    print("REPORT " + json.dumps({k: {m: float(v) for m, v in l.items()} for k, l in logs.items()}))
    """
).replace("{network}", NETWORK)


def test_two_replica_evaluation_with_an_empty_replica_batch_scores_every_example():
    from conftest import run_report_script

    logs = run_report_script(EVAL_SCRIPT)
    one, two = logs["1"], logs["2"]
    assert set(one) == set(two)
    for name in one:  # one batch of 9 on one replica is the plain mean over all 9
        assert abs(one[name] - two[name]) <= 1e-5 * max(1.0, abs(one[name])), (name, one[name], two[name])
