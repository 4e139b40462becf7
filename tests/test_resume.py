"""A run killed mid-epoch resumes from its last finished epoch: none lost, none repeated."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import REPO_ROOT

ARGS = [
    "--gin_file=gin/quickstart.gin",
    # A small, quick variant: ResNet-8-sized network on 1,024 images, 4 epochs.
    "--gin_param=dataset.train_split = 'train[:1024]'",
    "--gin_param=model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
    "--gin_param=train.batch_size = 32",
    "--gin_param=train.verbose = 0",
    "--gin_param=mimicking.bernoulli_p = 0.5",
]


def command(model_dir):
    return [sys.executable, "-m", "dhm_keras.main", *ARGS, f"--model_dir={model_dir}"]


def epoch_steps(log_dir, tag):
    steps = []
    for name in sorted(os.listdir(log_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_sigkill_mid_epoch_then_rerun_finishes_every_epoch_once(tmp_path):
    model_dir = tmp_path / "run"
    process = subprocess.Popen(command(model_dir), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second_epoch_checkpoint = model_dir / "checkpoints" / "epoch_002.weights.h5"
    deadline = time.time() + 600
    while not second_epoch_checkpoint.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "training never reached epoch 2"
        time.sleep(0.2)
    time.sleep(2.0)  # well into epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    partial = json.loads((model_dir / "results.json").read_text())
    assert not partial["completed"] and partial["epochs_completed"] in (2, 3)

    result = subprocess.run(command(model_dir), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["completed"] and [e["epoch"] for e in results["history"]] == [1, 2, 3, 4]
    assert epoch_steps(model_dir / "logs" / "train", "epoch_loss") == [0, 1, 2, 3]
    assert epoch_steps(model_dir / "logs" / "validation", "epoch_top1/b0") == [0, 1, 2, 3]
    # The Bernoulli draw of each epoch depends on (seed, epoch) only, so the resumed
    # epochs used the same masks an uninterrupted run would have.
    from dhm_keras.model import sample_branch_mask

    for entry in results["history"]:
        mask = sample_branch_mask(0, entry["epoch"] - 1, ["b1", "b2"], 0.5)
        assert entry["train"]["active/b1"] == mask["b1"] and entry["train"]["active/b2"] == mask["b2"]
    assert (model_dir / "export" / "1" / "saved_model.pb").exists()


def test_backup_is_written_only_after_the_epoch_is_recorded(tmp_path, monkeypatch):
    """A kill between the backup and the record of an epoch must not skip that epoch
    (and, on the same run, `train.keep_checkpoints` prunes after the record).

    Spies on every backup save: by then the epoch's checkpoint and its
    results.json entry must exist (otherwise a resumed run would skip an epoch it
    never recorded and the run could never be "completed").
    """
    import gin
    import keras

    from dhm_keras import train_lib
    from dhm_keras.main import parse_gin

    model_dir = tmp_path / "run"
    seen = []
    save = keras.callbacks.BackupAndRestore.on_epoch_end

    def spy(self, epoch, logs=None):
        results = model_dir / "results.json"
        recorded = [e["epoch"] for e in json.loads(results.read_text())["history"]] if results.exists() else []
        checkpoint = model_dir / "checkpoints" / f"epoch_{epoch + 1:03d}.weights.h5"
        seen.append((epoch + 1, recorded, checkpoint.exists()))
        return save(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", spy)
    gin.clear_config()
    try:
        parse_gin(["gin/quickstart.gin"], [
            "dataset.train_split = 'train[:128]'", "dataset.eval_split = 'test[:64]'",
            "train.batch_size = 64", "train.epochs = 3", "train.verbose = 0",
            "model.overrides = {'blocks_per_stage': 1}", "train.keep_checkpoints = 1",
        ])
        results = train_lib.train(str(model_dir))
    finally:
        gin.clear_config()
    assert seen == [(1, [1], True), (2, [1, 2], True), (3, [1, 2, 3], True)]
    assert results["completed"]
    # train.keep_checkpoints = 1: the newest epoch's checkpoint and the best one's.
    kept = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
    assert kept == sorted({f"epoch_{results['best']['epoch']:03d}.weights.h5", "epoch_003.weights.h5"})


TINY = [
    "dataset.train_split = 'train[:128]'", "dataset.eval_split = 'test[:64]'",
    "train.batch_size = 64", "train.epochs = 2", "train.verbose = 0",
    "model.overrides = {'blocks_per_stage': 1}",
]


class Interrupted(Exception):
    """Stands in for a kill at the start of epoch 2."""


def train_tiny(model_dir):
    import gin

    from dhm_keras import train_lib
    from dhm_keras.main import parse_gin

    gin.clear_config()
    try:
        parse_gin(["gin/quickstart.gin"], TINY)
        return train_lib.train(str(model_dir))
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def stopped_after_epoch_1(tmp_path_factory):
    """A run stopped at the start of epoch 2: epoch 1's checkpoint, its results.json
    entry and a single backup copy (the second copy appears only after epoch 2)."""
    from dhm_keras.model import BernoulliBranchSampler

    model_dir = tmp_path_factory.mktemp("stopped") / "run"
    begin = BernoulliBranchSampler.on_epoch_begin

    def stop_at_epoch_2(self, epoch, logs=None):
        if epoch == 1:
            raise Interrupted()
        return begin(self, epoch, logs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BernoulliBranchSampler, "on_epoch_begin", stop_at_epoch_2)
        with pytest.raises(Interrupted):
            train_tiny(model_dir)
    assert sorted(p.name for p in (model_dir / "backup").iterdir()) == [
        "latest.weights.h5", "training_metadata.json"
    ]
    return model_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damaged, keras_written",
    [("latest.weights.h5", False), ("training_metadata.json", False), ("training_metadata.json", True)],
)
def test_truncated_backup_resumes_from_what_is_readable(stopped_after_epoch_1, tmp_path, caplog, damaged, keras_written):
    """After epoch 1 the backup has no second copy: a truncated file must fall back to
    epoch 1's checkpoint, with one logged line naming both files. The weights record
    their epoch, so a truncated training_metadata.json matters only for a backup
    written by Keras' own BackupAndRestore (no such record)."""
    import h5py

    model_dir = tmp_path / "run"
    shutil.copytree(stopped_after_epoch_1, model_dir)
    if keras_written:
        with h5py.File(model_dir / "backup" / "latest.weights.h5", "a") as f:
            f.attrs.pop("epoch", None)  # what Keras' BackupAndRestore writes: no epoch inside
    truncate(model_dir / "backup" / damaged)
    with caplog.at_level(logging.INFO, logger="absl"):
        results = train_tiny(model_dir)
    assert results["completed"] and [e["epoch"] for e in results["history"]] == [1, 2]
    # Epoch 1 was not trained again: TensorBoard holds each epoch once.
    assert epoch_steps(model_dir / "logs" / "train", "epoch_loss") == [0, 1]
    restored = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(restored) == 1 and "after epoch 1" in restored[0], restored
    fell_back = damaged == "latest.weights.h5" or keras_written
    assert (str(model_dir / "backup" / damaged) in restored[0]) == fell_back, restored
    used = model_dir / ("checkpoints/epoch_001.weights.h5" if fell_back else "backup/latest.weights.h5")
    assert f"resuming from {used}" in restored[0], restored


def test_unreadable_backup_and_checkpoints_name_the_files_and_the_fix(stopped_after_epoch_1, tmp_path):
    from dhm_keras.errors import CheckpointError

    model_dir = tmp_path / "run"
    shutil.copytree(stopped_after_epoch_1, model_dir)
    truncate(model_dir / "backup" / "latest.weights.h5")
    truncate(model_dir / "checkpoints" / "epoch_001.weights.h5")
    with pytest.raises(CheckpointError) as error:
        train_tiny(model_dir)
    message = str(error.value)
    assert str(model_dir / "backup" / "latest.weights.h5") in message
    assert str(model_dir / "checkpoints" / "epoch_001.weights.h5") in message
    assert "move " in message.lower() and str(model_dir / "backup") in message and "--model_dir" in message
