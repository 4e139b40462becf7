"""One experiment configuration, read from Gin once and passed down.

Gin binds the sections of `dhm_keras.config` (task, dataset, model,
mimicking, train, diagnostics) and the builders of `official/` (the
optimizer recipe `build_sgd.*`, the precision policy). `from_gin()` reads
all of them once, into one frozen `ExperimentConfig`: the trainer, the tasks
and the analysis tools take their settings from it instead of asking Gin
again, so no part of a run can see another configuration than the one
recorded in the model directory (`to_json()` is what config.json holds).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Optional

import gin

from dhm_keras import config as cfg
from dhm_keras import gin_utils, mimicking_graph
from official.modeling import optimization, performance


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


def _frozen(mapping: dict) -> tuple:
    return tuple(sorted(mapping.items()))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run, as plain frozen values.

    `optimizer` and `precision` are the keyword arguments of
    `official.modeling.optimization.build_sgd` and
    `official.modeling.performance.set_precision_policy`, kept as sorted
    (name, value) pairs so that the whole config stays immutable. Once the
    trainer resolves the policy ("auto" depends on the machine), `precision`
    also holds the `resolved` name.
    """

    task: cfg.TaskConfig
    dataset: cfg.DatasetConfig
    model: cfg.ModelConfig
    mimicking: cfg.MimickingConfig
    train: cfg.TrainConfig
    optimizer: tuple = ()
    precision: tuple = ()
    # Measurements that do not change what is learned: not in config.json.
    diagnostics: cfg.DiagnosticsConfig = cfg.DiagnosticsConfig()

    @property
    def optimizer_args(self) -> dict:
        return dict(self.optimizer)

    @property
    def precision_args(self) -> dict:
        return dict(self.precision)

    def with_resolved_precision(self, precision: dict) -> "ExperimentConfig":
        """This config with its precision section as resolved on this machine
        ({"policy": requested, "resolved": name}), which config.json records."""
        return dataclasses.replace(self, precision=_frozen(precision))

    @property
    def data_dir(self) -> Optional[str]:
        return self.dataset.data_dir

    def to_json(self) -> dict:
        """The model directory's config.json: every section that changes what a
        run learns, as JSON reads it back (tuples become lists)."""
        mimicking = dataclasses.asdict(self.mimicking)
        mimicking["graph"] = mimicking_graph.as_data(self.mimicking.graph)
        return json.loads(json.dumps({
            "task": dataclasses.asdict(self.task),
            "dataset": dataclasses.asdict(self.dataset),
            "model": dataclasses.asdict(self.model),
            "mimicking": mimicking,
            "train": dataclasses.asdict(self.train),
            "optimizer": self.optimizer_args,
            "precision": self.precision_args,
        }))


def from_gin(data_dir: Optional[str] = None) -> ExperimentConfig:
    """Reads the parsed Gin configuration once. `data_dir` (the --data_dir
    flag) overrides `dataset.data_dir`. Invalid values fail here, before a
    run writes anything.

    A relative data directory that does not exist under the working
    directory is looked up in the repository (or installation) root, so that
    `gin/quickstart.gin`'s `dataset.data_dir = 'quickstart_data'` works from
    any directory (`gin_utils.resolve_path`); one that exists where the run
    starts is kept exactly as written."""
    dataset = cfg.DatasetConfig()
    data_dir = data_dir or dataset.data_dir
    if data_dir:
        dataset = dataclasses.replace(dataset, data_dir=gin_utils.resolve_path(data_dir))
    config = ExperimentConfig(
        task=cfg.TaskConfig(),
        dataset=dataset,
        model=cfg.ModelConfig(),
        mimicking=cfg.MimickingConfig(),
        train=cfg.TrainConfig(),
        optimizer=_frozen(bound_arguments(optimization.build_sgd)),
        precision=_frozen(bound_arguments(performance.set_precision_policy)),
        diagnostics=cfg.DiagnosticsConfig(),
    )
    return config
