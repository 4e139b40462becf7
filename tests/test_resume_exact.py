"""A resumed run is the run it replaces: killed with SIGKILL during epoch 2 and
re-run, it ends with the weights of an uninterrupted run of the same command.

This needs every source of randomness after a resume to be what it would have
been: the weights, optimizer slots and step (backup), the Bernoulli masks
(seeded by epoch), and the data order and augmentation draws of each epoch,
which depend only on (train.seed, epoch).
"""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from conftest import REPO_ROOT

ARGS = [
    "--gin_file=gin/quickstart.gin",
    "--gin_param=dataset.train_split = 'train[:2048]'",
    "--gin_param=dataset.eval_split = 'test[:128]'",
    "--gin_param=model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
    "--gin_param=train.batch_size = 32",
    "--gin_param=train.epochs = 3",
    "--gin_param=train.deterministic = True",
    "--gin_param=train.verbose = 0",
    "--gin_param=mimicking.bernoulli_p = 0.5",
    "--gin_param=build_sgd.milestones = [2]",
]


def command(model_dir):
    return [sys.executable, "-m", "dhm_keras.main", *ARGS, f"--model_dir={model_dir}"]


def weights(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_sigkill_in_epoch_2_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_epoch = killed / "checkpoints" / "epoch_001.weights.h5"
    deadline = time.time() + 600
    while not (first_epoch.exists() and (killed / "backup").exists()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "training never finished epoch 1"
        time.sleep(0.05)
    time.sleep(1.0)  # into epoch 2 (an epoch takes several seconds)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert json.loads((killed / "results.json").read_text())["epochs_completed"] == 1

    resumed = subprocess.run(command(killed), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run(command(whole), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    final = "checkpoints/epoch_003.weights.h5"
    a, b = weights(killed / final), weights(whole / final)
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    history = [json.loads((d / "results.json").read_text())["history"] for d in (killed, whole)]
    assert [e["train"]["loss"] for e in history[0]] == [e["train"]["loss"] for e in history[1]]
