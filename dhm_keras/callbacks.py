"""Training callbacks that record what a run achieved, or stop a run gone bad.

`ResultsWriter` keeps ``results.json`` in the model directory current after
every epoch (written atomically, so a kill never leaves half a file) and, on a
resumed run, keeps the epochs already recorded: each epoch appears once.

`NonFiniteLossGuard` stops training at the first NaN/inf loss by raising,
which (unlike Keras' `TerminateOnNaN`, which lets the epoch end) keeps the
epoch-end callbacks from saving the broken weights over the last good
checkpoint and backup.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import keras

from dhm_keras.errors import NonFiniteLossError

RESULTS_FILE = "results.json"


def _atomic_write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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
            with open(self.path) as f:
                previous = json.load(f)
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
        _atomic_write_json(self.path, payload)
        return payload


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
        last_good = "none yet (it failed in the first epoch)"
        if self.checkpoint_dir and os.path.isdir(self.checkpoint_dir):
            saved = sorted(f for f in os.listdir(self.checkpoint_dir) if f.endswith(".weights.h5"))
            if saved:
                last_good = os.path.join(self.checkpoint_dir, saved[-1])
        raise NonFiniteLossError(
            f"training loss became {float(loss)} at step {step} (epoch {self.epoch + 1}, "
            f"batch {batch + 1}); stopped without saving this epoch. Last good checkpoint: "
            f"{last_good}. Lower the learning rate or add warm-up "
            "(build_sgd.warmup_epochs), then re-run: training resumes from the last finished epoch."
        )
