"""A third task, defined here and nowhere else, trains through the CLI entry point.

`VehiclesVsAnimals` relabels CIFAR-10 into two classes (airplane, automobile,
ship, truck vs the six animals). It registers itself with the task factory on
import; the Gin file imports this module and names the task, and the trainer
(`dhm_keras.train_lib`) runs it without knowing it exists.
"""

import dataclasses
import json

import tensorflow as tf

from conftest import REPO_ROOT, run_cli
from dhm_keras.tasks import ImageClassificationTask
from official.core import task_factory

VEHICLES = (0, 1, 8, 9)  # CIFAR-10: airplane, automobile, ship, truck


@task_factory.register_task("vehicles_vs_animals")
class VehiclesVsAnimals(ImageClassificationTask):
    """Binary classification of a label derived from the dataset's own."""

    def read_dataset_info(self):
        return dataclasses.replace(super().read_dataset_info(), num_classes=2, class_names=("animal", "vehicle"))

    @staticmethod
    def relabel(images, labels):
        is_vehicle = tf.reduce_any(tf.equal(labels[:, None], tf.constant(VEHICLES, labels.dtype)), -1)
        return images, tf.cast(is_vehicle, tf.int32)

    def build_train_inputs(self, first_epoch=0):
        return super().build_train_inputs(first_epoch).map(self.relabel)

    def build_eval_inputs(self, raw_pixels=False):
        return super().build_eval_inputs(raw_pixels).map(self.relabel)


def test_a_task_defined_in_a_test_file_trains_through_the_cli(tmp_path):
    gin_file = tmp_path / "vehicles.gin"
    gin_file.write_text(
        "import test_custom_task\n"
        f"include '{REPO_ROOT / 'gin' / 'quickstart.gin'}'\n"
        "task.name = 'vehicles_vs_animals'\n"
        "dataset.train_split = 'train[:512]'\n"
        "dataset.eval_split = 'test[:256]'\n"
        "model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}\n"
        "train.epochs = 2\n"
        "train.batch_size = 64\n"
        "train.verbose = 0\n"
    )
    model_dir = tmp_path / "run"
    result = run_cli(
        f"--gin_file={gin_file}", f"--model_dir={model_dir}",
        env_extra={"PYTHONPATH": str(REPO_ROOT / "tests")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["completed"] and json.loads((model_dir / "config.json").read_text())["task"] == {
        "name": "vehicles_vs_animals"
    }
    # Two classes: no top-5 metric, and the served model answers with two logits.
    assert "top5/b0" not in results["last"] and 0.0 <= results["last"]["top1/b0"] <= 1.0
    served = tf.saved_model.load(str(model_dir / "export" / "1")).signatures["serving_default"]
    answer = served(images=tf.zeros((1, 32, 32, 3), tf.uint8))
    assert answer["logits"].shape == (1, 2)
    assert sorted(answer["class_names"].numpy()[0].tolist()) == [b"animal", b"vehicle"]
