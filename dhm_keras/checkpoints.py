"""Weights files (epoch checkpoints and backups): written whole or not at all, read with a diagnosis.

Writing. Keras' `save_weights` lets HDF5 write straight into the target file.
When a write fails (a full disk, ``ulimit -f``) that leaves a truncated file
under the checkpoint's name, and worse: the half-written HDF5 objects, freed
later by Python's garbage collector, make HDF5 flush again and the process
segfaults (exit 139) after the one-line error was printed. Here HDF5 writes
into memory only; the finished bytes go to ``<name>.tmp-<pid>`` with plain
Python I/O, are fsynced and renamed onto the name. A failed write is an
ordinary `OSError` that names the checkpoint, the temporary file is removed,
and a file under a checkpoint's name is always complete. The price is one
checkpoint's size in memory while it is saved.

Each file also records, as the HDF5 attribute ``epoch``, how many epochs had
finished when it was written, so a backup says by itself which epoch it
holds (Keras keeps that in a separate JSON file, which a kill can leave out
of step with the weights).

Reading. `load` turns every way a weights file can fail into a one-line
error saying what was found: a directory or export, not HDF5, truncated,
damaged inside, an HDF5 file of something else (`CheckpointError`), or a
checkpoint of this trainer for another class count or model
(`ClassCountError`).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Dict, Optional

import h5py
import keras

from dhm_keras.errors import CheckpointError, ClassCountError
from dhm_keras.model_dir import CHECKPOINT_DIR, checkpoint_name, write_atomically

# HDF5 raises these for files it cannot parse: OSError when it cannot open
# one, RuntimeError/KeyError/ValueError for broken structures inside.
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def weights_bytes(model: keras.Model, epoch: Optional[int] = None) -> memoryview:
    """The ``.weights.h5`` file `model.save_weights` would write, built in memory.

    Uses the writer of Keras' `save_weights` (`saving_lib`'s H5IOStore and
    `_save_state`; keras is pinned in requirements.txt), given an in-memory
    file instead of a path: the public API only takes a path.
    """
    from keras.src.saving import saving_lib

    if not model.built:
        raise ValueError(f"cannot save the weights of unbuilt model {model.name}")
    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        saving_lib._save_state(  # pylint: disable=protected-access
            model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
        )
        if epoch is not None:
            store.h5_file.attrs["epoch"] = int(epoch)
    finally:
        store.close()
    return buffer.getbuffer()


def save(model: keras.Model, path: str, epoch: Optional[int] = None) -> None:
    """Saves `model`'s weights (and optimizer state) to `path`, atomically (see `write`)."""
    write(path, weights_bytes(model, epoch))


def write(path: str, data) -> None:
    """`model_dir.write_atomically`, creating the folder; an `OSError` names the file and
    says that nothing was lost, so the user knows a re-run after freeing space resumes."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomically(path, data)  # model_dir's: one atomic writer for every run file
    except OSError as e:
        raise OSError(
            e.errno,
            f"cannot save {path}: {e.strerror or e} (the disk may be full; earlier checkpoints "
            "are intact): free space, then re-run the same command: training resumes from the "
            "last finished epoch",
        ) from e


def saved_epoch(path: str) -> Optional[int]:
    """The ``epoch`` attribute `save` stores, or None (a file Keras wrote)."""
    with h5py.File(path, "r") as f:
        epoch = f.attrs.get("epoch")
    return None if epoch is None else int(epoch)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves ``checkpoint_dir/epoch_NNN.weights.h5`` after every epoch with `save`.

    Replaces Keras' ModelCheckpoint (``save_weights_only=True``), which writes
    in place: see the module docstring.
    """

    def __init__(self, checkpoint_dir: str):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir

    def on_epoch_end(self, epoch, logs=None):
        save(self.model, os.path.join(self.checkpoint_dir, checkpoint_name(epoch + 1)), epoch=epoch + 1)


def _short(error: BaseException, limit: int = 200) -> str:
    return " ".join(str(error).split())[:limit]


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def dataset_shapes(file: h5py.File) -> Dict[str, tuple]:
    """{path: shape} of every dataset in `file`, visiting every group and header."""
    shapes = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes[name] = tuple(obj.shape)

    file.visititems(visit)
    return shapes


def read_structure(path: str) -> Dict[str, tuple]:
    """{dataset path: shape} of weights file `path`, or a `CheckpointError` if HDF5
    cannot open it (not HDF5, truncated) or cannot walk it (damaged inside).

    Walking every group and dataset header finds damage to the file's
    structure before Keras half-loads it; damage to the stored numbers
    themselves is not detectable (Keras writes no checksums).
    """
    if not h5py.is_hdf5(path):
        raise CheckpointError(
            f"cannot load checkpoint {path}: not an HDF5 file; expected a .weights.h5 file "
            "written by this trainer"
        )
    try:
        file = h5py.File(path, "r")
    except OSError as e:  # truncated or unreadable
        raise CheckpointError(
            f"cannot read checkpoint {path} ({_short(e)}); a crash while it was saved can "
            "truncate the newest one: pass an earlier epoch's file with --checkpoint"
        ) from e
    with file:
        try:
            return dataset_shapes(file)
        except HDF5_ERRORS as e:
            raise CheckpointError(
                f"checkpoint {path} is damaged: HDF5 cannot read its structure ({_short(e)}); "
                "pass an earlier epoch's file with --checkpoint"
            ) from e


def _expected_shapes(model: keras.Model) -> Dict[str, tuple]:
    """What `model`'s own weights file would hold, {dataset path: shape}."""
    with h5py.File(io.BytesIO(weights_bytes(model)), "r") as f:
        return dataset_shapes(f)


def _misfit(path: str, found: Dict[str, tuple], model: keras.Model, expected: str, error: Exception):
    """The error for a readable file whose weights do not fit `model`.

    No layer in common: the file is not a checkpoint of this trainer
    (`CheckpointError` listing what the file holds). Otherwise a checkpoint
    of another class count or model (`ClassCountError`, naming the first
    weight whose shape differs).
    """
    wanted = _expected_shapes(model)
    layers = {name for name in found if name.startswith("layers/")}
    if not layers & set(wanted):
        with h5py.File(path, "r") as f:
            top = ", ".join(sorted(f.keys())) or "nothing"
        return CheckpointError(
            f"{path} is an HDF5 file without this trainer's layers (top level: {top}); "
            "expected a .weights.h5 file written by this trainer, such as "
            f"<model_dir>/{CHECKPOINT_DIR}/epoch_NNN.weights.h5"
        )
    differs = [
        f"{name}: {found[name]} in the file, {shape} here"
        for name, shape in sorted(wanted.items())
        if name in found and found[name] != shape
    ]
    detail = differs[0] if differs else _short(error, 300)
    return ClassCountError(
        f"checkpoint {path} does not fit {expected}: was it trained on another dataset or "
        f"model? ({detail})"
    )


def load(
    model: keras.Model,
    path: Optional[str],
    strategy=None,
    expected: str = "this model",
    model_dir: Optional[str] = None,
) -> str:
    """Loads weights file `path` into `model` and returns `path`; every failure is
    a one-line error (see the module docstring).

    `expected` describes the model in a `ClassCountError` ("model resnet32
    (dhm) with 10 classes of dataset cifar10"); `model_dir` names where
    checkpoints live in the hints; `strategy` scopes the optimizer's build.
    """
    example = os.path.join(model_dir or "<model_dir>", CHECKPOINT_DIR, checkpoint_name(1))
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"no checkpoint to load: {path or os.path.join(model_dir or '<model_dir>', CHECKPOINT_DIR)} "
            "(train first, or pass --checkpoint=<file.weights.h5>)"
        )
    if os.path.isdir(path):
        what = "an exported SavedModel" if _is_saved_model(path) else "a directory"
        raise CheckpointError(
            f"--checkpoint={path} is {what}; this needs a weights file such as {example} "
            "(only --mode=eval also scores an export directory)"
        )
    found = read_structure(path)
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        # Checkpoints hold the optimizer's slots too; an unbuilt optimizer
        # would skip them with a warning that reads like a failed load.
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    try:
        model.load_weights(path)
    except ValueError as e:  # Keras: variables missing or of another shape
        raise _misfit(path, found, model, expected, e) from e
    except HDF5_ERRORS as e:  # damage the structure walk did not reach
        raise CheckpointError(
            f"checkpoint {path} is damaged: {_short(e)}; pass an earlier epoch's file with --checkpoint"
        ) from e
    return path
