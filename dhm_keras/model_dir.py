"""The model directory: its layout, its JSON files, and what "the same experiment" means.

One run owns one model directory. This module is the only place that knows
the names inside it and the rule that decides whether a configuration
belongs to the run already there. It imports no TensorFlow, so the report
and the analysis tools can read run directories cheaply.

Layout:
  config.json                        the configuration this directory belongs to
  operative_config.gin               every Gin binding the run used
  results.json                       per-epoch metrics, best and last epoch, completed
  eval.json                          the last `--mode=eval` result
  checkpoints/epoch_NNN.weights.h5   weights (and optimizer slots) after an epoch
  backup/                            resume state after a kill
  logs/train, logs/validation        TensorBoard event files
  export/<version>/                  SavedModel of the main branch b0
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

from dhm_keras.errors import RunFileError

CONFIG_FILE = "config.json"
OPERATIVE_GIN_FILE = "operative_config.gin"
RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
EXPORT_DIR = "export"

# Configuration fields that describe how a run executes, not what it learns:
# where the data lives, whether it is cached, how chatty the log is, how many
# checkpoints are kept, XLA and op determinism. They may change between
# attempts on one model directory, and runs that differ only in them are the
# same experiment. (The strategy is not recorded at all, so a run may resume
# on another number of devices with the same global batch.)
EXECUTION_FIELDS = frozenset({
    "dataset.data_dir",
    "dataset.cache",
    "train.verbose",
    "train.jit_compile",
    "train.deterministic",
    "train.keep_checkpoints",
})

# Fields that draw one sample of an experiment: runs differing only in these
# (and in execution fields) are repeats of one experiment over seeds.
SEED_FIELDS = frozenset({"train.seed", "dataset.label_noise_seed"})


def path(model_dir: str, name: str) -> str:
    """`model_dir`/`name`, for the names above."""
    return os.path.join(model_dir, name)


def write_json_atomically(file_path: str, payload: dict) -> None:
    """Writes a temporary file and renames it: a kill or a full disk leaves the
    old file or the new one, never half of one."""
    tmp = f"{file_path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, file_path)


def read_json(file_path: str) -> dict:
    """A model-directory JSON file, or a `RunFileError` naming it if it does not parse."""
    with open(file_path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(
            f"{file_path} is not valid JSON ({e}); it was probably cut short (a crash or a full "
            "disk): restore it from a copy, or move the model directory aside and start anew"
        ) from e


_EPOCH_CHECKPOINT = re.compile(r"epoch_(\d+)\.weights\.h5$")


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint after 1-based `epoch`."""
    return f"epoch_{int(epoch):03d}.weights.h5"


def epoch_checkpoints(checkpoint_dir: str) -> Dict[int, str]:
    """{epoch: path} of the `epoch_NNN.weights.h5` files in `checkpoint_dir`
    (empty if the folder does not exist). Epochs are compared as numbers, so
    epoch 1000 comes after epoch 999."""
    if not os.path.isdir(checkpoint_dir):
        return {}
    found = {}
    for name in os.listdir(checkpoint_dir):
        match = _EPOCH_CHECKPOINT.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(checkpoint_dir, name)
    return found


def latest_checkpoint(model_dir: str) -> Optional[str]:
    """The newest epoch checkpoint of the run in `model_dir`, or None."""
    saved = epoch_checkpoints(path(model_dir, CHECKPOINT_DIR))
    return saved[max(saved)] if saved else None


def flatten(config: dict) -> Dict[str, object]:
    """{"section": {"key": v}} -> {"section.key": v} (non-dict sections skipped)."""
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def experiment_fields(config: dict, across_seeds: bool = False) -> Dict[str, object]:
    """The fields of `config` that define its experiment: everything but the
    execution fields (and, with `across_seeds`, but the seed fields)."""
    ignored = EXECUTION_FIELDS | (SEED_FIELDS if across_seeds else frozenset())
    return {k: v for k, v in flatten(config).items() if k not in ignored}


def config_differences(previous: dict, current: dict) -> List[str]:
    """'field: old -> new' for every experiment field that differs.

    A section or field that an older version did not record (the optimizer,
    the precision policy, mimicking.graph) is not compared, so runs started
    before it was added can still resume.
    """
    before = experiment_fields(previous)
    return [
        f"{name}: {before[name]!r} -> {value!r}"
        for name, value in experiment_fields(current).items()
        if name in before and value != before[name]
    ]
