"""End to end: the README's quick start through the real CLI, on the committed CIFAR-10 sample."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_cli

QUICKSTART = ["--gin_file=gin/quickstart.gin"]


run_main = run_cli


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("quickstart")
    result = run_main(*QUICKSTART, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return model_dir


def scalar_tags(log_dir):
    tags = {}
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_writes_checkpoints_logs_config(quickstart_dir):
    checkpoints = sorted(os.listdir(quickstart_dir / "checkpoints"))
    best = json.loads((quickstart_dir / "results.json").read_text())["best"]["epoch"]
    # train.keep_checkpoints defaults to the newest 3 plus the best.
    assert checkpoints == [f"epoch_{e:03d}.weights.h5" for e in sorted({2, 3, 4, best})]
    assert (quickstart_dir / "operative_config.gin").read_text().count("resnet32") >= 1
    config = json.loads((quickstart_dir / "config.json").read_text())
    assert config["model"] == {"name": "resnet32", "mode": "dhm", "overrides": None, "num_classes": None, "sync_batchnorm": False}
    train_tags = scalar_tags(quickstart_dir / "logs" / "train")
    val_tags = scalar_tags(quickstart_dir / "logs" / "validation")
    for tag in ("epoch_loss", "epoch_learning_rate", "epoch_ce/b1", "epoch_mimic/b1->b0", "epoch_top1/b0", "epoch_top5/b2"):
        assert sorted(train_tags[tag]) == [0, 1, 2, 3], tag
    assert sorted(val_tags["epoch_top1/b0"]) == [0, 1, 2, 3]


def test_results_show_learning(quickstart_dir):
    results = json.loads((quickstart_dir / "results.json").read_text())
    assert results["completed"] and results["epochs_completed"] == 4
    assert [e["epoch"] for e in results["history"]] == [1, 2, 3, 4]
    for key in ("best", "last"):
        for head in ("b0", "b1", "b2"):
            assert 0.0 <= results[key][f"top1/{head}"] <= results[key][f"top5/{head}"] <= 1.0
    # Ten classes: chance is 10% top-1. Four epochs on 5,000 real images reach ~28%.
    assert results["last"]["top1/b0"] > 0.2, results["last"]
    assert results["best"]["top1/b0"] >= results["last"]["top1/b0"]
    assert results["export"].endswith(os.path.join("export", "1"))


def test_export_holds_b0_only_and_matches_training_model(quickstart_dir):
    from dhm_keras import data as data_lib
    from dhm_keras import models
    from dhm_keras.model import DHMModel

    loaded = tf.saved_model.load(str(quickstart_dir / "export" / "1"))
    assert {"serving_default", "serving_bytes"} <= set(loaded.signatures)

    network = models.build("resnet32", 10, mode="dhm")
    model = DHMModel(network)
    model.load_weights(str(quickstart_dir / "checkpoints" / "epoch_004.weights.h5"))
    main = model.main_branch()
    backbone_params = models.build("resnet32", 10, mode="baseline").count_params()
    exported_params = sum(int(np.prod(v.shape)) for v in loaded.variables)
    assert exported_params == backbone_params  # no branch variable travels with the export

    images = next(iter(tfds_test_images()))
    mean, std = data_lib.channel_stats("cifar10_jpeg")
    expected = main(data_lib.normalize(images, mean, std), training=False).numpy()
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["logits"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(served["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(served["classes"].numpy()[:, 0], expected.argmax(-1))


def tfds_test_images(n=16):
    import tensorflow_datasets as tfds

    ds = tfds.load("cifar10_jpeg", split=f"test[:{n}]", data_dir=str(REPO_ROOT / "quickstart_data"), as_supervised=True)
    return ds.map(lambda image, label: image).batch(n).as_numpy_iterator()


def test_rerun_of_finished_run_does_not_train_again(quickstart_dir):
    result = run_main(*QUICKSTART, f"--model_dir={quickstart_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((quickstart_dir / "results.json").read_text())
    assert results["epochs_completed"] == 4
    # Nothing new to export: the newest version was made from the same checkpoint.
    assert sorted(os.listdir(quickstart_dir / "export")) == ["1"]
    assert results["export"] == str(quickstart_dir / "export" / "1")  # results.json names the newest
    assert sorted(os.listdir(quickstart_dir / "checkpoints"))[-1] == "epoch_004.weights.h5"
    # The checkpoint loads whole (optimizer slots included): no "Skipping variable loading".
    assert "Skipping variable loading" not in result.stderr, result.stderr[-3000:]


def test_misspelled_binding_is_one_clear_line(tmp_path):
    result = run_main(*QUICKSTART, "--gin_param=train.epohcs = 2", f"--model_dir={tmp_path}", timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "train.epohcs" in last and "Traceback" not in result.stderr


def test_missing_dataset_says_where_to_put_it(tmp_path):
    result = run_main(
        "--gin_file=gin/cifar100/resnet32_dhm.gin", f"--data_dir={tmp_path / 'nowhere'}", f"--model_dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "cifar100" in last and "--data_dir" in last and "Traceback" not in result.stderr
