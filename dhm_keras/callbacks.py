"""Training callbacks that record what a run achieved, or stop a run gone bad.

`ResultsWriter` keeps ``results.json`` in the model directory current after
every epoch (written atomically, so a kill never leaves half a file) and, on a
resumed run, keeps the epochs already recorded: each epoch appears once.

`BackupAndRestore` writes its backup after every other callback has recorded
the epoch, so a kill can repeat an epoch but never skip one, and resumes from
whatever is readable: the backup, its previous copy, or the newest good epoch
checkpoint.

`NonFiniteLossGuard` stops training at the first NaN/inf training loss, or
at the end of an epoch whose validation loss is not finite, by raising,
which (unlike Keras' `TerminateOnNaN`, which lets the epoch end) keeps the
epoch-end callbacks from saving the broken weights over the last good
checkpoint and backup.

`CollapseGuard` stops a run whose every head sits at the label prior after
its first epoch (DHM at lr 0.1 without warm-up), the other way a run can go
bad for good while every number stays finite.

An epoch whose recorded numbers are not all finite is never "best" and never
"good" (`sound`).
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import keras
from absl import logging

from dhm_keras import checkpoints
from dhm_keras.errors import CheckpointError, NonFiniteLossError, TrainingCollapsedError, UserError
from dhm_keras.model_dir import (
    CHECKPOINT_DIR,
    RESULTS_FILE,
    epoch_checkpoints,
    read_json,
    write_json_atomically,
)
from dhm_keras.progress import IntervalMeans
from dhm_keras.model import HEAD_ACCURACY
from official.core import base_task


def sound(entry: dict) -> bool:
    """Whether a results.json epoch has only finite numbers (training and evaluation).

    A NaN validation loss means broken weights even while top-1 still reads
    0.156 (argmax of NaN logits is class 0) and the training loss is a finite
    3e22, so no single metric will do: one non-finite number disqualifies the
    epoch as best or as a good epoch to go back to.
    """
    values = [*entry.get("train", {}).values(), *entry.get("eval", {}).values()]
    return all(math.isfinite(float(v)) for v in values)


def good_checkpoints(model_dir: str) -> List[tuple]:
    """[(epoch, path)] of the epoch checkpoints in `model_dir` whose epoch results.json
    records with finite numbers, newest first.

    A checkpoint results.json does not record is left out: resuming from it
    would skip recording that epoch, and the run could never complete.
    """
    results_path = os.path.join(model_dir, RESULTS_FILE)
    if not os.path.exists(results_path):
        return []
    try:
        history = read_json(results_path).get("history", [])
    except (OSError, UserError):
        return []
    good = {int(e["epoch"]) for e in history if sound(e)}
    saved = epoch_checkpoints(os.path.join(model_dir, CHECKPOINT_DIR))
    return [(epoch, saved[epoch]) for epoch in sorted(saved, reverse=True) if epoch in good]


class ResultsWriter(keras.callbacks.Callback):
    """Writes per-epoch accuracies plus best and last epoch to results.json.

    "Best" is the epoch with the highest score of the task's `scoring`
    (validation top-1 of the main head b0 for classification, rank-1 for
    re-identification; the training value when there is no validation)
    among the `sound` epochs; with none, there is no "best". Epochs are
    numbered from 1.
    """

    def __init__(
        self,
        model_dir: str,
        total_epochs: int,
        config: Optional[dict] = None,
        scoring: base_task.Scoring = HEAD_ACCURACY,
    ):
        super().__init__()
        self.scoring = scoring  # the task's: which metrics to record, which one is "best"
        self.path = os.path.join(model_dir, RESULTS_FILE)
        self.total_epochs = int(total_epochs)
        self.config = config or {}
        self.history: dict[int, dict] = {}

    def on_train_begin(self, logs=None):
        # A resumed run (BackupAndRestore) keeps what the killed run finished.
        if os.path.exists(self.path):
            previous = read_json(self.path)
            self.history = {int(e["epoch"]): e for e in previous.get("history", [])}

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        entry = {
            "epoch": epoch + 1,
            "train": {k: float(v) for k, v in logs.items() if not k.startswith("val_")},
            "eval": {k[4:]: float(v) for k, v in logs.items() if k.startswith("val_")},
        }
        # Drop anything recorded beyond this epoch by an earlier, longer-lived attempt.
        self.history = {e: v for e, v in self.history.items() if e < epoch + 1}
        self.history[epoch + 1] = entry
        self.write()

    def write(self) -> dict:
        history = [self.history[e] for e in sorted(self.history)]
        payload = {
            "config": self.config,
            "epochs": self.total_epochs,
            "epochs_completed": len(history),
            "completed": len(history) >= self.total_epochs,
            "history": history,
        }
        if history:
            # Epochs without an evaluation (train.eval_every > 1) are skipped
            # when picking the best and last evaluated epoch.
            evaluated = [e for e in history if e["eval"]]
            split = "eval" if evaluated else "train"
            scored = evaluated or history
            payload["split"] = split
            candidates = [e for e in scored if sound(e)]
            if candidates:
                best = max(candidates, key=lambda e: self.scoring.score(e[split]))
                payload["best"] = {"epoch": best["epoch"], **self.scoring.pick(best[split])}
            payload["last"] = {"epoch": scored[-1]["epoch"], **self.scoring.pick(scored[-1][split])}
        write_json_atomically(self.path, payload)
        return payload


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, saving last, atomically, and resuming from what is readable.

    Saving last: it must come first in the callback list, so that its
    restore (at train begin) precedes everything; but Keras would then also
    save the backup first at each epoch end. A kill between that save and
    ResultsWriter's record of the epoch made the resumed run skip the epoch
    without ever recording it, so results.json never reached "completed",
    the finished run's backup was deleted and the next re-run trained from
    scratch. Put `save_point()` last in the list: the backup is then written
    only after the checkpoint and results.json hold the epoch, and a kill in
    between just repeats that epoch.

    Saving atomically: Keras writes ``latest.weights.h5`` and
    ``training_metadata.json`` in place, so a kill or a full disk during a
    save left them truncated; after epoch 1 there is no other copy, and the
    re-run stopped with an `OSError` naming neither the file nor a fix. Here
    both are written under temporary names and renamed (`checkpoints.save`'s
    way), the previous pair is renamed to ``*.bkp`` (double_checkpoint), and
    the weights file records its own epoch, so a kill between the renames of
    the two files cannot pair weights with another epoch's number.

    Resuming: from the newest readable of the backup, its previous copy and
    the epoch checkpoints that results.json records as `sound`, with one
    logged line naming what was unreadable and what was used. If nothing is
    readable, a `CheckpointError` names the files and the ways out.
    """

    def __init__(self, backup_dir: str, model_dir: Optional[str] = None, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.model_dir = model_dir

    def on_epoch_end(self, epoch, logs=None):
        pass  # see save_point()

    def save_point(self) -> keras.callbacks.Callback:
        return _BackupSavePoint(self)

    def _save_model(self):
        data = checkpoints.weights_bytes(self.model, epoch=self._current_epoch)
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint:
            for current, previous in (
                (self._weights_path, self._prev_weights_path),
                (self._training_metadata_path, self._prev_training_metadata_path),
            ):
                if os.path.exists(current):
                    os.replace(current, previous)
        checkpoints.write(self._weights_path, data)
        # Keras' own record, kept so that this backup stays readable by Keras'
        # BackupAndRestore; `_restore_copy` prefers the epoch in the weights.
        write_json_atomically(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )

    def restore(self, model: keras.Model) -> int:
        """Restores `model` now, before `fit`, and returns the 0-based epoch
        training resumes at (0: nothing to resume). The trainer starts its
        data stream there, so this decision is made once; `fit` then does
        not restore again. Build the optimizer first (its slots are saved)."""
        self.set_model(model)
        self._restore()
        self._restored = True
        return int(getattr(model, "_initial_epoch", None) or 0)

    def seed(self, model: keras.Model, epoch: int = 0) -> None:
        """Writes `model`'s state as the backup after `epoch`: the next
        training run in this directory starts from these weights, as a
        resumed one does (an imported checkpoint is epoch 0 of its run)."""
        self.set_model(model)
        self._current_epoch, self._last_batch_seen = int(epoch), 0
        self._save_model()

    def on_train_begin(self, logs=None):
        if not getattr(self, "_restored", False):
            self._restore()

    def _restore(self):
        if not self.model.built:
            raise ValueError(f"BackupAndRestore needs a built model; {self.model} is not built")
        copies = [
            (self._weights_path, self._training_metadata_path),
            (self._prev_weights_path, self._prev_training_metadata_path),
        ]
        if not any(os.path.exists(p) for pair in copies for p in pair):
            return  # nothing backed up: a fresh start
        unreadable = []
        for weights, metadata in copies:
            if not os.path.exists(weights):
                if os.path.exists(metadata):
                    unreadable.append(f"{weights} is missing")
                continue
            try:
                epoch = self._restore_copy(weights, metadata)
            except _Unreadable as e:
                unreadable.append(str(e))
                continue
            self._resumed(weights, epoch, unreadable)
            return
        for epoch, path in good_checkpoints(self.model_dir) if self.model_dir else []:
            try:
                _load(self.model, path)
            except _Unreadable as e:
                unreadable.append(str(e))
                continue
            self.model._initial_epoch = epoch  # pylint: disable=protected-access
            self._resumed(path, epoch, unreadable)
            return
        model_dir = self.model_dir or os.path.dirname(os.path.abspath(self.backup_dir))
        raise CheckpointError(
            f"cannot resume: no saved state is readable ({'; '.join(unreadable)}"
            f"{'' if self.model_dir else '; epoch checkpoints not searched'}). Move "
            f"{self.backup_dir} aside to train {model_dir} again from epoch 1 (results.json's "
            "epochs are replaced as they are re-run), or start over with a new --model_dir"
        )

    def _restore_copy(self, weights: str, metadata: str) -> int:
        """Loads one backup copy into the model and returns its finished epochs."""
        try:
            epoch = checkpoints.saved_epoch(weights)
        except checkpoints.HDF5_ERRORS as e:
            raise _Unreadable(weights, e) from e
        if epoch is None:  # written by Keras' BackupAndRestore: the epoch is in the JSON
            try:
                with open(metadata) as f:
                    epoch = int(json.load(f)["epoch"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _Unreadable(metadata, e) from e
        _load(self.model, weights)
        self.model._initial_epoch = epoch  # pylint: disable=protected-access
        return epoch

    def _resumed(self, path: str, epoch: int, unreadable: List[str]) -> None:
        if unreadable:
            logging.warning(
                "%s; resuming from %s instead (after epoch %d)", "; ".join(unreadable), path, epoch
            )
        else:
            # A warning, so that it shows without --verbosity: a resumed run should say so.
            logging.warning("resuming from %s (after epoch %d)", path, epoch)


class _Unreadable(Exception):
    """A saved state that cannot be resumed from: '<file> cannot be read (<why>)'."""

    def __init__(self, path: str, error: BaseException):
        # A CheckpointError's cause is HDF5's own words (what was found);
        # its message adds advice meant for --checkpoint.
        super().__init__(f"{path} cannot be read ({_one_line(error.__cause__ or error)})")


def _load(model: keras.Model, path: str) -> None:
    try:
        checkpoints.load(model, path)
    except (UserError, OSError) as e:
        raise _Unreadable(path, e) from e


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


class _BackupSavePoint(keras.callbacks.Callback):
    def __init__(self, backup: BackupAndRestore):
        super().__init__()
        self.backup = backup

    def on_epoch_end(self, epoch, logs=None):
        keras.callbacks.BackupAndRestore.on_epoch_end(self.backup, epoch, logs)


class CheckpointRetention(keras.callbacks.Callback):
    """Deletes epoch checkpoints beyond the newest `keep`, sparing the best epoch's.

    Runs after ModelCheckpoint and ResultsWriter, so the epoch just saved and
    the best epoch recorded in results.json are known; resuming never needs
    these files (the backup directory holds the resume state).
    """

    def __init__(self, checkpoint_dir: str, keep: int, results_path: str):
        super().__init__()
        self.checkpoint_dir, self.keep, self.results_path = checkpoint_dir, int(keep), results_path

    def on_epoch_end(self, epoch, logs=None):
        saved = epoch_checkpoints(self.checkpoint_dir)
        spare = set(sorted(saved)[-self.keep:])
        if os.path.exists(self.results_path):
            spare.add(read_json(self.results_path).get("best", {}).get("epoch"))
        for epoch_number, path in saved.items():
            if epoch_number not in spare:
                os.remove(path)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` when the loss stops being finite, before anything saves it.

    Training: Keras reports the running mean of the epoch's loss after each
    batch; a single non-finite step makes that mean non-finite, so checking it
    after every batch finds the first bad step. Validation: at learning rate
    1e4 the training loss can stay finite (3e22) while the weights already
    give NaN logits, which only the validation loss shows, at the end of the
    epoch. Either way the exception escapes `fit` before the later epoch-end
    callbacks (this guard comes before them), so the epoch checkpoint,
    results.json and the backup keep the last finished epoch.

    The message names the last good checkpoint (the newest one results.json
    records with finite numbers) and, since a model_dir refuses a changed
    configuration, a new model_dir for the retry with other settings.
    """

    def __init__(self, checkpoint_dir: Optional[str] = None):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = int(self.model.optimizer.iterations.numpy())
        raise NonFiniteLossError(
            f"training loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, "
            f"batch {batch + 1}); stopped without saving this epoch. {self.advice()}"
        )

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is None or math.isfinite(float(loss)):
            return
        raise NonFiniteLossError(
            f"validation loss was {float(loss)} after epoch {epoch + 1} (training loss "
            f"{float((logs or {}).get('loss', math.nan)):.3g}): the weights are broken; stopped "
            f"without saving this epoch. {self.advice()}"
        )

    def advice(self) -> str:
        if not self.checkpoint_dir:
            return "Lower the learning rate or add warm-up (build_sgd.warmup_epochs, or build_sgd.warmup_steps for a short epoch)."
        model_dir = os.path.dirname(os.path.normpath(self.checkpoint_dir))
        good = good_checkpoints(model_dir)
        last_good = f"{good[0][1]} (epoch {good[0][0]})" if good else "none (no epoch finished with finite numbers)"
        return (
            f"Last good checkpoint: {last_good}. Lower the learning rate or add warm-up "
            "(build_sgd.warmup_epochs, or build_sgd.warmup_steps for a short epoch) and start over in a new model directory, e.g. "
            f"--model_dir={model_dir}_retry: this one refuses a changed configuration (re-running "
            "the same command resumes from the last finished epoch with the same settings)."
        )


# The default check comes after one epoch, but never before this many steps:
# in a normal run every head can sit near ln C for the first few dozen steps
# (a tiny split of 8 steps per epoch would be judged too early).
MIN_COLLAPSE_CHECK_STEPS = 30
# How close to ln C a head's cross-entropy must be to count as the prior's.
COLLAPSE_MARGIN = 0.05


def collapse_guards(check_steps: Optional[int], steps_per_epoch: int, num_classes: int, batch_size: int,
                    checkpoint_dir: Optional[str] = None) -> list:
    """[CollapseGuard] for `train.collapse_check_steps` (None: one epoch, at least
    MIN_COLLAPSE_CHECK_STEPS; 0: off), or [] when the check is off or pointless
    (one class)."""
    if check_steps == 0 or num_classes < 2:
        return []
    step = check_steps if check_steps is not None else max(steps_per_epoch, MIN_COLLAPSE_CHECK_STEPS)
    return [CollapseGuard(num_classes, batch_size, step, checkpoint_dir=checkpoint_dir)]


class CollapseGuard(keras.callbacks.Callback):
    """Raises `TrainingCollapsedError` when, at step `check_step`, every head
    predicts the label prior.

    Measured with this project and with the reference PyTorch code alike:
    DHM at lr 0.1 without warm-up diverges in its first steps (loss 9.6 ->
    71 -> 187 on CIFAR-10), the ReLUs feeding the heads die, and every head
    settles on the label prior, cross-entropy ln C and accuracy at chance,
    for good; the run then spends its whole budget learning nothing, with
    every number finite.

    The test, on the means over the second half of the first `check_step`
    steps (the divergence spikes of the first steps would otherwise hide the
    plateau): every head's `ce/bK` within `margin` x ln C of ln C, and every
    head's `top1/bK` no better than chance 1/C plus three standard errors of
    a class frequency over the examples seen (a collapsed head always
    predicts one class, right as often as that class occurs). A head that
    learned anything fails the test, so one learning head is enough to go on.
    Checked once; a resumed run already past `check_step` is not checked. The
    error escapes `fit` before the epoch-end callbacks, so a collapsed epoch
    is never saved.
    """

    def __init__(self, num_classes: int, batch_size: int, check_step: int, margin: float = COLLAPSE_MARGIN,
                 checkpoint_dir: Optional[str] = None):
        super().__init__()
        self.num_classes, self.batch_size = int(num_classes), int(batch_size)
        self.check_step, self.margin = int(check_step), float(margin)
        self.window_start = self.check_step - max(1, self.check_step // 2)  # steps after this one count
        self.checkpoint_dir = checkpoint_dir
        self._means = IntervalMeans()
        self._sums: dict = {}
        self._count = 0
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._means.reset()

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * int(self.params.get("steps") or 0) + batch + 1
        if step > self.check_step:
            return
        keys = [k for k in (logs or {}) if k.startswith(("ce/", "top1/"))]
        values = self._means.update(batch, logs, keys)
        if step <= self.window_start:
            return
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if step == self.check_step:
            self.check(step)

    def check(self, step: int) -> None:
        """Raises if the means summed so far say that every head collapsed."""
        if not self._count:
            return
        mean = {k: v / self._count for k, v in self._sums.items()}
        heads = sorted(k[3:] for k in mean if k.startswith("ce/"))
        if not heads or any(f"top1/{h}" not in mean for h in heads):
            return
        prior_ce, chance = math.log(self.num_classes), 1.0 / self.num_classes
        tolerance = 3.0 * math.sqrt(chance * (1.0 - chance) / (self._count * self.batch_size))
        for head in heads:
            if abs(mean[f"ce/{head}"] - prior_ce) > self.margin * prior_ce:
                return
            if mean[f"top1/{head}"] > chance + tolerance:
                return
        ce = ", ".join(f"{h} {mean['ce/' + h]:.3f}" for h in heads)
        top1 = ", ".join(f"{h} {mean['top1/' + h]:.3f}" for h in heads)
        model_dir = os.path.dirname(os.path.normpath(self.checkpoint_dir)) if self.checkpoint_dir else None
        retry = f" in a new model directory (e.g. --model_dir={model_dir}_retry; this one refuses a changed configuration)" if model_dir else ""
        raise TrainingCollapsedError(
            f"training collapsed: over steps {self.window_start + 1}-{step} every head's cross-entropy "
            f"sat within {self.margin:.0%} of ln({self.num_classes}) = {prior_ce:.3f} ({ce}) and its top-1 "
            f"accuracy at chance, 1/{self.num_classes} ({top1}): the network predicts the label prior for every image and "
            "will not recover (an early divergence, typical of DHM at a high learning rate without "
            "warm-up); stopped before saving this epoch. Start over with a learning-rate warm-up, "
            "--gin_param='build_sgd.warmup_epochs = 1' (build_sgd.warmup_steps = 400 when an epoch is short; or a lower build_sgd.learning_rate)"
            f"{retry}; train.collapse_check_steps = 0 turns this check off"
        )
