"""Training callbacks that record what a run achieved, or stop a run gone bad.

`ResultsWriter` keeps ``results.json`` in the model directory current after
every epoch (written atomically, so a kill never leaves half a file) and, on a
resumed run, keeps the epochs already recorded: each epoch appears once.

`BackupAndRestore` writes its backup after every other callback has recorded
the epoch, so a kill can repeat an epoch but never skip one.

`NonFiniteLossGuard` stops training at the first NaN/inf loss by raising,
which (unlike Keras' `TerminateOnNaN`, which lets the epoch end) keeps the
epoch-end callbacks from saving the broken weights over the last good
checkpoint and backup.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import keras

from dhm_keras.errors import NonFiniteLossError
from dhm_keras.model_dir import RESULTS_FILE, epoch_checkpoints, read_json, write_json_atomically

# Re-identification runs are scored by retrieval (RetrievalEvaluator's logs).
RETRIEVAL_METRICS = ("rank1", "rank5", "rank10", "mAP")


def head_accuracies(logs: dict, prefix: str = "") -> dict:
    """Picks ``top1/bK``, ``top5/bK`` and retrieval entries (optionally ``val_``-prefixed)."""
    picked = {}
    for key, value in logs.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(("top1/", "top5/")) or name in RETRIEVAL_METRICS:
            picked[name] = float(value)
    return picked


def score(entry: dict) -> float:
    """What "best" maximises: B0 top-1, or rank-1 for re-identification."""
    return entry.get("top1/b0", entry.get("rank1", float("-inf")))


class ResultsWriter(keras.callbacks.Callback):
    """Writes per-epoch accuracies plus best and last epoch to results.json.

    "Best" is the epoch with the highest validation top-1 of the main head b0
    (rank-1 for re-identification; train top-1 when there is no validation);
    epochs are numbered from 1.
    """

    def __init__(self, model_dir: str, total_epochs: int, config: Optional[dict] = None):
        super().__init__()
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
            best = max(scored, key=lambda e: score(e[split]))
            payload["split"] = split
            payload["best"] = {"epoch": best["epoch"], **head_accuracies(best[split])}
            payload["last"] = {"epoch": scored[-1]["epoch"], **head_accuracies(scored[-1][split])}
        write_json_atomically(self.path, payload)
        return payload


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, saving at the END of the epoch-end callbacks.

    It must come first in the callback list, so that its restore (at train
    begin) precedes everything; but Keras would then also save the backup
    first at each epoch end. A kill between that save and ResultsWriter's
    record of the epoch made the resumed run skip the epoch without ever
    recording it, so results.json never reached "completed", the finished
    run's backup was deleted and the next re-run trained from scratch. Put
    `save_point()` last in the list: the backup is then written only after
    the checkpoint and results.json hold the epoch, and a kill in between just
    repeats that epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        pass  # see save_point()

    def save_point(self) -> keras.callbacks.Callback:
        return _BackupSavePoint(self)


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
    """Raises `NonFiniteLossError` naming the step where the loss stopped being finite.

    Keras reports the running mean of the epoch's loss after each batch; a
    single non-finite step makes that mean non-finite, so checking it after
    every batch finds the first bad step. The exception escapes `fit` before
    `on_epoch_end`, so ModelCheckpoint and BackupAndRestore keep the state of
    the last finished epoch.
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
        saved = epoch_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else {}
        last_good = saved[max(saved)] if saved else "none yet (it failed in the first epoch)"
        raise NonFiniteLossError(
            f"training loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, "
            f"batch {batch + 1}); stopped without saving this epoch. Last good checkpoint: "
            f"{last_good}. Lower the learning rate or add warm-up "
            "(build_sgd.warmup_epochs), then re-run: training resumes from the last finished epoch."
        )
