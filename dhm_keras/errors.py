"""Errors a user can fix, each with its own exit code.

`dhm_keras.main` prints any `UserError` as one line (``error: <Class>: ...``)
and exits with its `exit_code`, instead of a traceback; ``--debug`` shows the
traceback. Configuration problems exit with 2 (as absl does for bad flags),
a training run that had to stop exits with 3, bad input data with 4, so
scripts around the trainer can tell them apart.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigMismatchError(UserError, ValueError):
    """The model directory holds a run of a different configuration."""


class ClassCountError(UserError, ValueError):
    """The class count of the model, dataset or checkpoint disagree."""


class CheckpointError(UserError, ValueError):
    """A checkpoint path that is not a loadable weights file of this trainer."""


class CheckpointImportError(UserError, ValueError):
    """A PyTorch checkpoint that cannot be imported into the configured network
    (unreadable, another architecture, class count or head set), or PyTorch
    missing for `--mode=import`."""


class RunFileError(UserError, ValueError):
    """A file in the model directory (config.json, results.json) is unreadable."""


class ModelDirLockedError(UserError, RuntimeError):
    """Another run holds the model directory's lock (two runs would overwrite
    each other's checkpoints, backup, logs and exports)."""


class ModelDirWriteError(UserError, OSError):
    """The model directory cannot be written (no permission, a read-only or
    full file system), e.g. a finished run re-run by another user."""


class TrainSplitTooSmallError(UserError, ValueError):
    """The training split holds fewer examples than one global batch, so an
    epoch would take no step (training batches drop the remainder)."""


class GinSyntaxError(UserError, ValueError):
    """A Gin file or `--gin_param` binding that does not parse."""


class ImageSizeError(UserError, ValueError):
    """The images do not have the size the model, export or architecture needs."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; training stopped."""

    exit_code = 3


class TrainingCollapsedError(UserError, RuntimeError):
    """Every head predicts the label prior (cross-entropy ln C, top-1 at chance):
    training diverged early and will not recover; stopped instead of spending
    the rest of the budget."""

    exit_code = 3


class CorruptInputError(UserError, RuntimeError):
    """A record of the input data cannot be read or decoded."""

    exit_code = 4


class MissingDataFileError(UserError, FileNotFoundError):
    """A file of a prepared dataset is missing: the dataset must be prepared again."""


class WorkerLostError(UserError, RuntimeError):
    """Another worker of a multi-worker run stopped answering (a preempted or
    crashed machine): this one stops too, instead of waiting forever in a
    collective. Re-running every worker with the same command resumes."""

    exit_code = 3
