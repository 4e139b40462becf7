"""Issue #16: runs a person can watch, disks that do not fill.

Unit tests of the progress lines, the step-level TensorBoard scalars and the
collapse check on synthetic logs, then one tiny CLI run (512 CIFAR-10 sample
images, 5 epochs of 8 steps, one block per stage) with stdout piped, as in a
log file: what it prints, what it keeps, what a re-run exports, and the
export's class names.
"""

import io
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_cli

from dhm_keras import config as cfg
from dhm_keras import progress
from dhm_keras.callbacks import MIN_COLLAPSE_CHECK_STEPS, CollapseGuard, collapse_guards
from dhm_keras.errors import TrainingCollapsedError


# -- units --------------------------------------------------------------------
def test_interval_means_are_the_means_of_the_steps_since_the_last_call():
    values = [9.0, 7.0, 2.0, 2.0, 2.0, 2.0]
    means, running = progress.IntervalMeans(), []
    for i, v in enumerate(values):
        running.append(np.mean(values[: i + 1]))
    assert means.update(1, {"loss": running[1]}, ["loss"]) == pytest.approx({"loss": 8.0})
    assert means.update(5, {"loss": running[5]}, ["loss"]) == pytest.approx({"loss": 2.0})
    means.reset()  # a new epoch: Keras restarted its means
    assert means.update(0, {"loss": 5.0}, ["loss"]) == pytest.approx({"loss": 5.0})


def fit_tiny(callback, epochs=2, steps=6):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.random.RandomState(0).rand(steps * 8, 4), np.zeros(steps * 8, int)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[callback])


def test_progress_to_a_log_file_is_whole_lines_at_the_interval():
    out = io.StringIO()
    fit_tiny(progress.ProgressLogger(8, every_steps=4, stream=out), epochs=2, steps=6)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # global steps 4 and 8 (epoch 2, step 2); step 12 ends epoch 2: its epoch line only.
    assert [l.split("  ")[:2] for l in lines if "step" in l] == [["epoch 1/2", "step 4/6"], ["epoch 2/2", "step 2/6"]]
    assert [l.split(":")[0] for l in lines if "done" in l] == ["epoch 1/2 done in 0s", "epoch 2/2 done in 0s"]
    assert all(k in lines[0] for k in ("loss ", "lr 0.01", "img/s", "ETA "))
    assert "ETA" in lines[1] and "ETA" not in lines[-1]  # the last epoch line has nothing left


def test_progress_in_a_terminal_rewrites_one_line_and_verbose_2_prints_epochs_only():
    out = io.StringIO()
    fit_tiny(progress.ProgressLogger(8, every_steps=1000, stream=out, terminal=True), epochs=1)
    assert out.getvalue().startswith("\r") and out.getvalue().count("\n") == 1
    out = io.StringIO()
    fit_tiny(progress.ProgressLogger(8, every_steps=1, verbose=2, stream=out), epochs=2)
    assert [l.split(" done")[0] for l in out.getvalue().splitlines()] == ["epoch 1/2", "epoch 2/2"]


class FakeModel:
    pass


def run_guard(guard, per_step, steps_per_epoch, first_epoch=0):
    """Feeds `guard` Keras-style running means of `per_step` [{metric: value}]."""
    guard.set_params({"steps": steps_per_epoch})
    sums, epoch = {}, first_epoch
    for index, values in enumerate(per_step):
        batch = index % steps_per_epoch
        if batch == 0:
            guard.on_epoch_begin(epoch if index == 0 else epoch + 1)
            epoch, sums = (epoch if index == 0 else epoch + 1), {}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        guard.on_train_batch_end(batch, {k: s / (batch + 1) for k, s in sums.items()})


def step(ce, top1, heads=("b0", "b1", "b2")):
    return {**{f"ce/{h}": ce for h in heads}, **{f"top1/{h}": top1 for h in heads}, "loss": 3 * ce}


def test_collapse_is_stopped_with_a_clear_error():
    # Diverges in the first steps (CE far above ln 10), then sits at the prior.
    steps = [step(25.0, 0.1)] * 5 + [step(math.log(10) + 0.01, 0.1)] * 35
    with pytest.raises(TrainingCollapsedError) as raised:
        run_guard(CollapseGuard(10, 128, check_step=40), steps, steps_per_epoch=40)
    message = str(raised.value)
    assert "steps 21-40" in message and "ln(10) = 2.303" in message
    assert "build_sgd.warmup_epochs" in message and "train.collapse_check_steps = 0" in message
    assert TrainingCollapsedError.exit_code == 3


@pytest.mark.parametrize("ce, top1", [(2.0, 0.25), (2.30, 0.2), (3.5, 0.1)])
def test_a_learning_or_still_diverging_run_goes_on(ce, top1):
    # (2.30, 0.2): near ln C but learning (top-1 twice chance); (3.5, 0.1): not at the prior.
    run_guard(CollapseGuard(10, 128, check_step=40), [step(ce, top1)] * 60, steps_per_epoch=40)


def test_one_learning_head_is_enough():
    steps = [{**step(2.303, 0.1), "ce/b0": 2.1, "top1/b0": 0.3}] * 40
    run_guard(CollapseGuard(10, 128, check_step=40), steps, steps_per_epoch=40)


def test_check_over_epochs_and_not_after_resuming_past_it():
    collapsed = [step(2.303, 0.1)] * 30
    with pytest.raises(TrainingCollapsedError):  # 3 epochs of 10 steps, checked at step 30
        run_guard(CollapseGuard(10, 128, check_step=30), collapsed, steps_per_epoch=10)
    run_guard(CollapseGuard(10, 128, check_step=30), collapsed, steps_per_epoch=10, first_epoch=3)


def test_check_setting():
    assert collapse_guards(0, 390, 100, 128) == []  # off
    assert collapse_guards(None, 390, 100, 128)[0].check_step == 390  # one epoch
    assert collapse_guards(None, 8, 10, 64)[0].check_step == MIN_COLLAPSE_CHECK_STEPS  # tiny epochs
    assert collapse_guards(50, 8, 10, 64)[0].check_step == 50
    for name, value in (("collapse_check_steps", -1), ("log_every_steps", 0), ("verbose", 3)):
        with pytest.raises(ValueError, match=f"train.{name}"):
            cfg.TrainConfig(**{name: value})
    assert cfg.TrainConfig().keep_checkpoints == 3


# -- one tiny run through the CLI ------------------------------------------------
EPOCHS = 5
TINY = [
    "--gin_file=gin/quickstart.gin",
    "--gin_param=dataset.train_split = 'train[:512]'",
    "--gin_param=dataset.eval_split = 'test[:256]'",
    "--gin_param=train.batch_size = 64",
    f"--gin_param=train.epochs = {EPOCHS}",
    "--gin_param=train.log_every_steps = 4",
    "--gin_param=model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("watchable") / "run"
    result = run_cli(*TINY, f"--model_dir={model_dir}", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return model_dir, result


def test_piped_output_is_a_few_plain_lines_per_epoch(tiny_run):
    _, result = tiny_run
    out = result.stdout
    assert "\r" not in out and "\x1b" not in out
    progress_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    # 8 steps an epoch, a line every 4 global steps: one step line and the epoch line.
    assert len(progress_lines) == 2 * EPOCHS, out
    assert sum(" done in " in l for l in progress_lines) == EPOCHS
    assert "eval loss" in progress_lines[1] and "top1/b0" in progress_lines[1]
    # Everything on stdout, the final result summary included: Keras' bar wrote ~0.8 KB a step.
    assert len(out.encode()) / EPOCHS < 1500, len(out.encode())


def scalars(log_dir):
    tags = {}
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value))
    return tags


def test_tensorboard_has_step_scalars_the_config_and_no_duplicates(tiny_run):
    model_dir, _ = tiny_run
    train = scalars(model_dir / "logs" / "train")
    for tag in ("step_loss", "step_learning_rate"):
        assert [s for s, _ in train[tag]] == list(range(4, 8 * EPOCHS + 1, 4)), tag
    for tag in ("step_steps_per_second", "step_images_per_second"):
        assert len(train[tag]) >= EPOCHS, tag  # not the first step of a process or an epoch
    text = tf.make_ndarray(train["operative_config"][0][1].tensor).item().decode()
    assert "train.epochs = 5" in text
    assert "epoch_top1/b0" in train
    validation = scalars(model_dir / "logs" / "validation")
    assert "epoch_top1/b0" in validation
    assert not [t for t in validation if t.startswith("evaluation_")]


def test_default_retention_keeps_the_newest_three_and_the_best(tiny_run):
    model_dir, _ = tiny_run
    results = json.loads((model_dir / "results.json").read_text())
    kept = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
    expected = {EPOCHS - 2, EPOCHS - 1, EPOCHS, results["best"]["epoch"]}
    assert kept == [f"epoch_{e:03d}.weights.h5" for e in sorted(expected)]


def test_export_serves_class_names(tiny_run):
    model_dir, _ = tiny_run
    import tensorflow_datasets as tfds

    names = tfds.builder("cifar10_jpeg", data_dir=str(REPO_ROOT / "quickstart_data")).info.features["label"].names
    assert names[:2] == ["airplane", "automobile"]
    export = model_dir / "export" / "1"
    assert (export / "assets" / "class_names.txt").read_text().splitlines() == names
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    served = tf.saved_model.load(str(export)).signatures["serving_default"](images=tf.constant(images))
    classes, served_names = served["classes"].numpy(), served["class_names"].numpy()
    assert served_names.shape == classes.shape == (4, 5)
    assert [[n.decode() for n in row] for row in served_names] == [[names[c] for c in row] for row in classes]


def test_rerun_adds_no_export_version_but_mode_export_does(tiny_run, tmp_path):
    import shutil

    model_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], model_dir)
    result = run_cli(*TINY, f"--model_dir={model_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(model_dir / "export")) == ["1"]
    assert json.loads((model_dir / "results.json").read_text())["export"] == str(model_dir / "export" / "1")
    source = json.loads((model_dir / "export" / "1" / "assets.extra" / "export_source.json").read_text())
    assert source["checkpoint"].endswith(f"epoch_{EPOCHS:03d}.weights.h5")
    result = run_cli(*TINY, "--mode=export", f"--model_dir={model_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(model_dir / "export")) == ["1", "2"]


def test_a_forced_collapse_stops_the_run(tmp_path):
    """lr 0.5 without warm-up: every head of the tiny DHM net ends at the prior in epoch 2."""
    result = run_cli(
        "--gin_file=gin/quickstart.gin",
        "--gin_param=dataset.train_split = 'train[:1280]'",  # 20 steps an epoch
        "--gin_param=dataset.eval_split = 'test[:256]'",
        "--gin_param=train.batch_size = 64",
        "--gin_param=train.epochs = 3",
        "--gin_param=model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
        "--gin_param=build_sgd.warmup_epochs = 0",
        "--gin_param=build_sgd.learning_rate = 0.5",
        "--gin_param=train.collapse_check_steps = 40",
        f"--model_dir={tmp_path}", timeout=600,
    )
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: TrainingCollapsedError: training collapsed: over steps 21-40"), last
    assert "build_sgd.warmup_epochs" in last
    # Stopped in epoch 2 before anything saved it.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_001.weights.h5"]
