"""Every user-fixable error: one readable line on stderr, no traceback, its exit code.

Each case runs the real CLI on a tiny configuration (128 training images of
the committed CIFAR-10 sample, a one-block-per-stage ResNet) so that the
whole file stays around a minute or two.
"""

import json
import os
import shutil

import keras
import pytest

from conftest import REPO_ROOT, TINY_RUN_ARGS, rewrite_record, run_cli

TINY = TINY_RUN_ARGS


def run_main(*args, timeout=900):
    result = run_cli(*args, timeout=timeout)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return result.returncode, (lines[-1] if lines else ""), result.stderr


def assert_one_line_error(stderr, last, error_class):
    assert last.startswith(f"error: {error_class}:"), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def test_misspelled_binding_in_a_file_names_binding_and_file(tmp_path):
    bad = tmp_path / "typo.gin"
    bad.write_text("include 'gin/quickstart.gin'\ntrain.epohcs = 3\n")
    code, last, stderr = run_main(f"--gin_file={bad}", f"--model_dir={tmp_path / 'm'}")
    assert code == 2
    assert_one_line_error(stderr, last, "ValueError")
    assert "epohcs" in last and str(bad) in last


def test_missing_gin_file_and_missing_include_are_named(tmp_path):
    code, last, stderr = run_main(f"--gin_file={tmp_path / 'nope.gin'}", f"--model_dir={tmp_path / 'm'}")
    assert code == 2 and "nope.gin" in last
    assert_one_line_error(stderr, last, "FileNotFoundError")
    including = tmp_path / "includes.gin"
    including.write_text("include 'gin/no_such_recipe.gin'\n")
    code, last, stderr = run_main(f"--gin_file={including}", f"--model_dir={tmp_path / 'm'}")
    assert code == 2 and "no_such_recipe.gin" in last and str(including) in last
    assert_one_line_error(stderr, last, "FileNotFoundError")


def test_declared_class_count_must_match_dataset(tmp_path):
    code, last, stderr = run_main(*TINY, "--gin_param=model.num_classes = 100", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "ClassCountError")
    assert "100" in last and "10 classes" in last and "cifar10_jpeg" in last


def test_checkpoint_of_another_class_count_is_refused(tmp_path):
    from dhm_keras import models

    checkpoint = tmp_path / "hundred_classes.weights.h5"
    network = models.build("resnet32", 100, mode="dhm", input_shape=(32, 32, 3), blocks_per_stage=1)
    from dhm_keras.model import DHMModel

    DHMModel(network, mode="dhm").save_weights(str(checkpoint))
    keras.backend.clear_session()
    code, last, stderr = run_main(*TINY, "--mode=eval", f"--checkpoint={checkpoint}", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "ClassCountError")
    assert str(checkpoint) in last and "10 classes" in last


@pytest.mark.parametrize(
    "binding, expected",
    [("dataset.image_size = (32,)", "(height, width)"), ("dataset.image_size = (2, 2)", "too small")],
)
def test_bad_image_size_is_refused(tmp_path, binding, expected):
    code, last, stderr = run_main(*TINY, f"--gin_param={binding}", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "ImageSizeError")
    assert expected in last


def test_model_dir_of_another_configuration_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "wrn_28_10"}}))
    code, last, stderr = run_main(*TINY, f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "ConfigMismatchError")
    assert "model.name: 'wrn_28_10' -> 'resnet32'" in last and "--model_dir" in last


def test_nan_loss_stops_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    # Epoch 1 trains normally; at epoch 2 the learning rate jumps to 1e29.
    code, last, stderr = run_main(
        *TINY,
        "--gin_param=build_sgd.milestones = [1]",
        "--gin_param=build_sgd.gamma = 1e30",
        f"--model_dir={tmp_path}",
    )
    assert code == 3, stderr[-3000:]
    assert_one_line_error(stderr, last, "NonFiniteLossError")
    # 128 images / batch 64 = 2 steps per epoch: the first bad step is 3 or 4.
    assert "epoch 2" in last and ("at step 3 " in last or "at step 4 " in last), last
    good = tmp_path / "checkpoints" / "epoch_001.weights.h5"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_001.weights.h5"]
    assert str(good) in last
    results = json.loads((tmp_path / "results.json").read_text())
    assert [e["epoch"] for e in results["history"]] == [1] and not results["completed"]
    assert not (tmp_path / "export").exists()


def sample_copy(tmp_path):
    """A copy of the committed CIFAR-10 sample and its train record file, to damage."""
    data = tmp_path / "data"
    shutil.copytree(os.path.join(REPO_ROOT, "quickstart_data"), data)
    (record,) = [p for p in (data / "cifar10_jpeg" / "1.0.0").iterdir() if "train.tfrecord" in p.name]
    return data, record


def test_corrupt_record_is_reported_as_corrupt_input(tmp_path):
    import tensorflow as tf

    data, record = sample_copy(tmp_path)
    # The record holding byte 5000: each record is its payload plus 16 bytes of framing.
    starts = [0]
    for r in tf.data.TFRecordDataset(str(record)).take(20):
        starts.append(starts[-1] + len(r.numpy()) + 16)
    damaged = max(i for i, start in enumerate(starts) if start <= 5000)
    payload = bytearray(record.read_bytes())
    payload[5000:5064] = bytes(64)  # inside one of the first few records
    record.write_bytes(bytes(payload))
    code, last, stderr = run_main(*TINY, f"--data_dir={data}", f"--model_dir={tmp_path / 'm'}")
    assert code == 4, stderr[-3000:]
    assert_one_line_error(stderr, last, "CorruptInputError")
    # The file, the record and its offset, and TensorFlow's own message.
    assert "corrupt record" in last and str(record) in last, last
    assert f"record {damaged} (byte offset {starts[damaged]})" in last, last
    assert f"corrupted record at {starts[damaged]}" in last, last
    assert "Graph execution error" not in last


def test_label_out_of_range_names_record_split_and_valid_range(tmp_path):
    def relabel(example):
        example.features.feature["label"].int64_list.value[0] = 15  # CIFAR-10: 0..9

    data, record = sample_copy(tmp_path)
    rewrite_record(record, 5, relabel)
    code, last, stderr = run_main(*TINY, f"--data_dir={data}", f"--model_dir={tmp_path / 'm'}")
    assert code == 4, stderr[-3000:]
    assert_one_line_error(stderr, last, "CorruptInputError")
    assert f"record 5 of {record} " in last, last
    assert "split 'train[:128]' of cifar10_jpeg" in last and "label 15" in last and "[0, 9]" in last, last


def test_missing_record_file_is_named_before_training(tmp_path):
    data, record = sample_copy(tmp_path)
    record.unlink()
    model_dir = tmp_path / "m"
    code, last, stderr = run_main(*TINY, f"--data_dir={data}", f"--model_dir={model_dir}")
    assert code == 2, stderr[-3000:]
    assert_one_line_error(stderr, last, "MissingDataFileError")
    assert str(record) in last and "prepare it again" in last, last
    assert not model_dir.exists()  # found while building the pipeline, not mid-epoch


def test_malformed_binding_is_named(tmp_path):
    code, last, stderr = run_main(*TINY, "--gin_param=train.epochs =", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "GinSyntaxError")
    assert "train.epochs =" in last and "name.param = value" in last


@pytest.mark.parametrize(
    "binding, named", [("train.eval_every = 0", "train.eval_every"), ("train.epochs = 'abc'", "train.epochs")]
)
def test_bad_train_value_is_refused_before_model_dir_is_written(tmp_path, binding, named):
    model_dir = tmp_path / "m"
    code, last, stderr = run_main(*TINY, f"--gin_param={binding}", f"--model_dir={model_dir}")
    assert code == 2
    assert_one_line_error(stderr, last, "ValueError")
    assert named in last and "integer >= 1" in last
    # Nothing written, so the corrected command can use the same model_dir.
    assert not (model_dir / "config.json").exists()


def fake_export(tmp_path):
    """A folder that looks like an export version (saved_model.pb present): the
    checks under test refuse it before anything would load it."""
    export_dir = tmp_path / "export" / "1"
    export_dir.mkdir(parents=True)
    (export_dir / "saved_model.pb").write_bytes(b"")
    return export_dir


def test_checkpoint_that_is_not_a_weights_file_is_named(tmp_path):
    export_dir = fake_export(tmp_path)
    code, last, stderr = run_main(*TINY, "--mode=export", f"--checkpoint={export_dir}", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "CheckpointError")
    assert "exported SavedModel" in last and "weights.h5" in last
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an HDF5 file")
    code, last, stderr = run_main(*TINY, "--mode=eval", f"--checkpoint={garbage}", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "CheckpointError")  # not a class-count error
    assert str(garbage) in last


def test_reid_evaluation_of_an_export_asks_for_weights(tmp_path):
    export_dir = fake_export(tmp_path)
    code, last, stderr = run_main(
        "--gin_file=gin/reid/market1501_mobilenet_dhm.gin", "--mode=eval",
        f"--checkpoint={export_dir}", f"--model_dir={tmp_path}",
    )
    assert code == 2
    assert_one_line_error(stderr, last, "CheckpointError")
    assert "embedding" in last and "weights" in last


def test_truncated_results_file_is_named(tmp_path):
    (tmp_path / "results.json").write_text('{"completed": true, "hist')
    code, last, stderr = run_main(*TINY, f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "RunFileError")
    assert str(tmp_path / "results.json") in last and "not valid JSON" in last
    assert "move it aside" in last and "without training again" in last  # advice that loses no work


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    from dhm_keras import models
    from dhm_keras.model import DHMModel

    checkpoint = tmp_path / "epoch_001.weights.h5"
    network = models.build("resnet32", 10, mode="dhm", input_shape=(32, 32, 3), blocks_per_stage=1)
    DHMModel(network, mode="dhm").save_weights(str(checkpoint))
    keras.backend.clear_session()
    payload = checkpoint.read_bytes()
    checkpoint.write_bytes(payload[: len(payload) // 2])  # a kill during the save
    code, last, stderr = run_main(*TINY, "--mode=eval", f"--checkpoint={checkpoint}", f"--model_dir={tmp_path}")
    assert code == 2
    assert_one_line_error(stderr, last, "CheckpointError")
    assert str(checkpoint) in last and "earlier" in last


def test_second_run_into_a_model_dir_in_use_stops_at_once(tmp_path):
    """Issue #18 item 3: another live run holds the lock; nothing is written."""
    import socket
    import subprocess
    import time

    holder = subprocess.Popen(["sleep", "600"])  # stands in for the first run
    lock = tmp_path / "run.lock"
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": time.time()}))
        code, last, stderr = run_main(*TINY, f"--model_dir={tmp_path}")
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, stderr[-3000:]
    assert_one_line_error(stderr, last, "ModelDirLockedError")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in last and str(lock) in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # not even config.json


def test_train_split_smaller_than_one_batch_is_refused_before_anything_is_written(tmp_path):
    """Issue #18 item 5: training batches drop the remainder, so 32 images in
    batches of 64 would train nothing and export an untrained model."""
    model_dir = tmp_path / "m"
    code, last, stderr = run_main(*TINY, "--gin_param=dataset.train_split = 'train[:32]'", f"--model_dir={model_dir}")
    assert code == 2, stderr[-3000:]
    assert_one_line_error(stderr, last, "TrainSplitTooSmallError")
    assert "'train[:32]'" in last and "32 examples" in last and "train.batch_size = 64" in last
    assert not model_dir.exists()


def test_full_disk_exits_2_without_a_partial_checkpoint(tmp_path):
    import shlex
    import subprocess
    import sys

    # `ulimit -f 2000`: no file may grow past 2,000 KiB. config.json, results.json and
    # the TensorBoard events stay below; the first checkpoint (~60 MB) cannot. The
    # full-size ResNet-32 matters: with its checkpoint, HDF5 writing straight to the
    # file segfaulted while its half-written objects were garbage-collected.
    args = [a for a in TINY if "model.overrides" not in a]
    cli = shlex.join([sys.executable, "-m", "dhm_keras.main", *args, f"--model_dir={tmp_path}"])
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f 2000; exec {cli}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_line_error(result.stderr, lines[-1], "OSError")
    assert "epoch_001.weights.h5" in lines[-1] and "re-run" in lines[-1], lines[-1]
    # Nothing under a checkpoint's name (and no temporary file) is left half-written.
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or sorted(p.name for p in checkpoints.iterdir()) == []


def real_checkpoint(tmp_path):
    """A checkpoint of the TINY configuration's model (weights and optimizer slots)."""
    from dhm_keras import models
    from dhm_keras.model import DHMModel

    checkpoint = tmp_path / "epoch_001.weights.h5"
    model = DHMModel(models.build("resnet32", 10, mode="dhm", input_shape=(32, 32, 3), blocks_per_stage=1), mode="dhm")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    model.save_weights(str(checkpoint))
    keras.backend.clear_session()
    return checkpoint


def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    checkpoint = real_checkpoint(tmp_path)
    size = checkpoint.stat().st_size
    with open(checkpoint, "r+b") as f:  # same size, one megabyte in the middle zeroed
        f.seek(size // 2)
        f.write(bytes(2**20))
    assert checkpoint.stat().st_size == size
    code, last, stderr = run_main(*TINY, "--mode=eval", f"--checkpoint={checkpoint}", f"--model_dir={tmp_path}")
    assert code == 2, stderr[-3000:]
    assert_one_line_error(stderr, last, "CheckpointError")
    assert str(checkpoint) in last and "damaged" in last, last


def test_unrelated_hdf5_file_is_a_checkpoint_error_not_a_class_count_error(tmp_path):
    import h5py
    import numpy as np

    foreign = tmp_path / "features.weights.h5"
    with h5py.File(foreign, "w") as f:
        f["embeddings"] = np.zeros((4, 8), "float32")
        f.create_group("labels")
    code, last, stderr = run_main(*TINY, "--mode=eval", f"--checkpoint={foreign}", f"--model_dir={tmp_path}")
    assert code == 2, stderr[-3000:]
    assert_one_line_error(stderr, last, "CheckpointError")
    assert str(foreign) in last and "embeddings" in last and "labels" in last, last


def test_nonfinite_validation_stops_the_run_and_no_epoch_counts_as_good(tmp_path):
    # At learning rate 1e4 epoch 1 ends with a finite training loss (~1e8) but a
    # NaN validation loss: the weights are broken although no step's loss was NaN.
    code, last, stderr = run_main(*TINY, "--gin_param=build_sgd.learning_rate = 1e4", f"--model_dir={tmp_path}")
    assert code == 3, stderr[-3000:]
    assert_one_line_error(stderr, last, "NonFiniteLossError")
    assert "validation loss" in last and "epoch 1" in last, last
    assert "Last good checkpoint: none" in last, last
    # The retry needs another learning rate, which this model_dir refuses: the
    # message says to start over and names a new directory.
    assert f"--model_dir={tmp_path}_retry" in last, last
    # The broken epoch was neither saved nor recorded (so it can be no "best").
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "export").exists()
