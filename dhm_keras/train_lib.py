"""The generic runner: experiment config -> task -> DHM model -> fit -> results -> export.

It knows the DHM training model, the model directory and the order of a
run, and nothing about any dataset: everything data- or evaluation-specific
comes from the task that `config.task.name` names (`dhm_keras.tasks`, any
class registered with `official.core.task_factory`). Configuration comes in
as one frozen `dhm_keras.experiment.ExperimentConfig`, read from Gin once by
the caller. The model directory's layout and rules are `dhm_keras.model_dir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Optional

import gin
import keras
import tensorflow as tf
from absl import logging

from dhm_keras import callbacks as dhm_callbacks
from dhm_keras import checkpoints as dhm_checkpoints
from dhm_keras import experiment as experiment_lib
from dhm_keras import errors
from dhm_keras import model_dir as model_dir_lib
from dhm_keras.models import specs as specs_lib
from dhm_keras import progress
from dhm_keras import pytorch_import
from dhm_keras import run_history
from dhm_keras import tasks
from dhm_keras.data.input_errors import input_errors_are_clear
from dhm_keras.gradient_consistency import GradientConsistency
from dhm_keras.model import BernoulliBranchSampler, DHMModel
from official.common import distribute
from official.core import export as export_lib
from official.modeling import optimization, performance


@dataclasses.dataclass
class Experiment:
    """Everything built for a run; returned so scripts and tests can inspect it."""

    config: experiment_lib.ExperimentConfig
    task: object
    strategy: tf.distribute.Strategy
    model: DHMModel
    image_shape: tuple
    eval_ds: Optional[tf.data.Dataset]

    @property
    def config_json(self) -> dict:
        return self.config.to_json()


def resolve_config(config: Optional[experiment_lib.ExperimentConfig], data_dir: Optional[str]):
    """`config`, or the one the parsed Gin files define (`--data_dir` applied)."""
    return config if config is not None else experiment_lib.from_gin(data_dir)


def build_experiment(
    config: experiment_lib.ExperimentConfig,
    training: bool = True,
    recorded_precision: Optional[dict] = None,
    reads_records: bool = True,
) -> Experiment:
    """Strategy, the task's evaluation data and network, and the compiled DHM model.

    The training stream is built by `train` once the backup is restored: it
    starts at the restored epoch, so a resumed run reads the epochs it has
    not finished in the order an uninterrupted run would have read them.
    `reads_records=False` (an import): no data is opened, and the dataset
    need not be prepared where the task knows its metadata without it.
    """
    train = config.train
    keras.utils.set_random_seed(train.seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.get_strategy()
    # After the strategy (TPUs are visible only then); a resumed "auto" run
    # keeps the policy it started with (`recorded_precision`, from config.json).
    config = config.with_resolved_precision(
        performance.apply_precision_policy(config.precision_args["policy"], recorded_precision)
    )
    task = tasks.get_task(config) if reads_records else tasks.get_task(config).without_records()
    task.dataset_info()  # a missing dataset or a class-count mismatch fails first
    if reads_records:
        task.check_inputs(training)  # so do missing record files: nothing is written yet
    image_shape = task.image_shape()
    steps_per_epoch = task.steps_per_epoch() if training else 1
    eval_ds = task.build_eval_inputs() if reads_records else None
    mimic = config.mimicking
    with strategy.scope():
        model = DHMModel(
            task.build_network(image_shape),
            mode=config.model.mode,
            temperature=mimic.temperature,
            alpha=mimic.alpha,
            epsilon=mimic.epsilon,
            bernoulli_p=mimic.bernoulli_p,
            label_smoothing=train.label_smoothing,
            graph=mimic.graph,
        )
        model.compile(
            optimizer=optimization.build_sgd(steps_per_epoch=steps_per_epoch, **config.optimizer_args),
            jit_compile=performance.resolve_jit_compile(train.jit_compile, strategy),
        )
    return Experiment(config, task, strategy, model, image_shape, eval_ds)


def _recorded_precision(model_dir: str) -> Optional[dict]:
    """The precision section of the run already in `model_dir`, if any."""
    config_path = model_dir_lib.path(model_dir, model_dir_lib.CONFIG_FILE)
    if not os.path.exists(config_path):
        return None
    return model_dir_lib.read_json(config_path).get("precision")


def evaluation_epochs(epochs: int, every: int) -> list:
    """1-based epochs after which to evaluate: every `every`-th, and the last."""
    if every < 1:
        raise ValueError(f"train.eval_every must be >= 1, got {every}")
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})


def locked_if_chief(model_dir: str, strategy: tf.distribute.Strategy):
    """The model directory's lock (`model_dir.locked`) for the chief; nothing for
    the other workers of a multi-worker run, which write nothing there."""
    if distribute.is_chief(strategy):
        return model_dir_lib.locked(model_dir)
    return contextlib.nullcontext()


def train(
    model_dir: str,
    data_dir: Optional[str] = None,
    evaluate: bool = True,
    config: Optional[experiment_lib.ExperimentConfig] = None,
) -> dict:
    """Trains (resuming if a backup exists), writes results.json, exports b0.

    The chief holds the model directory's lock from before its first write
    until it returns, so a second run into the same directory stops at once.
    """
    config = resolve_config(config, data_dir)
    model_dir_lib.check_same_experiment(model_dir, config.to_json())
    exp = build_experiment(config, training=True, recorded_precision=_recorded_precision(model_dir))
    with locked_if_chief(model_dir, exp.strategy):
        return _train(exp, model_dir, evaluate, distribute.is_chief(exp.strategy))


def _train(exp: Experiment, model_dir: str, evaluate: bool, chief: bool) -> dict:
    train_cfg, config_json = exp.config.train, exp.config_json
    path = lambda name: model_dir_lib.path(model_dir, name)  # noqa: E731
    os.makedirs(model_dir, exist_ok=True)
    results = run_history.load_results(
        model_dir, train_cfg.epochs, config_json, write=chief, scoring=exp.task.scoring
    )
    if results.get("completed"):
        logging.info("%s already holds a finished run; nothing to train.", model_dir)
        if not chief:
            return {}
        exported = export_unless_current(exp, model_dir)
        results["export"] = exported["export"]  # the newest version, as after training
        model_dir_lib.write_json_atomically(path(model_dir_lib.RESULTS_FILE), results)
        return {**results, **exported}
    if chief:
        model_dir_lib.write_json_atomically(path(model_dir_lib.CONFIG_FILE), config_json)
        with open(path(model_dir_lib.OPERATIVE_GIN_FILE), "w") as f:
            f.write(gin.config_str())

    # Restored before the data stream is built, which starts at the restored
    # epoch; first in the list, and its epoch-end save comes last
    # (backup.save_point() below). A non-chief worker backs up to a private
    # copy, never into model_dir.
    backup = dhm_callbacks.BackupAndRestore(
        distribute.worker_backup_dir(path(model_dir_lib.BACKUP_DIR), exp.strategy),
        model_dir=model_dir,
        double_checkpoint=True,
    )
    with exp.strategy.scope():
        exp.model.optimizer.build(exp.model.trainable_variables)
    # Across workers each builds its own share (distribute.train_inputs).
    train_ds = distribute.train_inputs(exp.strategy, exp.task.build_train_inputs, backup.restore(exp.model))
    checkpoint_dir = path(model_dir_lib.CHECKPOINT_DIR)
    callbacks = [backup, BernoulliBranchSampler(train_cfg.seed), dhm_callbacks.NonFiniteLossGuard(checkpoint_dir)]
    callbacks += dhm_callbacks.collapse_guards(
        train_cfg.collapse_check_steps, exp.task.steps_per_epoch(), exp.task.dataset_info().num_classes,
        train_cfg.batch_size, checkpoint_dir,
    )
    if evaluate:  # before the writers, so that they see the task's val_ metrics
        callbacks += exp.task.evaluation_callbacks(train_cfg.eval_every)
    every = train_cfg.log_every_steps
    callbacks.append(progress.ProgressLogger(
        train_cfg.batch_size, every, train_cfg.verbose,
        eval_metrics=(*progress.EVAL_METRICS, *exp.task.scoring.score_metrics, *exp.task.scoring.result_metrics),
    ))
    if chief:
        log_dir = path(model_dir_lib.LOG_DIR)
        callbacks += [
            dhm_checkpoints.EpochCheckpoint(checkpoint_dir),
            progress.EpochTensorBoard(log_dir, update_freq="epoch"),
            progress.StepSummaries(os.path.join(log_dir, "train"), train_cfg.batch_size, every, gin.config_str()),
            dhm_callbacks.ResultsWriter(model_dir, train_cfg.epochs, config_json, exp.task.scoring),
        ]
        if train_cfg.keep_checkpoints:
            callbacks.append(dhm_callbacks.CheckpointRetention(
                checkpoint_dir, train_cfg.keep_checkpoints, path(model_dir_lib.RESULTS_FILE)
            ))
        callbacks += diagnostics_callbacks(exp, model_dir)
    callbacks.append(backup.save_point())
    validation = exp.eval_ds if evaluate else None
    with input_errors_are_clear("training or evaluation"), \
            distribute.lost_workers_raise(exp.strategy, errors.WorkerLostError):
        exp.model.fit(
            train_ds,
            epochs=train_cfg.epochs,
            steps_per_epoch=exp.task.steps_per_epoch(),
            validation_data=distribute.shard_by_data(validation) if validation is not None else None,
            validation_freq=evaluation_epochs(train_cfg.epochs, train_cfg.eval_every),
            callbacks=callbacks,
            verbose=0,  # progress.ProgressLogger prints instead of Keras' per-step bar
            shuffle=False,  # each epoch is already permuted by (seed, epoch): data/epochs.py
        )
    if not chief:
        return {}
    results = model_dir_lib.read_json(path(model_dir_lib.RESULTS_FILE))
    results["export"] = export_main_branch(exp, model_dir, model_dir_lib.latest_checkpoint(model_dir))
    model_dir_lib.write_json_atomically(path(model_dir_lib.RESULTS_FILE), results)
    return results


def diagnostics_callbacks(exp: Experiment, model_dir: str) -> list:
    """Chief-only measurements that leave training unchanged (`diagnostics.*`)."""
    every = exp.config.diagnostics.gradient_consistency_every
    if every <= 0 or not exp.model.branches:
        return []
    if distribute.is_multi_worker(exp.strategy):
        # A chief-only callback must not run computations the other workers do
        # not join (collectives would hang): measure on one machine.
        logging.warning("diagnostics.gradient_consistency_every is ignored under multi-worker training")
        return []
    probe = exp.eval_ds if exp.eval_ds is not None else exp.task.build_train_inputs()
    log_dir = os.path.join(model_dir_lib.path(model_dir, model_dir_lib.LOG_DIR), "train")
    return [GradientConsistency(probe.take(1), every_n_steps=every, log_dir=log_dir)]


def _restore(exp: Experiment, model_dir: str, checkpoint: Optional[str]) -> str:
    """Loads `checkpoint` (default: the newest in model_dir); see `checkpoints.load` for the errors."""
    info, model = exp.task.dataset_info(), exp.config.model
    return dhm_checkpoints.load(
        exp.model,
        checkpoint or model_dir_lib.latest_checkpoint(model_dir),
        strategy=exp.strategy,
        expected=f"model {model.name} ({model.mode}) with {info.num_classes} classes of dataset {info.name}",
        model_dir=model_dir,
    )


def evaluate(
    model_dir: str,
    data_dir: Optional[str] = None,
    checkpoint: Optional[str] = None,
    config: Optional[experiment_lib.ExperimentConfig] = None,
) -> dict:
    """Scores a checkpoint with the task's evaluation; writes model_dir/eval.json.

    `checkpoint` may be a `.weights.h5` file (every head is scored) or an
    export directory `<model_dir>/export/<version>` (the served B0 is scored
    through the export's own preprocessing). Default: the latest checkpoint.
    It takes no lock: evaluating a run while it trains is normal, and
    eval.json is replaced atomically.
    """
    config = resolve_config(config, data_dir)
    model_dir_lib.check_run_config(model_dir, config.to_json(), checkpoint, "evaluate")
    if export_lib.is_saved_model(checkpoint):
        result = tasks.get_task(config).evaluate_export(checkpoint)
    else:
        exp = build_experiment(config, training=False, recorded_precision=_recorded_precision(model_dir))
        checkpoint = _restore(exp, model_dir, checkpoint)
        with input_errors_are_clear("evaluation"):
            # Keras' verbose=2: one line at the end, no per-batch bar.
            metrics = exp.task.evaluate(exp.model, verbose=2 if config.train.verbose else 0)
        result = {"checkpoint": checkpoint, "metrics": {k: float(v) for k, v in metrics.items()}}
    with model_dir_lib.writing(model_dir):
        os.makedirs(model_dir, exist_ok=True)
        model_dir_lib.write_json_atomically(model_dir_lib.path(model_dir, model_dir_lib.EVAL_FILE), result)
    return result


def export_main_branch(
    exp: Experiment, model_dir: str, checkpoint: Optional[str] = None, recorded_path: Optional[str] = None
) -> str:
    """SavedModel of b0 only, preprocessing inside, under model_dir/export/<version>.

    `checkpoint` is the file the model's weights came from; the export
    records it (`model_dir.export_source`, under `recorded_path` if given)
    so that a re-run of the finished command can tell that it has nothing
    new to export.

    TensorFlow reports a directory it may not write to (or a full disk) as an
    OpError with a traceback; it becomes one `ModelDirWriteError` line.
    """
    export_dir = model_dir_lib.path(model_dir, model_dir_lib.EXPORT_DIR)
    try:
        return export_lib.export_image_classifier(
            exp.model.main_branch(),
            export_dir,
            exp.image_shape,
            preprocess=exp.task.serving_preprocess(),
            decode=exp.task.serving_decode(exp.image_shape[:2]),
            class_names=exp.task.class_names(),
            extra_files={
                model_dir_lib.EXPORT_SOURCE_FILE: json.dumps(model_dir_lib.export_source(checkpoint, recorded_path))
            }
            if checkpoint else None,
        )
    except (tf.errors.PermissionDeniedError, tf.errors.ResourceExhaustedError) as e:
        if isinstance(e, tf.errors.ResourceExhaustedError) and "space" not in e.message.lower():
            raise  # out of memory, not out of disk
        raise errors.ModelDirWriteError(
            f"cannot write the export under {export_dir} ({e.message.splitlines()[0]}); "
            "use a --model_dir you can write to (copy a run that is not yours), or fix its "
            "permissions or free space"
        ) from e


def export(
    model_dir: str,
    data_dir: Optional[str] = None,
    checkpoint: Optional[str] = None,
    experiment: Optional[Experiment] = None,
    config: Optional[experiment_lib.ExperimentConfig] = None,
) -> dict:
    """Exports b0 from a checkpoint (default: the latest in model_dir).

    The configuration must be the run's (`model_dir.check_run_config`):
    another one would serve the weights with, say, another normalisation as
    this run's newest version. The chief holds the model directory's lock
    while it writes (re-entrant: training calls this with the lock held).
    """
    config = experiment.config if experiment else resolve_config(config, data_dir)
    model_dir_lib.check_run_config(model_dir, config.to_json(), checkpoint, "export")
    exp = experiment or build_experiment(config, training=False, recorded_precision=_recorded_precision(model_dir))
    with locked_if_chief(model_dir, exp.strategy):
        checkpoint = _restore(exp, model_dir, checkpoint)
        return {"checkpoint": checkpoint, "export": export_main_branch(exp, model_dir, checkpoint)}


def export_unless_current(exp: Experiment, model_dir: str) -> dict:
    """What a re-run of a finished command exports: nothing when the newest
    version was made from the bytes of the newest checkpoint (each re-run
    used to add an identical version); otherwise a new version, as `export`.
    `--mode=export` always writes one."""
    checkpoint, newest = model_dir_lib.latest_checkpoint(model_dir), model_dir_lib.newest_export(model_dir)
    if checkpoint and newest:
        recorded = model_dir_lib.exported_from(newest).get("sha256")
        if recorded and recorded == model_dir_lib.file_sha256(checkpoint):
            logging.info("%s was exported from %s already; not exporting again (--mode=export does)", newest, checkpoint)
            return {"checkpoint": checkpoint, "export": newest}
    return export(model_dir, experiment=exp)


def import_checkpoint(
    model_dir: str,
    checkpoint: Optional[str],
    config: Optional[experiment_lib.ExperimentConfig] = None,
    data_dir: Optional[str] = None,
) -> dict:
    """Converts a checkpoint of the authors' PyTorch code into a run of this trainer.

    Writes `model_dir` whole or not at all: config.json, the converted
    weights as `checkpoints/epoch_000.weights.h5`, the backup (so that
    `--mode=train` here continues from them, as epoch 0 of this run),
    import.json (where they came from) and B0's export, all in a staging
    directory beside it that is renamed into place once everything is
    written. A model_dir that holds anything is refused.
    """
    config = resolve_config(config, data_dir)
    if not checkpoint:
        raise errors.CheckpointImportError(
            "--mode=import needs --checkpoint=<file.pth or file.pth.tar> (a checkpoint of the reference PyTorch code)"
        )
    model_dir = os.path.abspath(model_dir)
    parent = os.path.dirname(model_dir)
    if os.path.exists(model_dir) and not (os.path.isdir(model_dir) and not os.listdir(model_dir)):
        raise errors.ConfigMismatchError(
            f"model_dir {model_dir} is {'not empty' if os.path.isdir(model_dir) else 'a file'}; "
            "import into a new --model_dir (an import starts a run)"
        )
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise errors.ModelDirWriteError(f"cannot create --model_dir {model_dir}: {parent} is a file")
    model_cfg = config.model
    spec = specs_lib.resolve(model_cfg.name, **(model_cfg.overrides or {}))
    pytorch_import.naming_for(spec)  # a network the reference never defined fails first
    source = pytorch_import.read_checkpoint(checkpoint)  # before anything is built or written
    exp = build_experiment(config, training=False, reads_records=False)
    with exp.strategy.scope():
        exp.model.optimizer.build(exp.model.trainable_variables)  # its (zero) slots go into the checkpoint
    info = exp.task.dataset_info()
    heads = pytorch_import.assign(
        exp.model.network, spec, source, f"{model_cfg.name} ({model_cfg.mode}) with {info.num_classes} classes"
    )
    os.makedirs(parent, exist_ok=True)
    # Written whole beside model_dir, then renamed onto it; a kill leaves a
    # staging folder that the next import (or export) here removes.
    export_lib.remove_stale_staging(parent)
    staging = os.path.join(parent, export_lib.staging_name())
    os.mkdir(staging)
    try:
        staged = lambda name: model_dir_lib.path(staging, name)  # noqa: E731
        model_dir_lib.write_json_atomically(staged(model_dir_lib.CONFIG_FILE), exp.config_json)
        with open(staged(model_dir_lib.OPERATIVE_GIN_FILE), "w") as f:
            f.write(gin.config_str())
        name = os.path.join(model_dir_lib.CHECKPOINT_DIR, model_dir_lib.checkpoint_name(0))
        dhm_checkpoints.save(exp.model, staged(name), epoch=0)
        dhm_callbacks.BackupAndRestore(staged(model_dir_lib.BACKUP_DIR), model_dir=staging).seed(exp.model, epoch=0)
        record = {
            "source": os.path.abspath(checkpoint),
            "sha256": model_dir_lib.file_sha256(checkpoint),
            "heads": heads,
            "tensors": len(source.tensors),
            "reference_metadata": dict(source.metadata),
        }
        model_dir_lib.write_json_atomically(staged(model_dir_lib.IMPORT_FILE), record)
        export_dir = export_main_branch(exp, staging, staged(name), recorded_path=os.path.join(model_dir, name))
        if os.path.isdir(model_dir):
            os.rmdir(model_dir)  # empty (checked above); fails if something appeared meanwhile
        os.rename(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logging.info("imported %s (%s) into %s", checkpoint, ", ".join(heads), model_dir)
    return {
        "checkpoint": os.path.join(model_dir, name),
        "export": os.path.join(model_dir, os.path.relpath(export_dir, staging)),
        "imported": record,
    }
