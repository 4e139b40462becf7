"""The task interface, after Model Garden's `official/core/base_task.py`.

A task is one kind of problem: where its examples come from and how they are
prepared, which network fits them, how a trained network is scored, and how
a served one decodes its requests. The generic runner (a trainer such as
`dhm_keras.train_lib`) only ever talks to this interface, so a new kind of
dataset or evaluation is a new task class, registered by name with
`official.core.task_factory`, and no change to the runner.

Nothing here knows about a particular method or dataset.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, List, Optional, Sequence

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Scoring:
    """Which logged metrics a run's results record, and which one "best" maximises.

    `result_metrics` are matched as prefixes of the log names without the
    "val_" prefix ("top1" matches "top1" and "top1/head"); `score_metrics`
    are tried in order and the first present is maximised. The default fits
    a single-output classifier scored by accuracy.
    """

    result_metrics: Sequence[str] = ("top1", "top5")
    score_metrics: Sequence[str] = ("top1",)

    def pick(self, logs: dict, prefix: str = "") -> dict:
        """The entries of `logs` (optionally `prefix`ed) that are result metrics."""
        picked = {}
        for key, value in logs.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if any(name.startswith(m) for m in self.result_metrics):
                    picked[name] = float(value)
        return picked

    def score(self, entry: dict) -> float:
        """What "best epoch" maximises (higher is better; -inf if absent)."""
        for name in self.score_metrics:
            if name in entry:
                return float(entry[name])
        return float("-inf")


class Task(abc.ABC):
    """One kind of problem, configured by the experiment config it is given.

    Subclasses implement the abstract methods; the others have defaults that
    fit single-label classification scored by accuracy.
    """

    scoring: Scoring = Scoring()

    def __init__(self, config):
        self.config = config

    def without_records(self) -> "Task":
        """This task for work that needs the dataset's metadata (class count,
        names, normalisation) but reads no record: converting a foreign
        checkpoint for serving. The runner then opens no data and checks no
        record file; `dataset_info` must still answer. Default: the task
        itself, whose `dataset_info` may need the prepared dataset; a task
        whose metadata exists without the data overrides this."""
        return self

    # -- data -----------------------------------------------------------------
    @abc.abstractmethod
    def dataset_info(self):
        """What the runner needs before reading any data: an object with
        `name`, `num_classes`, `image_shape` (H, W, C) and
        `num_examples(split)`."""

    @abc.abstractmethod
    def build_train_inputs(
        self, first_epoch: int = 0, input_context: Optional[tf.distribute.InputContext] = None
    ) -> tf.data.Dataset:
        """The training stream from 0-based epoch `first_epoch` on: batches
        of (inputs, labels), `steps_per_epoch()` of them per epoch. Epoch e
        must depend only on the configured seed and e, so that a resumed run
        reads exactly what an uninterrupted one would.

        `input_context` is given only across several workers (the runner then
        builds the stream through `distribute_datasets_from_function`, once
        per worker): the stream is then this worker's, of PER-REPLICA batches
        (`input_context.get_per_replica_batch_size`), `steps_per_epoch()`
        per local replica and epoch on every worker, a function of (seed,
        epoch, worker). A task may leave the argument out of its signature:
        it then gets DATA sharding (every worker reads everything)."""

    def check_inputs(self, training: bool) -> None:
        """Fails early, before a run writes anything, when the data it will
        read is missing (default: nothing to check)."""
        del training

    @abc.abstractmethod
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch."""

    @abc.abstractmethod
    def build_eval_inputs(self) -> Optional[tf.data.Dataset]:
        """Data for the runner's built-in `evaluate` (a Keras validation set),
        or None when the task scores the model itself (`evaluation_callbacks`)."""

    @abc.abstractmethod
    def build_network(self, image_shape: Sequence[int]) -> keras.Model:
        """The (untrained) network for the dataset, built inside the strategy scope."""

    # -- evaluation -----------------------------------------------------------
    def evaluation_callbacks(self, every: int) -> List[keras.callbacks.Callback]:
        """Callbacks that add `val_<metric>` entries to the epoch logs, for
        tasks whose evaluation is not a Keras `evaluate` (run every `every`
        epochs and after the last)."""
        del every
        return []

    def evaluate(self, model: keras.Model, verbose: int = 0) -> dict:
        """Scores a trained model on the evaluation split: {metric: value}."""
        return model.evaluate(self.build_eval_inputs(), return_dict=True, verbose=verbose)

    # -- serving --------------------------------------------------------------
    def class_names(self) -> Optional[Sequence[str]]:
        """Names of the classes in label order, for the export's `class_names`
        output and asset; None when the data names none (the export then
        serves class ids only)."""
        return None

    @abc.abstractmethod
    def serving_decode(self, hw: Sequence[int]) -> Callable[[tf.Tensor], tf.Tensor]:
        """One encoded image (scalar string) -> uint8 pixels [H, W, 3], made
        as the evaluation data makes them, so served bytes see what
        evaluation saw."""

    @abc.abstractmethod
    def serving_preprocess(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """float32 pixels 0..255 [N, H, W, 3] -> network input (normalisation)."""
