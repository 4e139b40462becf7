"""The model directory's one rule of "the same experiment", shared by resume and report."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

from dhm_keras import model_dir


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
