"""Curves from real TensorBoard logs of a tiny `fit` (Keras 3's own event format)."""

import numpy as np
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_network(keras, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="images")
    h = keras.layers.Dense(16, activation="relu", name="stem_dense")(inputs)
    outputs = {
        "b0": keras.layers.Dense(3, name="b0_classifier")(h),
        "b1": keras.layers.Dense(3, name="b1_classifier")(h),
    }
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds trained 4 epochs, validation after epochs 2 and 4 only (eval_every=2)."""
    import keras

    from dhm_keras.model import DHMModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    dirs, histories = [], []
    for seed in (0, 1):
        model_dir = tmp_path_factory.mktemp(f"seed{seed}")
        model = DHMModel(tiny_network(keras, seed), mode="dsl")
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        history = model.fit(
            x, y, batch_size=16, epochs=4, validation_data=(x[:32], y[:32]),
            validation_freq=[2, 4], verbose=0,
            callbacks=[keras.callbacks.TensorBoard(str(model_dir / "logs"), update_freq="epoch")],
        )
        dirs.append(str(model_dir))
        histories.append(history.history)
    return dirs, histories


def test_load_scalars_reads_keras_tensor_summaries(runs):
    from dhm_keras.analysis.curves import load_scalars

    dirs, histories = runs
    for model_dir, history in zip(dirs, histories):
        scalars = load_scalars(model_dir, "top1/b0")
        assert set(scalars) == {"train", "validation"}
        epochs, values = scalars["train"]
        np.testing.assert_array_equal(epochs, [1, 2, 3, 4])
        np.testing.assert_allclose(values, history["top1/b0"], rtol=1e-6)
        epochs, values = scalars["validation"]
        np.testing.assert_array_equal(epochs, [2, 4])  # only the evaluated epochs
        np.testing.assert_allclose(values, history["val_top1/b0"], rtol=1e-6)
        # The full tag works too; an unknown tag gives nothing.
        np.testing.assert_array_equal(load_scalars(model_dir, "epoch_top1/b0")["train"][0], [1, 2, 3, 4])
        assert load_scalars(model_dir, "top1/b7") == {}


def test_aggregate_mean_and_bands():
    from dhm_keras.analysis.curves import aggregate

    series = [(np.array([1, 2, 3]), np.array([0.1, 0.2, 0.3])),
              (np.array([1, 3]), np.array([0.3, 0.5]))]
    epochs, mean, low, high, count = aggregate(series, "minmax")
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_allclose(mean, [0.2, 0.2, 0.4])
    np.testing.assert_allclose(low, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(high, [0.3, 0.2, 0.5])
    np.testing.assert_array_equal(count, [2, 1, 2])
    _, mean, low, high, _ = aggregate(series, "std")
    s = np.sqrt(0.02)  # sample std of {0.1, 0.3} and of {0.3, 0.5}
    np.testing.assert_allclose(low, [0.2 - s, 0.2, 0.4 - s])
    np.testing.assert_allclose(high, [0.2 + s, 0.2, 0.4 + s])


def test_cli_writes_a_valid_png(runs, tmp_path, capsys):
    from PIL import Image

    from dhm_keras.analysis import curves

    dirs, histories = runs
    output = tmp_path / "curves.png"
    code = curves.main([f"--run=DSL={dirs[0]},{dirs[1]}", f"--run=one={dirs[0]}",
                        f"--output={output}"])
    assert code == 0
    data = output.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(output) as image:
        image.load()
        assert image.format == "PNG" and image.size == (800, 500)
    assert "DSL validation: 2 epochs, 2 seed(s)" in capsys.readouterr().out

    drawn = curves.plot_curves([("DSL", dirs)], str(tmp_path / "again.png"))
    expected = 100 * np.mean([h["val_top1/b0"] for h in histories], axis=0)
    np.testing.assert_allclose(drawn["DSL"]["validation"]["mean"], expected, rtol=1e-6)
    assert drawn["DSL"]["validation"]["epochs"] == [2, 4]


def test_cli_rejects_bad_input(tmp_path, capsys):
    from dhm_keras.analysis import curves

    assert curves.main(["--run=nolabel", f"--output={tmp_path / 'x.png'}"]) == 2
    assert curves.main([f"--run=a={tmp_path}", f"--output={tmp_path / 'x.png'}"]) == 2
    assert "no run has any value" in capsys.readouterr().err
