"""`train.keep_checkpoints`: the newest N epoch checkpoints and the best one stay."""

import json

import pytest

from dhm_keras import config as cfg
from dhm_keras.callbacks import CheckpointRetention


def make_run(tmp_path, epochs, best):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for epoch in epochs:
        (checkpoints / f"epoch_{epoch:03d}.weights.h5").write_bytes(b"w")
    (checkpoints / "notes.txt").write_text("not a checkpoint")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"best": {"epoch": best}}))
    return checkpoints, results


def test_keeps_newest_and_best(tmp_path):
    checkpoints, results = make_run(tmp_path, range(1, 8), best=2)
    CheckpointRetention(str(checkpoints), 3, str(results)).on_epoch_end(6)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch_002.weights.h5", "epoch_005.weights.h5", "epoch_006.weights.h5",
        "epoch_007.weights.h5", "notes.txt",
    ]


def test_best_among_the_newest_keeps_exactly_n(tmp_path):
    checkpoints, results = make_run(tmp_path, range(1, 5), best=4)
    CheckpointRetention(str(checkpoints), 2, str(results)).on_epoch_end(3)
    assert sorted(p.name for p in checkpoints.glob("*.h5")) == ["epoch_003.weights.h5", "epoch_004.weights.h5"]


@pytest.mark.parametrize("keep", [0, -1, 2.5, True, "3"])
def test_bad_values_are_refused(keep):
    with pytest.raises(ValueError, match="train.keep_checkpoints"):
        cfg.TrainConfig(keep_checkpoints=keep)


def test_epoch_checkpoints_are_numbered_not_sorted_as_text(tmp_path):
    from dhm_keras.model_dir import epoch_checkpoints
    from dhm_keras.model_dir import latest_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in ("epoch_999.weights.h5", "epoch_1000.weights.h5", "epoch_002.weights.h5.tmp", "notes.txt"):
        (checkpoints / name).write_bytes(b"w")
    assert sorted(epoch_checkpoints(str(checkpoints))) == [999, 1000]
    assert latest_checkpoint(str(tmp_path)) == str(checkpoints / "epoch_1000.weights.h5")
    assert epoch_checkpoints(str(tmp_path / "missing")) == {}
