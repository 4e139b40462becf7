"""Which epochs count as best or good, and how a weights file reaches the disk (no TensorFlow run)."""

import errno
import json
import math
import os

import pytest

from dhm_keras import model_dir
from dhm_keras.callbacks import NonFiniteLossGuard, ResultsWriter, good_checkpoints
from dhm_keras.errors import NonFiniteLossError


def test_an_epoch_with_a_nan_evaluation_is_never_best(tmp_path):
    writer = ResultsWriter(str(tmp_path), total_epochs=3)
    writer.on_epoch_end(0, {"loss": 2.0, "val_loss": 1.9, "val_top1/b0": 0.30})
    # Broken weights: NaN validation loss, yet a top-1 that beats epoch 1's.
    writer.on_epoch_end(1, {"loss": 3e22, "val_loss": math.nan, "val_top1/b0": 0.50})
    assert json.loads((tmp_path / "results.json").read_text())["best"]["epoch"] == 1
    writer.on_epoch_end(2, {"loss": 1.5, "val_loss": 1.4, "val_top1/b0": 0.40})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best"]["epoch"] == 3 and results["last"]["epoch"] == 3


def test_without_a_finite_epoch_there_is_no_best(tmp_path):
    writer = ResultsWriter(str(tmp_path), total_epochs=2)
    writer.on_epoch_end(0, {"loss": 9e7, "val_loss": math.nan, "val_top1/b0": 0.156})
    results = json.loads((tmp_path / "results.json").read_text())
    assert "best" not in results and results["last"]["epoch"] == 1


def recorded_run(tmp_path, evaluations):
    """checkpoints/epoch_NNN for each epoch, and results.json with the given eval losses."""
    (tmp_path / "checkpoints").mkdir()
    history = []
    for epoch, val_loss in enumerate(evaluations, start=1):
        (tmp_path / "checkpoints" / f"epoch_{epoch:03d}.weights.h5").write_bytes(b"w")
        history.append({"epoch": epoch, "train": {"loss": 1.0}, "eval": {"loss": val_loss, "top1/b0": 0.5}})
    (tmp_path / "results.json").write_text(json.dumps({"history": history}))
    return tmp_path / "checkpoints"


def test_last_good_checkpoint_is_the_newest_with_a_finite_evaluation(tmp_path):
    # Epoch 2 was recorded with a NaN evaluation (by an older version, which let it pass).
    checkpoint_dir = recorded_run(tmp_path, [1.2, math.nan])
    (checkpoint_dir / "epoch_003.weights.h5").write_bytes(b"w")  # saved, never recorded
    assert good_checkpoints(str(tmp_path)) == [(1, str(checkpoint_dir / "epoch_001.weights.h5"))]
    guard = NonFiniteLossGuard(str(checkpoint_dir))
    with pytest.raises(NonFiniteLossError) as error:
        guard.on_epoch_end(3, {"loss": 3e22, "val_loss": math.nan})
    message = str(error.value)
    assert "validation loss was nan after epoch 4" in message
    assert f"Last good checkpoint: {checkpoint_dir / 'epoch_001.weights.h5'} (epoch 1)" in message
    assert f"--model_dir={tmp_path}_retry" in message


def test_finite_validation_passes_the_guard(tmp_path):
    guard = NonFiniteLossGuard(str(recorded_run(tmp_path, [1.2])))
    guard.on_epoch_end(1, {"loss": 3e22, "val_loss": 4.0})  # large but finite: not the guard's call
    guard.on_epoch_end(1, {"loss": 1.0})  # an epoch without evaluation


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "latest.weights.h5"
    target.write_bytes(b"previous backup")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        model_dir.write_atomically(str(target), b"new weights" * 1000)
    assert target.read_bytes() == b"previous backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.weights.h5"]
