"""The command line as a person meets it: `--help`, the `--gin_bindings` alias,
"did you mean" for a misspelled binding, a quick start from another directory,
and a start-up without TensorFlow's noise."""

import json
import os
import subprocess
import sys

import gin
import pytest

from conftest import REPO_ROOT, run_cli
from dhm_keras.gin_utils import parse_gin
from official.common import startup

PROJECT_FLAGS = ("--gin_file", "--gin_param", "--gin_bindings", "--model_dir", "--mode", "--data_dir",
                 "--checkpoint", "--debug", "--verbosity")
TINY = [
    "--gin_bindings=train.epochs = 1",  # the t5x spelling: the quick start's 4 epochs become 1
    "--gin_param=model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
    "--gin_param=dataset.train_split = 'train[:128]'",
    "--gin_param=dataset.eval_split = 'test[:64]'",
    "--gin_param=train.batch_size = 64",
    "--gin_param=build_sgd.milestones = []",
]


def test_help_lists_the_project_flags_with_their_help():
    result = run_cli("--help", timeout=300)
    for flag in PROJECT_FLAGS:
        assert flag in result.stdout, f"{flag} missing from --help:\n{result.stdout}"
    assert "Gin config file(s), applied in order" in result.stdout
    assert "Alias for --gin_param" in result.stdout


@pytest.mark.parametrize("binding, suggestion", [
    ("train.epoch = 2", "train.epochs"),
    ("trian.epochs = 2", "train.epochs"),
    ("trian.epoch = 2", "train.epochs"),
    ("mimicking.temprature = 4.0", "mimicking.temperature"),
    ("build_sgd.learningrate = 0.1", "build_sgd.learning_rate"),
])
def test_misspelled_binding_suggests_the_nearest_name(binding, suggestion):
    gin.clear_config()
    try:
        with pytest.raises(ValueError, match=f"did you mean `{suggestion}`") as caught:
            parse_gin(["gin/quickstart.gin"], [binding])
        assert binding.split(" =")[0] in str(caught.value)  # Gin's own message is kept
    finally:
        gin.clear_config()


def test_misspelling_in_a_file_suggests_too_and_nothing_close_suggests_nothing(tmp_path):
    typo = tmp_path / "typo.gin"
    typo.write_text("include 'gin/quickstart.gin'\ndataset.eval_splt = 'test'\n")
    gin.clear_config()
    try:
        with pytest.raises(ValueError, match="did you mean `dataset.eval_split`"):
            parse_gin([str(typo)], [])
        gin.clear_config()
        with pytest.raises(ValueError) as caught:
            parse_gin(["gin/quickstart.gin"], ["zzzz.qqqq = 1"])
        assert "did you mean" not in str(caught.value)
    finally:
        gin.clear_config()


def test_cli_error_carries_the_suggestion_through_the_alias(tmp_path):
    result = run_cli("--gin_file=gin/quickstart.gin", "--gin_bindings=train.epohcs = 1",
                     f"--model_dir={tmp_path}", timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-3000:]
    assert last.startswith("error: ValueError:") and "did you mean `train.epochs`?" in last, last


def test_startup_filter_keeps_real_lines_once():
    text = "\n".join([
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796104124.457844   10052 port.cc:153] oneDNN custom operations are on.",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.",
        "E0000 00:00:1796104126.717115   10052 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        "W0000 00:00:1796104127.1   10052 something.cc:1] a real warning",
        "W0000 00:00:1796104128.2   10052 something.cc:1] a real warning",
        "Traceback (most recent call last):",
    ])
    assert startup.filter_startup_lines(text, cuda_driver=False) == [
        "W0000 00:00:1796104127.1   10052 something.cc:1] a real warning", "Traceback (most recent call last):"]
    # With a driver, failing to start CUDA is news: keep it.
    assert any("cuInit" in line for line in startup.filter_startup_lines(text, cuda_driver=True))


@pytest.fixture(scope="module")
def run_from_elsewhere(tmp_path_factory):
    """The quick start (shortened) from a directory that is not the repository
    root, as a user's shell has it: no TF_CPP_MIN_LOG_LEVEL (the tests' conftest sets one)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the checkout, as `pip install -e .` would provide it
    result = subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", "--gin_file=gin/quickstart.gin", "--model_dir=run", *TINY],
        cwd=cwd, capture_output=True, text=True, timeout=1200, env=env)
    return cwd, result


def test_quickstart_runs_from_another_directory(run_from_elsewhere):
    cwd, result = run_from_elsewhere
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((cwd / "run" / "results.json").read_text())
    assert results["epochs_completed"] == 1  # --gin_bindings reached Gin
    config = json.loads((cwd / "run" / "config.json").read_text())
    assert config["dataset"]["data_dir"] == str(REPO_ROOT / "quickstart_data")
    assert (cwd / "run" / "export" / "1" / "saved_model.pb").exists()


NOISE = {
    "absl pre-init warning": "absl::InitializeLog",
    "oneDNN banner": "oneDNN custom operations are on",
    "CUDA driver banner": "Could not find cuda drivers",
    "CPU instructions banner": "rebuild TensorFlow with the appropriate compiler flags",
    "TFDS INFO": "Load dataset info from",
    "TFDS INFO (split)": "Constructing tf.data.Dataset",
    "TF C++ INFO": "The default buffer size is",
}


def test_startup_is_quiet(run_from_elsewhere):
    _, result = run_from_elsewhere
    assert result.returncode == 0, result.stderr[-3000:]
    noisy = {name: line for name, needle in NOISE.items() for line in result.stderr.splitlines() if needle in line}
    if not startup.cuda_driver_present():
        noisy.update({"cuInit": l for l in result.stderr.splitlines() if "failed call to cuInit" in l})
    assert not noisy, f"start-up noise on stderr: {noisy}"


def test_no_keras_shuffle_warning(run_from_elsewhere):
    _, result = run_from_elsewhere
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`shuffle=True` was passed" not in result.stderr
