"""config.json records the whole recipe, so a model_dir refuses another one.

The optimizer (`build_sgd.*`) and the precision policy are bound on
`official` builders, outside the project's config dataclasses; a resumed run
with another learning rate would silently mix two recipes.
"""

import json

import gin
import pytest

from dhm_keras import errors, experiment, model_dir


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def current_config():
    return experiment.from_gin().to_json()


def write_config(model_dir, config):
    (model_dir / "config.json").write_text(json.dumps(config))


def test_optimizer_and_precision_are_recorded_with_their_defaults():
    gin.parse_config("build_sgd.learning_rate = 0.05\nbuild_sgd.milestones = (2, 4)")
    config = current_config()
    assert config["optimizer"]["learning_rate"] == 0.05
    assert config["optimizer"]["milestones"] == [2, 4]  # as json reads it back
    assert config["optimizer"]["momentum"] == 0.9  # an unbound default
    assert "steps_per_epoch" not in config["optimizer"]  # computed, not configured
    assert config["precision"] == {"policy": "float32"}


def test_another_learning_rate_or_precision_is_refused(tmp_path):
    write_config(tmp_path, current_config())
    gin.parse_config("build_sgd.learning_rate = 0.5")
    with pytest.raises(errors.ConfigMismatchError, match=r"optimizer.learning_rate: 0.1 -> 0.5"):
        model_dir.check_same_experiment(str(tmp_path), current_config())
    gin.clear_config()
    gin.parse_config("set_precision_policy.policy = 'mixed_float16'")
    with pytest.raises(errors.ConfigMismatchError, match=r"precision.policy: 'float32' -> 'mixed_float16'"):
        model_dir.check_same_experiment(str(tmp_path), current_config())


def test_xla_and_verbosity_may_change_and_older_configs_still_resume(tmp_path):
    write_config(tmp_path, current_config())
    gin.parse_config("train.jit_compile = False\ntrain.verbose = 2")
    model_dir.check_same_experiment(str(tmp_path), current_config())  # no error
    older = current_config()
    del older["optimizer"], older["precision"]  # written before they were recorded
    write_config(tmp_path, older)
    gin.parse_config("build_sgd.learning_rate = 0.5")
    model_dir.check_same_experiment(str(tmp_path), current_config())  # no error


def test_the_resolved_precision_policy_is_recorded_and_kept_on_resume():
    """`auto` resolves on this machine and config.json records the result; a run
    resumed elsewhere keeps the policy it started with."""
    import keras

    from dhm_keras import train_lib
    from dhm_keras.main import parse_gin
    from official.modeling import performance

    parse_gin(["gin/quickstart.gin"], [
        "set_precision_policy.policy = 'auto'", "model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
        "dataset.eval_split = 'test[:64]'",
    ])
    try:
        config = experiment.from_gin()
        assert config.to_json()["precision"] == {"policy": "auto"}  # as asked; resolved when built
        fresh = train_lib.build_experiment(config, training=False)
        expected, _ = performance.resolve_precision_policy("auto")
        assert fresh.config_json["precision"] == {"policy": "auto", "resolved": expected}
        # Resumed on a machine that would choose otherwise: the recorded choice wins.
        other = "float32" if expected == "mixed_bfloat16" else "mixed_bfloat16"
        resumed = train_lib.build_experiment(config, training=False, recorded_precision={"policy": "auto", "resolved": other})
        assert resumed.config_json["precision"]["resolved"] == other
        assert keras.mixed_precision.global_policy().name == other
        # An explicit policy is never overridden.
        explicit_config = config.with_resolved_precision({"policy": "float32"})
        explicit = train_lib.build_experiment(explicit_config, training=False, recorded_precision={"policy": "auto", "resolved": other})
        assert explicit.config_json["precision"] == {"policy": "float32", "resolved": "float32"}
    finally:
        keras.mixed_precision.set_global_policy("float32")
