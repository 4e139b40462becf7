"""results.json rebuilt from the TensorBoard logs, so a finished run never hangs on one file.

Whether a run is finished must not depend on one small file that a user may
delete or move aside: the TensorBoard logs hold every finished epoch's
metrics too, in the same names, so the history can be read back from them.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from dhm_keras import callbacks as dhm_callbacks
from dhm_keras import model_dir as model_dir_lib
from dhm_keras.model import HEAD_ACCURACY
from official.core import base_task


def load_results(
    model_dir: str, epochs: int, config: dict, write: bool, scoring: base_task.Scoring = HEAD_ACCURACY
) -> dict:
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
    writer = dhm_callbacks.ResultsWriter(model_dir, epochs, config, scoring)
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
