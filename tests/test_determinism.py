"""`train.deterministic = True` with a seed: two CPU runs give identical metrics and weights."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np

from conftest import REPO_ROOT

TINY = [
    "--gin_file=gin/quickstart.gin",
    "--gin_param=dataset.train_split = 'train[:192]'",
    "--gin_param=dataset.eval_split = 'test[:64]'",
    "--gin_param=train.batch_size = 64",
    "--gin_param=train.epochs = 1",
    "--gin_param=train.verbose = 0",
    "--gin_param=train.deterministic = True",
    "--gin_param=model.overrides = {'blocks_per_stage': 1}",
]


def train(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", *TINY, "--mode=train_and_eval", f"--model_dir={model_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((model_dir / "results.json").read_text())["history"]
    weights = {}
    with h5py.File(model_dir / "checkpoints" / "epoch_001.weights.h5") as f:
        f.visititems(lambda name, obj: weights.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return history, weights


def test_two_runs_are_identical(tmp_path):
    first_history, first_weights = train(tmp_path / "a")
    second_history, second_weights = train(tmp_path / "b")
    assert first_history == second_history  # every train and eval metric, bit for bit
    assert first_history[0]["eval"]  # evaluated, so the comparison covers eval metrics too
    assert sorted(first_weights) == sorted(second_weights) and len(first_weights) > 10
    for name, value in first_weights.items():
        np.testing.assert_array_equal(value, second_weights[name], err_msg=name)
