"""What later commands do with a finished run (issue #18 items 2, 7 and 10).

One tiny run (128 CIFAR-10 sample images, 2 epochs, a one-block-per-stage
ResNet) is trained once for the module; each test works on its own copy.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_RUN_ARGS, run_cli

TINY = TINY_RUN_ARGS


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(*TINY, f"--model_dir={model_dir}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def last_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result, error_class):
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result).startswith(f"error: {error_class}:"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_export_and_eval_refuse_a_configuration_the_run_was_not_trained_with(run, tmp_path):
    """Item 2: another normalisation would be served as the run's newest version."""
    stats = ["--gin_param=dataset.mean = (0.5, 0.5, 0.5)", "--gin_param=dataset.std = (1.0, 1.0, 1.0)"]
    result = run_cli(*TINY, *stats, "--mode=export", f"--model_dir={run}", timeout=600)
    assert_one_line_error(result, "ConfigMismatchError")
    assert "dataset.std: None -> [1.0, 1.0, 1.0]" in last_line(result)
    assert f"--gin_file={run / 'operative_config.gin'}" in last_line(result)
    assert sorted(os.listdir(run / "export")) == ["1"]
    # Scoring the run's checkpoint into another directory compares with the run it came from.
    elsewhere = tmp_path / "scores"
    checkpoint = run / "checkpoints" / "epoch_002.weights.h5"
    result = run_cli(*TINY, *stats, "--mode=eval", f"--checkpoint={checkpoint}", f"--model_dir={elsewhere}", timeout=600)
    assert_one_line_error(result, "ConfigMismatchError")
    assert "dataset.std" in last_line(result) and str(run) in last_line(result)
    assert not (elsewhere / "eval.json").exists()
    # The advised configuration is accepted, and what an evaluation scores may change.
    result = run_cli(
        f"--gin_file={run / 'operative_config.gin'}", "--gin_param=dataset.eval_split = 'test[:32]'",
        "--mode=eval", f"--model_dir={run}", timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == str(checkpoint)


def test_deleted_results_json_is_rebuilt_from_the_logs_and_not_trained_again(run):
    """Item 7: deleting results.json must not make a re-run retrain a finished run."""
    before = json.loads((run / "results.json").read_text())
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    event_files = sorted(os.listdir(run / "logs" / "train"))
    (run / "results.json").unlink()
    result = run_cli(*TINY, f"--model_dir={run}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Not trained again: same checkpoints, no new TensorBoard events.
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == checkpoints
    assert sorted(os.listdir(run / "logs" / "train")) == event_files
    after = json.loads((run / "results.json").read_text())
    assert after["completed"] and after["history"] == before["history"]
    assert after["best"] == before["best"] and after["last"] == before["last"]
    assert "rebuilt epochs 1, 2 from the TensorBoard logs" in result.stderr
    assert after["export"] == str(run / "export" / "1")  # the newest, not exported again


def without_write_permission(command, probe_dir):
    """`command` run so that file permissions bind it. Root ignores them: it
    then runs without the capabilities that override them (setpriv), or the
    test is skipped where that is not possible."""
    if os.geteuid() != 0:
        return command
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the permission override")
    probe = subprocess.run([*prefix, "touch", str(probe_dir / "probe")], capture_output=True)
    if probe.returncode == 0 or (probe_dir / "probe").exists():
        pytest.skip("cannot make file permissions bind a root process here")
    return [*prefix, *command]


def test_read_only_finished_run_is_one_line_not_a_traceback(run):
    """Item 10: a re-run by a user who may not write the finished run."""
    command = [sys.executable, "-m", "dhm_keras.main", *TINY, f"--model_dir={run}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        subprocess.run(["chmod", "-R", "a-w", str(run)], check=True)
        result = subprocess.run(
            without_write_permission(command, run), cwd=REPO_ROOT, capture_output=True, text=True,
            env=env, timeout=600,
        )
        assert_one_line_error(result, "ModelDirWriteError")
        assert str(run) in last_line(result)
        # Only export/ read-only (the directory itself writable): TensorFlow's own error at
        # export (--mode=export: a plain re-run has nothing new to export).
        subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)
        subprocess.run(["chmod", "a-w", str(run / "export")], check=True)
        result = subprocess.run(
            without_write_permission([*command, "--mode=export"], run / "export"), cwd=REPO_ROOT, capture_output=True,
            text=True, env=env, timeout=600,
        )
        assert_one_line_error(result, "ModelDirWriteError")
        assert str(run / "export") in last_line(result)
        assert not (run / "run.lock").exists()  # released on the error
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)
