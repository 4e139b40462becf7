"""Every Gin file parses with every binding known, and builds the model it names."""

import functools
from pathlib import Path

import gin
import keras
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT
from dhm_keras import config as cfg
from dhm_keras import models
from dhm_keras.data.reid import is_reid_dataset
from dhm_keras.main import parse_gin

GIN_FILES = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gin").rglob("*.gin"))
# Shared recipe fragments are included by experiments, not run on their own.
EXPERIMENTS = [f for f in GIN_FILES if not Path(f).stem.endswith("_recipe")]


# Recipes of docs/method.md, per family (the experiments' shared *_recipe.gin fragments).
RECIPES = {
    "cifar100/resnet": dict(dataset="cifar100", epochs=164, batch_size=128, learning_rate=0.1,
                            weight_decay=1e-4, milestones=[81, 122], gamma=0.1),
    "cifar100/wrn": dict(dataset="cifar100", epochs=200, batch_size=128, learning_rate=0.1,
                         weight_decay=5e-4, milestones=[60, 120, 160], gamma=0.2),
    "cifar100/densenet": dict(dataset="cifar100", epochs=300, batch_size=64, learning_rate=0.1,
                              weight_decay=1e-4, milestones=[150, 225], gamma=0.1),
    "imagenet/resnet": dict(dataset="imagenet2012", epochs=90, batch_size=256,
                            learning_rate=0.1, weight_decay=1e-4, milestones=[30, 60],
                            gamma=0.1, image_size=[224, 224]),
}
MODE_NAMES = ("baseline", "dsl", "dhm")
# Recipes outside the paper's tables: the CPU demonstration and re-identification.
OTHER_RECIPES = {"gin/demo/noisy5k_recipe.gin", "gin/reid/reid_recipe.gin", "gin/import/authors_cifar_recipe.gin"}


def recipe_of(gin_file):
    """`gin/<dir>/<family><...>.gin` -> its RECIPES key, or None (e.g. quickstart)."""
    path = Path(gin_file)
    for key in RECIPES:
        folder, family = key.split("/")
        if path.parent.name == folder and path.stem.startswith(family):
            return key
    return None


def parse_stem(stem):
    """"wrn28_10_dropout_dhm" -> ("wrn2810", "dhm", {"dropout"}): the model part without
    separators, the mode, and the variant words around the mode."""
    words = stem.split("_")
    at = max(i for i, w in enumerate(words) if w in MODE_NAMES)
    variants = {w for w in words[at + 1:]} | ({"dropout"} & set(words[:at]))
    model_words = [w for w in words[:at] if w not in variants]
    return "".join(model_words), words[at], variants


@functools.lru_cache(maxsize=3)  # files of one model are adjacent; dsl and dhm share a build
def built_model(name, branched, overrides, input_shape):
    return models.build(name, 100, mode="dhm" if branched else "baseline",
                        input_shape=input_shape, **dict(overrides))


def test_table1_files_exist():
    for depth in (32, 110, 1202):
        for mode in ("baseline", "dsl", "dhm"):
            assert f"gin/cifar100/resnet{depth}_{mode}.gin" in GIN_FILES
    assert "gin/cifar100/resnet32_dhm_bernoulli.gin" in GIN_FILES
    assert "gin/quickstart.gin" in GIN_FILES


def test_tables_2_to_4_files_exist():
    for mode in MODE_NAMES:
        for stem in ("densenet40_12", "densenet100_12", "densenet_bc100_12", "wrn16_8",
                     "wrn28_10", "wrn28_10_dropout"):
            assert f"gin/cifar100/{stem}_{mode}.gin" in GIN_FILES
        for depth in (18, 34, 50, 101, 152):
            assert f"gin/imagenet/resnet{depth}_{mode}.gin" in GIN_FILES
    assert "gin/imagenet/resnet18_dhm_b3.gin" in GIN_FILES
    assert {f for f in GIN_FILES if Path(f).stem.endswith("_recipe")} == {
        f"gin/{key}_recipe.gin" for key in RECIPES
    } | OTHER_RECIPES


def test_corrupt_label_reid_and_demo_files_exist():
    for mode in ("baseline", "dhm"):
        for rate in (20, 50):
            assert f"gin/cifar100/wrn28_10_{mode}_noise{rate}.gin" in GIN_FILES
    for mode in MODE_NAMES:
        for dataset in ("market1501", "dukemtmc"):
            assert f"gin/reid/{dataset}_mobilenet_{mode}.gin" in GIN_FILES
        assert f"gin/demo/noisy5k_resnet32_{mode}.gin" in GIN_FILES


@pytest.mark.parametrize("gin_file", EXPERIMENTS)
def test_gin_file_parses_and_builds(gin_file):
    from official.modeling import optimization

    gin.clear_config()
    try:
        parse_gin([gin_file], [])
        model_cfg, dataset, train = cfg.ModelConfig(), cfg.DatasetConfig(), cfg.TrainConfig()
        optimizer = optimization.build_sgd(steps_per_epoch=10)
    finally:
        gin.clear_config()
    overrides = dict(model_cfg.overrides or {})
    recipe = recipe_of(gin_file)
    if recipe is not None:
        stem_model, stem_mode, variants = parse_stem(Path(gin_file).stem)
        assert stem_model == model_cfg.name.replace("_", "") and stem_mode == model_cfg.mode
        assert ("dropout" in variants) == ("dropout" in overrides)
        want = RECIPES[recipe]
        sched = optimizer._learning_rate  # the schedule object
        assert dataset.name == want["dataset"]
        assert train.epochs == want["epochs"] and train.batch_size == want["batch_size"]
        assert sched.initial_learning_rate == want["learning_rate"]
        assert sched.milestones == want["milestones"] and sched.gamma == want["gamma"]
        assert optimizer.l2 == want["weight_decay"] and optimizer.momentum == 0.9
        assert optimizer.nesterov is False and sched.warmup_epochs == 0
        assert (list(dataset.image_size) if dataset.image_size else None) == want.get("image_size")
        noise = [v for v in variants if v.startswith("noise")]
        assert dataset.label_noise == (int(noise[0][5:]) / 100 if noise else 0.0)
    # The dataset name must be one TFDS knows (prepared or not) or a prepared local folder.
    assert (
        dataset.name in tfds.list_builders()
        or is_reid_dataset(dataset.name)
        or (REPO_ROOT / (dataset.data_dir or "") / dataset.name).is_dir()
    )
    input_shape = (*dataset.image_size, 3) if dataset.image_size else None
    branched = model_cfg.mode != "baseline"
    model = built_model(model_cfg.name, branched, tuple(sorted(overrides.items())), input_shape)
    spec = models.with_overrides(models.get_spec(model_cfg.name), **overrides)
    heads = ["b0"] + ([b.name for b in spec.branches] if branched else [])
    assert sorted(model.output) == sorted(heads) and model.count_params() > 0
    if input_shape:
        assert tuple(model.input.shape[1:]) == input_shape
    if "dropout" in overrides:  # the override reaches every block of every built head
        rates = [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)]
        stages = spec.stages + (tuple(s for b in spec.branches for s in b.stages) if branched else ())
        assert rates == [overrides["dropout"]] * sum(s.blocks for s in stages)


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
