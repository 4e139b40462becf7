"""The model directory's one rule of "the same experiment", shared by resume and
report; its atomic JSON; and its lock (one run at a time per directory)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from dhm_keras import model_dir
from dhm_keras.errors import ModelDirLockedError, RunFileError


def config(**train):
    return {
        "dataset": {"name": "cifar10", "data_dir": "/a", "cache": True},
        "train": {"epochs": 3, "seed": 0, "verbose": 1, "keep_checkpoints": None, **train},
    }


def test_execution_fields_may_differ_recipe_fields_may_not():
    assert model_dir.config_differences(config(), config(verbose=2, keep_checkpoints=3)) == []
    assert model_dir.config_differences(config(), config(epochs=4)) == ["train.epochs: 3 -> 4"]
    # The seed is part of the experiment for a resume, but not for grouping over seeds.
    assert model_dir.config_differences(config(), config(seed=1)) == ["train.seed: 0 -> 1"]
    assert model_dir.experiment_fields(config(), across_seeds=True) == model_dir.experiment_fields(
        config(seed=7), across_seeds=True
    )


def test_sections_an_older_run_did_not_record_are_not_compared():
    current = {**config(), "optimizer": {"learning_rate": 0.5}}
    assert model_dir.config_differences(config(), current) == []


def test_report_groups_by_the_same_rule():
    from dhm_keras.analysis import report

    assert report.IGNORED_FIELDS == model_dir.EXECUTION_FIELDS | model_dir.SEED_FIELDS


def test_atomic_json_round_trip_and_no_leftover(tmp_path):
    target = tmp_path / "results.json"
    model_dir.write_json_atomically(str(target), {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_imports_no_tensorflow():
    code = "import sys, dhm_keras.model_dir, dhm_keras.analysis.report; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_field_an_older_version_did_not_record_is_not_compared():
    older = {"mimicking": {"alpha": 1.0}}
    assert model_dir.config_differences(older, {"mimicking": {"alpha": 1.0, "graph": "all_pairs"}}) == []
    assert model_dir.config_differences(older, {"mimicking": {"alpha": 2.0, "graph": "all_pairs"}}) == [
        "mimicking.alpha: 1.0 -> 2.0"
    ]


def lock_file(directory, **holder):
    (directory / model_dir.LOCK_FILE).write_text(json.dumps(holder))


def test_lock_is_held_for_the_block_reentrant_and_released(tmp_path):
    with model_dir.locked(str(tmp_path)) as lock:
        holder = json.loads(open(lock).read())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with model_dir.locked(str(tmp_path)):  # training exports while it holds the lock
            pass
        assert os.path.exists(lock)
    assert not os.path.exists(lock)
    with pytest.raises(RuntimeError):
        with model_dir.locked(str(tmp_path)):
            raise RuntimeError("a failed run")
    assert not os.path.exists(lock)


def test_lock_of_a_live_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock_file(tmp_path, host=socket.gethostname(), pid=holder.pid, started=time.time())
        with pytest.raises(ModelDirLockedError) as refused:
            with model_dir.locked(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert str(tmp_path / model_dir.LOCK_FILE) in message
    assert json.loads((tmp_path / model_dir.LOCK_FILE).read_text())["pid"] == holder.pid  # left alone


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):  # our own PID, left by an earlier process (a restarted container)
        lock_file(tmp_path, host=socket.gethostname(), pid=pid, started=time.time() - 60)
        with model_dir.locked(str(tmp_path)) as lock:
            assert json.loads(open(lock).read())["started"] > time.time() - 30
        assert not os.path.exists(lock)


def test_lock_from_another_host_is_respected(tmp_path):
    lock_file(tmp_path, host="elsewhere.example", pid=os.getpid(), started=time.time())
    with pytest.raises(ModelDirLockedError, match=r"on host elsewhere\.example .*shut down.*delete"):
        with model_dir.locked(str(tmp_path)):
            pass


def test_unreadable_json_advice_loses_no_work(tmp_path):
    results = tmp_path / model_dir.RESULTS_FILE
    results.write_text('{"completed": tr')
    with pytest.raises(RunFileError, match="move it aside: the next run rebuilds it from the TensorBoard logs"):
        model_dir.read_json(str(results))
