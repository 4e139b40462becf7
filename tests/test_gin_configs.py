"""Every Gin file parses with every binding known, and builds the model it names."""

import functools
from pathlib import Path

import gin
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT
from dhm_keras import config as cfg
from dhm_keras import models
from dhm_keras.main import parse_gin

GIN_FILES = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gin").rglob("*.gin"))
# Shared recipe fragments are included by experiments, not run on their own.
EXPERIMENTS = [f for f in GIN_FILES if not Path(f).stem.endswith("_recipe")]


@functools.lru_cache(maxsize=None)
def parameter_count(name, num_classes, branched):
    """Builds once per architecture (dsl and dhm build the same network)."""
    model = models.build(name, num_classes, mode="dhm" if branched else "baseline")
    return model.count_params(), sorted(model.output)


def test_table1_files_exist():
    for depth in (32, 110, 1202):
        for mode in ("baseline", "dsl", "dhm"):
            assert f"gin/cifar100/resnet{depth}_{mode}.gin" in GIN_FILES
    assert "gin/cifar100/resnet32_dhm_bernoulli.gin" in GIN_FILES
    assert "gin/quickstart.gin" in GIN_FILES


@pytest.mark.parametrize("gin_file", EXPERIMENTS)
def test_gin_file_parses_and_builds(gin_file):
    gin.clear_config()
    try:
        parse_gin([gin_file], [])
        model_cfg, dataset, train = cfg.ModelConfig(), cfg.DatasetConfig(), cfg.TrainConfig()
    finally:
        gin.clear_config()
    if "cifar100" in gin_file:
        stem = Path(gin_file).stem
        assert model_cfg.name == stem.split("_")[0] and model_cfg.mode == stem.split("_")[1]
        assert dataset.name == "cifar100" and train.epochs == 164 and train.batch_size == 128
    # The dataset name must be one TFDS knows (prepared or not) or a prepared local folder.
    assert dataset.name in tfds.list_builders() or (REPO_ROOT / (dataset.data_dir or "") / dataset.name).is_dir()
    count, heads = parameter_count(model_cfg.name, 100, model_cfg.mode != "baseline")
    assert heads == (["b0"] if model_cfg.mode == "baseline" else ["b0", "b1", "b2"])
    assert count > 0


def test_recipe_values_reach_the_optimizer():
    from official.modeling import optimization

    gin.clear_config()
    try:
        parse_gin(["gin/cifar100/resnet32_dhm_bernoulli.gin"], ["train.epochs = 3"])
        optimizer = optimization.build_sgd(steps_per_epoch=10)
        mimic, train = cfg.MimickingConfig(), cfg.TrainConfig()
    finally:
        gin.clear_config()
    sched = optimizer._learning_rate  # the schedule object (the public property evaluates it)
    assert sched.milestones == [81, 122] and sched.gamma == 0.1 and sched.initial_learning_rate == 0.1
    assert optimizer.l2 == 1e-4 and optimizer.momentum == 0.9
    assert mimic.bernoulli_p == 0.5 and train.epochs == 3


def test_unknown_binding_is_rejected_at_parse_time():
    gin.clear_config()
    try:
        with pytest.raises(ValueError, match="mimicking.alhpa"):
            parse_gin(["gin/quickstart.gin"], ["mimicking.alhpa = 2.0"])
    finally:
        gin.clear_config()
