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
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

import gin
import keras
import tensorflow as tf
from absl import logging

from dhm_keras import callbacks as dhm_callbacks
from dhm_keras import config as cfg
from dhm_keras import data as data_lib
from dhm_keras import models
from dhm_keras.model import BernoulliBranchSampler, DHMModel
from official.common import distribute
from official.core import export as export_lib
from official.modeling import optimization, performance


class ConfigMismatchError(ValueError):
    """The model directory holds a run of a different configuration."""


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


def current_config(data_dir: Optional[str] = None) -> dict:
    """The Gin-bound configuration as plain data (written to config.json)."""
    dataset = cfg.DatasetConfig()
    if data_dir:
        dataset = dataclasses.replace(dataset, data_dir=data_dir)
    return {
        "dataset": dataclasses.asdict(dataset),
        "model": dataclasses.asdict(cfg.ModelConfig()),
        "mimicking": dataclasses.asdict(cfg.MimickingConfig()),
        "train": dataclasses.asdict(cfg.TrainConfig()),
    }


# Fields that may change between attempts on one model_dir without making it
# a different experiment (where the data lives, how chatty the log is).
_MAY_DIFFER = {("dataset", "data_dir"), ("train", "verbose")}


def check_model_dir(model_dir: str, config: dict) -> None:
    """Refuses to mix two configurations in one model directory."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    differences = [
        f"{section}.{key}: {previous.get(section, {}).get(key)!r} -> {value!r}"
        for section, fields in config.items()
        for key, value in fields.items()
        if (section, key) not in _MAY_DIFFER
        and json.loads(json.dumps(value)) != previous.get(section, {}).get(key)
    ]
    if differences:
        raise ConfigMismatchError(
            f"model_dir {model_dir} holds a run with a different configuration "
            f"({'; '.join(differences)}); use a new --model_dir"
        )


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

    info = data_lib.dataset_info(dataset.name, data_dir)
    image_size = tuple(dataset.image_size) if dataset.image_size else None
    image_shape = (*(image_size or info.image_shape[:2]), 3)
    if None in image_shape:
        raise ValueError(
            f"dataset {dataset.name} has images of varying size; set dataset.image_size"
        )
    common = dict(
        data_dir=data_dir,
        global_batch_size=train.batch_size,
        seed=train.seed,
        image_size=image_size,
        cache=dataset.cache,
        mean=dataset.mean,
        std=dataset.std,
    )
    train_ds = (
        data_lib.make_dataset(
            dataset.name,
            dataset.train_split,
            training=True,
            padding=dataset.padding,
            label_noise=dataset.label_noise,
            label_noise_seed=(
                train.seed if dataset.label_noise_seed is None else dataset.label_noise_seed
            ),
            **common,
        )
        if training
        else None
    )
    eval_ds = data_lib.make_dataset(dataset.name, dataset.eval_split, training=False, **common)

    with strategy.scope():
        network = models.build(
            model_cfg.name,
            info.num_classes,
            mode=model_cfg.mode,
            input_shape=image_shape,
            **(model_cfg.overrides or {}),
        )
        model = DHMModel(
            network,
            mode=model_cfg.mode,
            temperature=mimic.temperature,
            alpha=mimic.alpha,
            epsilon=mimic.epsilon,
            bernoulli_p=mimic.bernoulli_p,
        )
        steps_per_epoch = max(1, info.num_examples(dataset.train_split) // train.batch_size)
        model.compile(
            optimizer=optimization.build_sgd(steps_per_epoch=steps_per_epoch),
            jit_compile=performance.resolve_jit_compile(train.jit_compile, strategy),
        )
    return Experiment(strategy, info, model, train_ds, eval_ds, image_shape, config)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def latest_checkpoint(model_dir: str) -> Optional[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "checkpoints", "epoch_*.weights.h5")))
    return files[-1] if files else None


def evaluation_epochs(epochs: int, every: int) -> list:
    """1-based epochs after which to evaluate: every `every`-th, and the last."""
    if every < 1:
        raise ValueError(f"train.eval_every must be >= 1, got {every}")
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})


def train(model_dir: str, data_dir: Optional[str] = None, evaluate: bool = True) -> dict:
    """Trains (resuming if a backup exists), writes results.json, exports b0."""
    exp = build_experiment(data_dir, training=True)
    check_model_dir(model_dir, exp.config)
    chief = distribute.is_chief(exp.strategy)
    train_cfg = cfg.TrainConfig()
    os.makedirs(model_dir, exist_ok=True)
    results_path = os.path.join(model_dir, dhm_callbacks.RESULTS_FILE)
    if os.path.exists(results_path):
        with open(results_path) as f:
            if json.load(f).get("completed"):
                logging.info("%s already holds a finished run; nothing to train.", model_dir)
                return export(model_dir, data_dir, experiment=exp) if chief else {}
    if chief:
        _write_json(os.path.join(model_dir, "config.json"), exp.config)
        with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.config_str())

    callbacks = [
        # First, so every other callback sees the restored epoch and weights.
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, "backup"), double_checkpoint=True),
        BernoulliBranchSampler(train_cfg.seed),
    ]
    if chief:
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                os.path.join(model_dir, "checkpoints", "epoch_{epoch:03d}.weights.h5"),
                save_weights_only=True,
            ),
            keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"),
            dhm_callbacks.ResultsWriter(model_dir, train_cfg.epochs, exp.config),
        ]
    exp.model.fit(
        exp.train_ds,
        epochs=train_cfg.epochs,
        validation_data=exp.eval_ds if evaluate else None,
        validation_freq=evaluation_epochs(train_cfg.epochs, train_cfg.eval_every),
        callbacks=callbacks,
        verbose=train_cfg.verbose,
    )
    if not chief:
        return {}
    with open(results_path) as f:
        results = json.load(f)
    results["export"] = export_main_branch(exp, model_dir)
    _write_json(results_path, results)
    return results


def _restore(exp: Experiment, model_dir: str, checkpoint: Optional[str]) -> str:
    checkpoint = checkpoint or latest_checkpoint(model_dir)
    if not checkpoint or not os.path.exists(checkpoint):
        raise FileNotFoundError(
            f"no checkpoint to load: {checkpoint or os.path.join(model_dir, 'checkpoints')} "
            "(train first, or pass --checkpoint=<file.weights.h5>)"
        )
    exp.model.load_weights(checkpoint)
    return checkpoint


def evaluate(model_dir: str, data_dir: Optional[str] = None, checkpoint: Optional[str] = None) -> dict:
    """Per-head top-1/top-5 of a checkpoint on the eval split; writes eval.json."""
    exp = build_experiment(data_dir, training=False)
    checkpoint = _restore(exp, model_dir, checkpoint)
    metrics = exp.model.evaluate(exp.eval_ds, return_dict=True, verbose=cfg.TrainConfig().verbose)
    result = {"checkpoint": checkpoint, "metrics": {k: float(v) for k, v in metrics.items()}}
    _write_json(os.path.join(model_dir, "eval.json"), result)
    return result


def export_main_branch(exp: Experiment, model_dir: str) -> str:
    """SavedModel of b0 only, normalisation inside, under model_dir/export/<version>."""
    dataset = cfg.DatasetConfig()
    mean, std = data_lib.channel_stats(dataset.name, dataset.mean, dataset.std)
    return export_lib.export_image_classifier(
        exp.model.main_branch(),
        os.path.join(model_dir, "export"),
        exp.image_shape,
        preprocess=lambda pixels: data_lib.normalize(pixels, mean, std),
    )


def export(
    model_dir: str,
    data_dir: Optional[str] = None,
    checkpoint: Optional[str] = None,
    experiment: Optional[Experiment] = None,
) -> dict:
    """Exports b0 from a checkpoint (default: the latest in model_dir)."""
    exp = experiment or build_experiment(data_dir, training=False)
    checkpoint = _restore(exp, model_dir, checkpoint)
    return {"checkpoint": checkpoint, "export": export_main_branch(exp, model_dir)}
