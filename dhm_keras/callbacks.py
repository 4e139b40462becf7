"""Training callbacks that record what a run achieved.

`ResultsWriter` keeps ``results.json`` in the model directory current after
every epoch (written atomically, so a kill never leaves half a file) and, on a
resumed run, keeps the epochs already recorded: each epoch appears once.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import keras

RESULTS_FILE = "results.json"


def _atomic_write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def head_accuracies(logs: dict, prefix: str = "") -> dict:
    """Picks ``top1/bK`` and ``top5/bK`` entries (optionally ``val_``-prefixed)."""
    picked = {}
    for key, value in logs.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(("top1/", "top5/")):
            picked[name] = float(value)
    return picked


class ResultsWriter(keras.callbacks.Callback):
    """Writes per-epoch accuracies plus best and last epoch to results.json.

    "Best" is the epoch with the highest validation top-1 of the main head b0
    (train top-1 when there is no validation); epochs are numbered from 1.
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
            best = max(scored, key=lambda e: e[split].get("top1/b0", float("-inf")))
            payload["split"] = split
            payload["best"] = {"epoch": best["epoch"], **head_accuracies(best[split])}
            payload["last"] = {"epoch": scored[-1]["epoch"], **head_accuracies(scored[-1][split])}
        _atomic_write_json(self.path, payload)
        return payload
