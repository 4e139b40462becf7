"""One experiment, start to finish: Gin config -> strategy -> data -> model -> fit -> results -> export.

The data flow follows spec/layout.md: nothing in the models knows about data,
nothing in the losses knows about models; this module is the only place that
puts them together. Everything it reads comes from the Gin-bound dataclasses
of `dhm_keras.config` and the builders in `official/`.

Model-directory layout:
  checkpoints/epoch_NNN.weights.h5   weights after every epoch
  backup/                            BackupAndRestore state (resume after a kill)
  logs/train, logs/validation        TensorBoard event files
  results.json                       per-epoch accuracies, best and last epoch
  config.json                        the configuration this directory belongs to
  operative_config.gin               every Gin binding the run used
  export/<version>/                  SavedModel of the main branch b0
  run.lock                           held while a run trains or exports (model_dir.locked)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
from typing import Optional

import gin
import h5py
import keras
import tensorflow as tf
from absl import logging

from dhm_keras import callbacks as dhm_callbacks
from dhm_keras import checkpoints as dhm_checkpoints
from dhm_keras import config as cfg
from dhm_keras import data as data_lib
from dhm_keras import errors
from dhm_keras import model_dir as model_dir_lib
from dhm_keras import models
from dhm_keras.data import imagenet as imagenet_lib
from dhm_keras.data import reid as reid_data
from dhm_keras.data.input_errors import input_errors_are_clear
from dhm_keras.evaluation import reid as reid_eval
from dhm_keras.model import BernoulliBranchSampler, DHMModel
from official.common import distribute
from official.core import export as export_lib
from official.modeling import optimization, performance


ConfigMismatchError = errors.ConfigMismatchError  # re-exported: callers catch it here


@dataclasses.dataclass
class Experiment:
    """Everything built for a run; returned so scripts and tests can inspect it."""

    strategy: tf.distribute.Strategy
    info: data_lib.DatasetInfo
    model: DHMModel
    train_ds: Optional[tf.data.Dataset]
    eval_ds: tf.data.Dataset
    image_shape: tuple
    config: dict
    gallery_ds: Optional[tf.data.Dataset] = None  # re-ID: eval_ds is the query split


def bound_arguments(fn) -> dict:
    """`fn`'s keyword defaults with its Gin bindings applied: the values a call
    by `fn`'s caller will get (arguments without a default are left out)."""
    arguments = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    arguments.update(gin.get_bindings(fn))
    return arguments


def current_config(data_dir: Optional[str] = None) -> dict:
    """The Gin-bound configuration as plain data (written to config.json).

    Besides the project's own sections it records the optimizer recipe and
    the precision policy (bound on `official` builders): both change what a
    run learns, so resuming with other values must be refused like any other
    change of recipe.
    """
    dataset = cfg.DatasetConfig()
    if data_dir:
        dataset = dataclasses.replace(dataset, data_dir=data_dir)
    return json.loads(json.dumps({  # tuples -> lists, as config.json reads back
        "dataset": dataclasses.asdict(dataset),
        "model": dataclasses.asdict(cfg.ModelConfig()),
        "mimicking": dataclasses.asdict(cfg.MimickingConfig()),
        "train": dataclasses.asdict(cfg.TrainConfig()),
        "optimizer": bound_arguments(optimization.build_sgd),
        "precision": bound_arguments(performance.set_precision_policy),
    }))


def check_model_dir(
    model_dir: str,
    config: dict,
    may_differ=frozenset(),
    remedy: str = "use a new --model_dir",
    what: str = "model_dir",
) -> None:
    """Refuses to mix two configurations in one model directory.

    `config` is `current_config()`'s, already in the JSON form config.json reads back.
    """
    config_path = model_dir_lib.path(model_dir, model_dir_lib.CONFIG_FILE)
    if not os.path.exists(config_path):
        return
    differences = model_dir_lib.config_differences(
        model_dir_lib.read_json(config_path), config, may_differ
    )
    if differences:
        raise ConfigMismatchError(
            f"{what} {model_dir} holds a run with a different configuration "
            f"({'; '.join(differences)}); {remedy}"
        )


def check_run_config(model_dir: str, config: dict, checkpoint: Optional[str], verb: str) -> None:
    """Refuses to export or evaluate a run under a configuration it was not trained with.

    Another normalisation, image size or model would export or score a network
    that was never trained that way, and label the result as this run's. The
    configuration is compared with the config.json of `model_dir` (where the
    export or eval.json is written) and of the run that `checkpoint` lies in,
    where those exist; a bare weights file or export elsewhere has nothing to
    be compared with. Execution fields and what an evaluation scores
    (`model_dir.EVALUATION_FIELDS`) may differ.
    """
    runs = {os.path.realpath(model_dir): (model_dir, "model_dir")}
    owner = model_dir_lib.run_dir_of(checkpoint) if checkpoint else None
    if owner:
        runs.setdefault(os.path.realpath(owner), (owner, "--checkpoint's model_dir"))
    for run, what in runs.values():
        gin_file = model_dir_lib.path(run, model_dir_lib.OPERATIVE_GIN_FILE)
        check_model_dir(
            run,
            config,
            may_differ=model_dir_lib.EVALUATION_FIELDS,
            remedy=f"{verb} with the configuration it was trained with (--gin_file={gin_file})",
            what=what,
        )


def locked_if_chief(model_dir: str, strategy: tf.distribute.Strategy):
    """The model directory's lock (`model_dir.locked`) for the chief; nothing for
    the other workers of a multi-worker run, which write nothing there."""
    if distribute.is_chief(strategy):
        return model_dir_lib.locked(model_dir)
    return contextlib.nullcontext()


def check_train_split(info: data_lib.DatasetInfo, dataset: cfg.DatasetConfig, batch_size: int) -> None:
    """A training split needs one full global batch: training batches drop the
    incomplete last one, so a smaller split would train nothing, and the run
    would "finish" and export an untrained model."""
    examples = info.num_examples(dataset.train_split)
    if examples < batch_size:
        raise errors.TrainSplitTooSmallError(
            f"dataset.train_split {dataset.train_split!r} of {info.name} has {examples} examples, "
            f"fewer than one batch (train.batch_size = {batch_size}, global): an epoch would take "
            "no step, since the incomplete last batch is dropped; use a larger split or a smaller "
            "train.batch_size"
        )


def check_class_count(expected: Optional[int], info: data_lib.DatasetInfo) -> None:
    """`model.num_classes`, when set, must be the dataset's class count."""
    if expected is not None and int(expected) != info.num_classes:
        raise errors.ClassCountError(
            f"model.num_classes = {expected} but dataset {info.name} has "
            f"{info.num_classes} classes; fix model.num_classes or dataset.name"
        )


def check_image_size(image_size) -> Optional[tuple]:
    """`dataset.image_size` is None or two positive ints (H, W)."""
    if image_size is None:
        return None
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise errors.ImageSizeError(
            f"dataset.image_size must be (height, width) with positive ints, got {image_size!r}"
        )
    return size


def build_network(model_cfg: cfg.ModelConfig, num_classes: int, image_shape: tuple) -> keras.Model:
    """The multi-head functional network; images too small for it are a clear error."""
    try:
        return models.build(
            model_cfg.name,
            num_classes,
            mode=model_cfg.mode,
            input_shape=image_shape,
            sync_batchnorm=model_cfg.sync_batchnorm,
            **(model_cfg.overrides or {}),
        )
    except ValueError as e:
        if "size would be zero or negative" not in str(e):
            raise
        raise errors.ImageSizeError(
            f"{image_shape[0]}x{image_shape[1]} images are too small for {model_cfg.name}: "
            "its feature maps shrink to nothing; use a larger dataset.image_size"
        ) from e


def build_datasets(
    dataset: cfg.DatasetConfig,
    train: cfg.TrainConfig,
    data_dir: Optional[str],
    image_size: tuple,
    training: bool,
    reid: bool,
) -> tuple:
    """(train, eval, gallery) datasets; gallery is None except for re-ID.

    Classification reads TFDS (`dhm_keras.data.make_dataset`); person re-ID
    reads the Market-1501/DukeMTMC folder layout, where evaluation is
    retrieval of the query split against the gallery split.
    """
    if dataset.label_noise and reid:
        raise ValueError("dataset.label_noise is not supported for re-ID datasets")
    if dataset.random_erasing and not reid:
        raise ValueError("dataset.random_erasing is only supported for re-ID datasets")
    common = dict(
        data_dir=data_dir,
        global_batch_size=train.batch_size,
        seed=train.seed,
        image_size=tuple(image_size),
        cache=dataset.cache,
        mean=dataset.mean,
        std=dataset.std,
    )
    if reid:
        make = functools.partial(reid_data.make_reid_dataset, dataset.name, **common)
        train_ds = (
            make(dataset.train_split, training=True, padding=dataset.padding, random_erasing=dataset.random_erasing)
            if training
            else None
        )
        return train_ds, make(dataset.eval_split, training=False), make("gallery", training=False)
    # augmentation acts on the training split only, eval_resize on evaluation.
    make = functools.partial(
        data_lib.make_dataset,
        dataset.name,
        augmentation=dataset.augmentation,
        eval_resize=dataset.eval_resize,
        **common,
    )
    train_ds = (
        make(
            dataset.train_split,
            training=True,
            padding=dataset.padding,
            label_noise=dataset.label_noise,
            label_noise_seed=(
                train.seed if dataset.label_noise_seed is None else dataset.label_noise_seed
            ),
        )
        if training
        else None
    )
    return train_ds, make(dataset.eval_split, training=False), None


def build_experiment(data_dir: Optional[str] = None, training: bool = True) -> Experiment:
    """Builds strategy, datasets and the compiled DHM model from the Gin config."""
    config = current_config(data_dir)
    dataset = cfg.DatasetConfig()
    model_cfg = cfg.ModelConfig()
    mimic = cfg.MimickingConfig()
    train = cfg.TrainConfig()
    data_dir = data_dir or dataset.data_dir

    keras.utils.set_random_seed(train.seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    performance.set_precision_policy()
    strategy = distribute.get_strategy()

    reid = reid_data.is_reid_dataset(dataset.name)
    info = (
        reid_data.reid_info(dataset.name, data_dir)
        if reid
        else data_lib.dataset_info(dataset.name, data_dir)
    )
    check_class_count(model_cfg.num_classes, info)
    if training:
        check_train_split(info, dataset, train.batch_size)
    image_size = check_image_size(dataset.image_size)
    image_shape = (*(image_size or info.image_shape[:2]), 3)
    if None in image_shape:
        raise errors.ImageSizeError(
            f"dataset {dataset.name} has images of varying size {info.image_shape}; "
            "set dataset.image_size = (H, W)"
        )
    train_ds, eval_ds, gallery_ds = build_datasets(
        dataset, train, data_dir, image_shape[:2], training, reid
    )

    with strategy.scope():
        network = build_network(model_cfg, info.num_classes, image_shape)
        model = DHMModel(
            network,
            mode=model_cfg.mode,
            temperature=mimic.temperature,
            alpha=mimic.alpha,
            epsilon=mimic.epsilon,
            bernoulli_p=mimic.bernoulli_p,
            label_smoothing=train.label_smoothing,
            graph=mimic.graph,
        )
        steps_per_epoch = max(1, info.num_examples(dataset.train_split) // train.batch_size)
        model.compile(
            optimizer=optimization.build_sgd(steps_per_epoch=steps_per_epoch),
            jit_compile=performance.resolve_jit_compile(train.jit_compile, strategy),
        )
    return Experiment(strategy, info, model, train_ds, eval_ds, image_shape, config, gallery_ds)


def evaluation_epochs(epochs: int, every: int) -> list:
    """1-based epochs after which to evaluate: every `every`-th, and the last."""
    if every < 1:
        raise ValueError(f"train.eval_every must be >= 1, got {every}")
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})


def train(model_dir: str, data_dir: Optional[str] = None, evaluate: bool = True) -> dict:
    """Trains (resuming if a backup exists), writes results.json, exports b0.

    The chief holds the model directory's lock from before its first write
    until it returns, so a second run into the same directory stops at once.
    """
    exp = build_experiment(data_dir, training=True)
    check_model_dir(model_dir, exp.config)
    chief = distribute.is_chief(exp.strategy)
    with locked_if_chief(model_dir, exp.strategy):
        return _train(exp, model_dir, data_dir, evaluate, chief)


def _train(exp: Experiment, model_dir: str, data_dir: Optional[str], evaluate: bool, chief: bool) -> dict:
    train_cfg = cfg.TrainConfig()
    os.makedirs(model_dir, exist_ok=True)
    results_path = os.path.join(model_dir, model_dir_lib.RESULTS_FILE)
    results = load_results(model_dir, train_cfg.epochs, exp.config, write=chief)
    if results.get("completed"):
        logging.info("%s already holds a finished run; nothing to train.", model_dir)
        if not chief:
            return {}
        exported = export(model_dir, data_dir, experiment=exp)
        results["export"] = exported["export"]  # the newest version, as after training
        model_dir_lib.write_json_atomically(results_path, results)
        return {**results, **exported}
    if chief:
        model_dir_lib.write_json_atomically(os.path.join(model_dir, "config.json"), exp.config)
        with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.config_str())

    # First, so every other callback sees the restored epoch and weights; its
    # epoch-end save comes last (backup.save_point() below). A non-chief
    # worker backs up to a private copy, never into model_dir.
    backup = dhm_callbacks.BackupAndRestore(
        distribute.worker_backup_dir(os.path.join(model_dir, "backup"), exp.strategy),
        model_dir=model_dir,  # an unreadable backup falls back to its epoch checkpoints
        double_checkpoint=True,
    )
    callbacks = [
        backup,
        BernoulliBranchSampler(train_cfg.seed),
        dhm_callbacks.NonFiniteLossGuard(os.path.join(model_dir, "checkpoints")),
    ]
    if exp.gallery_ds is not None and evaluate:
        # Before the writers, so that they see val_rank1, val_mAP, ...
        callbacks.append(
            reid_eval.RetrievalEvaluator(exp.eval_ds, exp.gallery_ds, every=train_cfg.eval_every)
        )
    if chief:
        callbacks += [
            dhm_checkpoints.EpochCheckpoint(os.path.join(model_dir, "checkpoints")),
            keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
            dhm_callbacks.ResultsWriter(model_dir, train_cfg.epochs, exp.config),
        ]
        if train_cfg.keep_checkpoints:
            callbacks.append(dhm_callbacks.CheckpointRetention(
                os.path.join(model_dir, "checkpoints"), train_cfg.keep_checkpoints, results_path
            ))
        every = cfg.DiagnosticsConfig().gradient_consistency_every
        if every > 0 and distribute.is_multi_worker(exp.strategy):
            # A chief-only callback must not run computations the other
            # workers do not join (collectives would hang): measure on one machine.
            logging.warning("diagnostics.gradient_consistency_every is ignored under multi-worker training")
        elif every > 0 and exp.model.branches:
            from dhm_keras.analysis.gradient_consistency import GradientConsistency

            callbacks.append(
                GradientConsistency(
                    exp.eval_ds.take(1),
                    every_n_steps=every,
                    log_dir=os.path.join(model_dir, "logs", "train"),
                )
            )
    callbacks.append(backup.save_point())
    with input_errors_are_clear("training or evaluation"):
        exp.model.fit(
            distribute.shard_by_data(exp.train_ds),
            epochs=train_cfg.epochs,
            validation_data=(
                distribute.shard_by_data(exp.eval_ds)
                if evaluate and exp.gallery_ds is None
                else None
            ),
            validation_freq=evaluation_epochs(train_cfg.epochs, train_cfg.eval_every),
            callbacks=callbacks,
            verbose=train_cfg.verbose,
        )
    if not chief:
        return {}
    results = model_dir_lib.read_json(results_path)
    results["export"] = export_main_branch(exp, model_dir)
    model_dir_lib.write_json_atomically(results_path, results)
    return results


def load_results(model_dir: str, epochs: int, config: dict, write: bool) -> dict:
    """results.json of the run in `model_dir`; rebuilt from its TensorBoard logs
    if it is missing (and then written when `write`); {} for a new run.

    Whether a run is finished must not hang on one small file that a user may
    delete (an unreadable results.json is reported with the advice to move it
    aside): the logs hold every finished epoch's metrics too, and a finished
    run rebuilt from them is not trained again.
    """
    results_path = model_dir_lib.path(model_dir, model_dir_lib.RESULTS_FILE)
    if os.path.exists(results_path):
        return model_dir_lib.read_json(results_path)
    history = history_from_logs(model_dir_lib.path(model_dir, model_dir_lib.LOG_DIR))
    if not history:
        return {}
    if not write:  # a non-chief worker: it only needs to know what the chief will do
        return {"completed": len(history) >= epochs}
    writer = dhm_callbacks.ResultsWriter(model_dir, epochs, config)
    writer.history = history
    results = writer.write()
    logging.warning(
        "%s was missing: rebuilt epochs %s from the TensorBoard logs in %s (%s).",
        results_path, ", ".join(str(e) for e in sorted(history)),
        model_dir_lib.path(model_dir, model_dir_lib.LOG_DIR),
        "a finished run" if results["completed"] else "training resumes",
    )
    return results


def _epoch_summaries(log_dir: str) -> list:
    """[(wall_time, epoch, {metric: value})]: the Keras TensorBoard callback's
    per-epoch scalars in `log_dir` (tags `epoch_<metric>`, step = 0-based
    epoch), one item per epoch per event file, in the order they were written."""
    writes = {}
    if not tf.io.gfile.isdir(log_dir):
        return []
    for name in sorted(tf.io.gfile.listdir(log_dir)):
        if "tfevents" not in name:
            continue
        records = iter(tf.data.TFRecordDataset(os.path.join(log_dir, name)))
        while True:
            try:
                event = tf.compat.v1.Event.FromString(next(records).numpy())
            except StopIteration:
                break
            except tf.errors.DataLossError:  # a kill during a write cuts the last record
                break
            for value in event.summary.value:
                if not value.tag.startswith("epoch_"):
                    continue
                number = (
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                )
                wall_time, metrics = writes.setdefault((name, event.step), (event.wall_time, {}))
                metrics[value.tag[len("epoch_"):]] = number
    return sorted(
        ((wall_time, step, metrics) for (_, step), (wall_time, metrics) in writes.items()),
        key=lambda item: (item[0], item[1]),
    )


def history_from_logs(log_dir: str) -> dict:
    """{epoch: results.json history entry} as `ResultsWriter` recorded them,
    from logs/train and logs/validation.

    An epoch written again by a resumed attempt replaces the earlier write, and
    (as in ResultsWriter) drops the epochs an earlier attempt had recorded
    after it. `learning_rate` is added by the TensorBoard callback, not a fit
    metric, so it is left out as results.json leaves it out.
    """
    history = {}
    for _, step, metrics in _epoch_summaries(os.path.join(log_dir, "train")):
        history = {e: entry for e, entry in history.items() if e < step + 1}
        metrics.pop("learning_rate", None)
        history[step + 1] = {"epoch": step + 1, "train": metrics, "eval": {}}
    for _, step, metrics in _epoch_summaries(os.path.join(log_dir, "validation")):
        if step + 1 in history:
            history[step + 1]["eval"] = metrics
    return history


def _restore(exp: Experiment, model_dir: str, checkpoint: Optional[str]) -> str:
    """Loads `checkpoint` (default: the newest in model_dir); see `checkpoints.load` for the errors."""
    model_cfg = exp.config["model"]
    return dhm_checkpoints.load(
        exp.model,
        checkpoint or model_dir_lib.latest_checkpoint(model_dir),
        strategy=exp.strategy,
        expected=(
            f"model {model_cfg['name']} ({model_cfg['mode']}) with {exp.info.num_classes} "
            f"classes of dataset {exp.info.name}"
        ),
        model_dir=model_dir,
    )


def is_saved_model(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))


def evaluate(model_dir: str, data_dir: Optional[str] = None, checkpoint: Optional[str] = None) -> dict:
    """Top-1/top-5 on the eval split; writes model_dir/eval.json.

    `checkpoint` may be a `.weights.h5` file (every head is scored) or an
    export directory `<model_dir>/export/<version>` (the served B0 is
    scored through its `serving_float` signature, i.e. with the
    preprocessing inside the SavedModel). Default: the latest checkpoint.

    It takes no lock: evaluating a run while it trains is normal, and
    eval.json is replaced atomically.
    """
    check_run_config(model_dir, current_config(data_dir), checkpoint, "evaluate")
    if is_saved_model(checkpoint):
        if reid_data.is_reid_dataset(cfg.DatasetConfig().name):
            raise errors.CheckpointError(
                f"--checkpoint={checkpoint} is an export, which serves b0's class logits; "
                "re-ID evaluation ranks the gallery by the network's embedding, so pass a "
                "weights file (<model_dir>/checkpoints/epoch_NNN.weights.h5) instead"
            )
        result = evaluate_export(checkpoint, data_dir)
    else:
        exp = build_experiment(data_dir, training=False)
        checkpoint = _restore(exp, model_dir, checkpoint)
        with input_errors_are_clear("evaluation"):
            if exp.gallery_ds is not None:
                metrics = reid_eval.evaluate_model(
                    reid_eval.feature_extractor(exp.model.network), exp.eval_ds, exp.gallery_ds
                )
            else:
                metrics = exp.model.evaluate(
                    exp.eval_ds, return_dict=True, verbose=cfg.TrainConfig().verbose
                )
        result = {"checkpoint": checkpoint, "metrics": {k: float(v) for k, v in metrics.items()}}
    with model_dir_lib.writing(model_dir):
        os.makedirs(model_dir, exist_ok=True)
        model_dir_lib.write_json_atomically(os.path.join(model_dir, "eval.json"), result)
    return result


def evaluate_export(export_path: str, data_dir: Optional[str] = None) -> dict:
    """Scores an exported B0 SavedModel on the Gin-configured eval split."""
    dataset = cfg.DatasetConfig()
    data_dir = data_dir or dataset.data_dir
    served = tf.saved_model.load(export_path).signatures["serving_float"]
    export_hw = tuple(served.structured_input_signature[1]["images"].shape[1:3])
    info = data_lib.dataset_info(dataset.name, data_dir)
    image_size = check_image_size(dataset.image_size) or tuple(info.image_shape[:2])
    if tuple(image_size) != export_hw:
        raise errors.ImageSizeError(
            f"export {export_path} takes {export_hw[0]}x{export_hw[1]} images but the eval "
            f"split of {dataset.name} gives {image_size[0]}x{image_size[1]}; set "
            f"dataset.image_size = {export_hw}"
        )
    num_classes = int(served.structured_outputs["logits"].shape[-1])
    if num_classes != info.num_classes:
        raise errors.ClassCountError(
            f"export {export_path} predicts {num_classes} classes but dataset "
            f"{dataset.name} has {info.num_classes}"
        )
    # The export normalises itself: feed raw 0..255 pixels (mean 0, std 1/255
    # makes the pipeline's normalisation the identity, to float rounding).
    pixels = data_lib.make_dataset(
        dataset.name,
        dataset.eval_split,
        data_dir=data_dir,
        global_batch_size=cfg.TrainConfig().batch_size,
        training=False,
        image_size=image_size,
        eval_resize=dataset.eval_resize,
        cache=False,
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255.0,) * 3,
    )
    top1 = top5 = count = 0
    with input_errors_are_clear("evaluation"):
        for images, labels in pixels:
            logits = served(images=tf.clip_by_value(images, 0.0, 255.0))["logits"]
            labels = tf.cast(labels, tf.int32)
            top1 += int(tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.int32)))
            top5 += int(tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, min(5, num_classes)), tf.int32)))
            count += int(tf.shape(labels)[0])
    return {
        "export": export_path,
        "metrics": {"top1/b0": top1 / max(count, 1), "top5/b0": top5 / max(count, 1), "examples": count},
    }


def serving_decode(dataset: cfg.DatasetConfig, hw: tuple):
    """Encoded image -> uint8 pixels [H, W, 3], as the evaluation pipeline makes
    them (antialiased resize; with `dataset.eval_resize`, shorter side then
    centre crop), so that `serving_bytes` scores what evaluation scored."""
    hw = (int(hw[0]), int(hw[1]))
    if dataset.eval_resize is not None and not reid_data.is_reid_dataset(dataset.name):
        return lambda encoded: imagenet_lib.resize_and_centre_crop(encoded, int(dataset.eval_resize), hw)
    return lambda encoded: imagenet_lib.resize_to_uint8(imagenet_lib.decode_rgb(encoded), hw)


def export_main_branch(exp: Experiment, model_dir: str) -> str:
    """SavedModel of b0 only, normalisation inside, under model_dir/export/<version>.

    TensorFlow reports a directory it may not write to (or a full disk) as an
    OpError with a traceback; it becomes one `ModelDirWriteError` line.
    """
    dataset = cfg.DatasetConfig()
    mean, std = data_lib.channel_stats(dataset.name, dataset.mean, dataset.std)
    export_dir = os.path.join(model_dir, "export")
    try:
        return export_lib.export_image_classifier(
            exp.model.main_branch(),
            export_dir,
            exp.image_shape,
            preprocess=lambda pixels: data_lib.normalize(pixels, mean, std),
            decode=serving_decode(dataset, exp.image_shape[:2]),
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
) -> dict:
    """Exports b0 from a checkpoint (default: the latest in model_dir).

    The configuration must be the run's (`check_run_config`): another one
    would serve the weights with, say, another normalisation as this run's
    newest version. The chief holds the model directory's lock while it
    writes (re-entrant: training calls this with the lock held).
    """
    config = experiment.config if experiment else current_config(data_dir)
    check_run_config(model_dir, config, checkpoint, "export")
    exp = experiment or build_experiment(data_dir, training=False)
    with locked_if_chief(model_dir, exp.strategy):
        checkpoint = _restore(exp, model_dir, checkpoint)
        return {"checkpoint": checkpoint, "export": export_main_branch(exp, model_dir)}
