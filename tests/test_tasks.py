"""The task registry and what the built-in tasks refuse or record."""

import dataclasses

import pytest

from dhm_keras import config as cfg
from dhm_keras import experiment, tasks
from dhm_keras.model import HEAD_ACCURACY


def config_for(**dataset):
    base = experiment.from_gin()
    return dataclasses.replace(base, dataset=dataclasses.replace(base.dataset, **dataset))


def test_unknown_task_names_the_registered_ones():
    config = dataclasses.replace(experiment.from_gin(), task=cfg.TaskConfig(name="segmentation"))
    with pytest.raises(ValueError, match="unknown task.name 'segmentation'.*image_classification.*person_reid"):
        tasks.get_task(config)


def test_a_reid_dataset_under_the_classification_task_says_which_task_to_set():
    with pytest.raises(ValueError, match="task.name = 'person_reid'"):
        tasks.get_task(config_for(name="market1501")).dataset_info()


def test_classification_ranks_by_the_main_heads_top1_and_records_every_head():
    scoring = tasks.get_task(config_for()).scoring
    assert scoring is HEAD_ACCURACY
    entry = {"top1/b0": 0.5, "top1/b1": 0.9, "top5/b2": 0.95, "loss": 1.0}
    assert scoring.score(entry) == 0.5
    assert scoring.pick({f"val_{k}": v for k, v in entry.items()}, prefix="val_") == {
        "top1/b0": 0.5, "top1/b1": 0.9, "top5/b2": 0.95,
    }
    reid = tasks.PersonReidTask.scoring
    assert reid.score({"rank1": 0.7, "top1/b0": 0.1}) == 0.7
