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
  export/<version>/assets.extra/export_source.json   the checkpoint it was made from
  run.lock                           while a run trains or exports here: its host and PID
  import.json                        where an imported checkpoint came from (--mode=import)
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import socket
import time
from typing import Dict, Iterator, List, Optional

from dhm_keras.errors import ConfigMismatchError, ModelDirLockedError, ModelDirWriteError, RunFileError

CONFIG_FILE = "config.json"
OPERATIVE_GIN_FILE = "operative_config.gin"
RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
EXPORT_DIR = "export"
LOCK_FILE = "run.lock"
IMPORT_FILE = "import.json"
# Inside an export version: what it was exported from (see `export_source`).
EXPORT_SOURCE_FILE = "export_source.json"
EXPORT_EXTRA_DIR = "assets.extra"

# Configuration fields that describe how a run executes, not what it learns:
# where the data lives, whether it is cached, how chatty the log is and how
# often it logs, how many checkpoints are kept, the early-collapse check, XLA
# and op determinism. They may change between
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
    "train.log_every_steps",
    "train.collapse_check_steps",
})

# Fields an export or an evaluation may set differently from the run it reads:
# which split it scores and in what batches. Neither changes the trained
# weights, nor what the export computes.
EVALUATION_FIELDS = frozenset({"dataset.eval_split", "train.batch_size"})

# Fields that draw one sample of an experiment: runs differing only in these
# (and in execution fields) are repeats of one experiment over seeds.
SEED_FIELDS = frozenset({"train.seed", "dataset.label_noise_seed"})


def path(model_dir: str, name: str) -> str:
    """`model_dir`/`name`, for the names above."""
    return os.path.join(model_dir, name)


def write_atomically(file_path: str, data) -> None:
    """Writes `data` (bytes or text) to ``<file_path>.tmp-<pid>``, fsyncs it and
    renames it onto `file_path`: a kill or a full disk leaves the old file or the
    new one, never half of one. A failure removes the temporary file. The pid
    keeps two writers (workers, two evaluations writing eval.json) out of one
    temporary file; the suffix keeps it out of `epoch_checkpoints`."""
    tmp = f"{file_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(os.path.dirname(os.path.abspath(file_path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_json_atomically(file_path: str, payload: dict) -> None:
    """`payload` as indented, key-sorted JSON, written by `write_atomically`."""
    write_atomically(file_path, json.dumps(payload, indent=2, sort_keys=True))


# What to do about an unreadable file, without losing the run's work.
_UNREADABLE_ADVICE = {
    RESULTS_FILE: "restore it from a copy, or move it aside: the next run rebuilds it from the "
    "TensorBoard logs in logs/ without training again",
    CONFIG_FILE: "restore it from a copy, or move it aside and re-run with the configuration the "
    "run was trained with (operative_config.gin lists it): the run writes it again",
}


def read_json(file_path: str) -> dict:
    """A model-directory JSON file, or a `RunFileError` naming it if it does not parse."""
    with open(file_path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        advice = _UNREADABLE_ADVICE.get(os.path.basename(file_path), "restore it from a copy, or delete it")
        raise RunFileError(
            f"{file_path} is not valid JSON ({e}); it was probably cut short (a crash or a full "
            f"disk): {advice}"
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


def run_dir_of(file_or_export: str) -> Optional[str]:
    """The model directory that `file_or_export` lies in, if it is one of its
    checkpoints (`<dir>/checkpoints/<file>`) or exports (`<dir>/export/<version>`);
    else None."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(file_or_export)))
    if name and os.path.basename(parent) in (CHECKPOINT_DIR, EXPORT_DIR):
        return os.path.dirname(parent)
    return None


def latest_checkpoint(model_dir: str) -> Optional[str]:
    """The newest epoch checkpoint of the run in `model_dir`, or None."""
    saved = epoch_checkpoints(path(model_dir, CHECKPOINT_DIR))
    return saved[max(saved)] if saved else None


def newest_export(model_dir: str) -> Optional[str]:
    """`<model_dir>/export/<largest version number>`, or None."""
    export_dir = path(model_dir, EXPORT_DIR)
    if not os.path.isdir(export_dir):
        return None
    versions = [int(n) for n in os.listdir(export_dir) if n.isdigit()]
    return os.path.join(export_dir, str(max(versions))) if versions else None


def file_sha256(file_path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(file_path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def export_source(checkpoint: str, recorded_path: Optional[str] = None) -> dict:
    """What an export records about the checkpoint it was made from: its path
    and the SHA-256 of its bytes (a copied or moved run still matches).
    `recorded_path`: where the file will be once its run directory is in place
    (an import writes into a staging directory first)."""
    return {"checkpoint": os.path.abspath(recorded_path or checkpoint), "sha256": file_sha256(checkpoint)}


def exported_from(version_dir: str) -> dict:
    """The `export_source` an export version recorded ({} for exports made
    before it was recorded, or if the record is unreadable)."""
    try:
        with open(os.path.join(version_dir, EXPORT_EXTRA_DIR, EXPORT_SOURCE_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


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


def config_differences(previous: dict, current: dict, may_differ=frozenset()) -> List[str]:
    """'field: old -> new' for every experiment field that differs (but those in `may_differ`).

    A section or field that an older version did not record (the optimizer,
    the precision policy, mimicking.graph) is not compared, so runs started
    before it was added can still resume.
    """
    before = experiment_fields(previous)
    return [
        f"{name}: {before[name]!r} -> {value!r}"
        for name, value in experiment_fields(current).items()
        if name in before and name not in may_differ and value != before[name]
    ]


def check_same_experiment(
    model_dir: str,
    config: dict,
    may_differ=frozenset(),
    remedy: str = "use a new --model_dir",
    what: str = "model_dir",
) -> None:
    """Refuses to mix two configurations in one model directory: a
    `ConfigMismatchError` listing the differences from its config.json.
    `config` is in the JSON form config.json reads back."""
    config_path = path(model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        return
    differences = config_differences(read_json(config_path), config, may_differ)
    if differences:
        raise ConfigMismatchError(
            f"{what} {model_dir} holds a run with a different configuration "
            f"({'; '.join(differences)}); {remedy}"
        )


def check_run_config(model_dir: str, config: dict, checkpoint: Optional[str], verb: str) -> None:
    """Refuses to export or evaluate a run under a configuration it was not trained with.

    Another normalisation, image size or model would export or score a network
    that was never trained that way, and label the result as this run's. The
    configuration is compared with the config.json of `model_dir` (where the
    export or eval.json is written) and of the run that `checkpoint` lies in,
    where those exist; a bare weights file or export elsewhere has nothing to
    be compared with. Execution fields and what an evaluation scores
    (`EVALUATION_FIELDS`) may differ.
    """
    runs = {os.path.realpath(model_dir): (model_dir, "model_dir")}
    owner = run_dir_of(checkpoint) if checkpoint else None
    if owner:
        runs.setdefault(os.path.realpath(owner), (owner, "--checkpoint's model_dir"))
    for run, what in runs.values():
        gin_file = path(run, OPERATIVE_GIN_FILE)
        check_same_experiment(
            run,
            config,
            may_differ=EVALUATION_FIELDS,
            remedy=f"{verb} with the configuration it was trained with (--gin_file={gin_file})",
            what=what,
        )


# ----------------------------------------------------------------------------- the lock
#
# One run at a time per model directory: two would overwrite each other's
# checkpoints and backup, and write every epoch twice into TensorBoard. The
# lock is a file created with O_EXCL (atomic on local file systems and NFS v3+)
# that names its holder. Only a holder on THIS host can be checked: a lock of
# a dead process here is stale and taken over; a lock from another host is
# respected until the user removes it.

_held: Dict[str, int] = {}  # lock file -> nesting depth in this process


@contextlib.contextmanager
def locked(model_dir: str) -> Iterator[str]:
    """Holds `model_dir`'s lock for the `with` block; yields the lock file's path.

    Re-entrant within a process (training exports while it holds the lock).
    Raises `ModelDirLockedError` naming the holder if another live process
    holds it, and `ModelDirWriteError` if the directory cannot be written.
    The lock is removed on leaving the block, also on an exception; a process
    killed without unwinding (SIGKILL, a lost machine) leaves it behind, and
    the next run on the same host finds its PID dead and takes it over.
    """
    with writing(model_dir):
        os.makedirs(model_dir, exist_ok=True)
    lock_path = os.path.realpath(path(model_dir, LOCK_FILE))
    if lock_path in _held:
        _held[lock_path] += 1
        try:
            yield lock_path
        finally:
            _held[lock_path] -= 1
        return
    with writing(model_dir):
        mine = _acquire(model_dir, lock_path)
    _held[lock_path] = 1
    try:
        yield lock_path
    finally:
        del _held[lock_path]
        if _read_lock(lock_path) == mine:  # never remove a lock another run took over
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)


# errno values that mean "this directory cannot be written", not a bug.
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def writing(model_dir: str) -> Iterator[None]:
    """Reports an error that means `model_dir` cannot be written (no permission,
    a read-only or full file system) as a `ModelDirWriteError` naming the
    directory and the fix; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if isinstance(e, ModelDirWriteError) or e.errno not in NOT_WRITABLE:
            raise
        raise ModelDirWriteError(
            f"cannot write to model_dir {model_dir} ({e.strerror}: {e.filename}); use a "
            "--model_dir you can write to (copy a run that is not yours), or fix its "
            "permissions or free space"
        ) from e


def _acquire(model_dir: str, lock_path: str) -> dict:
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(20):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock_path, patience_s=1.0)
            if holder is None:
                continue  # released meanwhile
            if not _is_stale(holder):
                raise ModelDirLockedError(_locked_message(model_dir, lock_path, holder)) from None
            _take_over(lock_path, holder)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: leave no empty lock that would block every run
            os.remove(lock_path)
            raise
        return mine
    raise ModelDirLockedError(
        f"could not take the lock {lock_path}: other runs keep taking and releasing it; "
        "run one at a time per --model_dir"
    )


def _read_lock(lock_path: str, patience_s: float = 0.0) -> Optional[dict]:
    """The holder recorded in `lock_path`; None if there is no lock file.

    A lock is created empty and then written, so an unreadable one is given
    `patience_s` to fill in; after that it counts as held by an unknown
    process (`{}`), which only the user can declare stale.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with open(lock_path) as f:
                holder = json.loads(f.read())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _is_stale(holder: dict) -> bool:
    """True if `holder` is a process of this host that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        # Not held by this process (`_held` says so): an earlier process had
        # this PID, as a container restarted with the same PIDs would.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return _started_after(pid, holder.get("started"))


def _started_after(pid: int, since) -> bool:
    """True if process `pid` started after `since` (a Unix time): its PID was
    reused after the lock's holder died. False where /proc cannot tell."""
    try:
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        with open(f"/proc/{pid}/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return isinstance(since, (int, float)) and started > since + 2.0  # btime is in whole seconds


def _take_over(lock_path: str, holder: dict) -> None:
    """Removes the stale lock of `holder`, unless another run replaced it first."""
    aside = f"{lock_path}.stale.{os.getpid()}"
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return  # another run removed it first
    if _read_lock(aside) != holder:  # another run took over in between: give its lock back
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock_path)
    else:
        logging.getLogger(__name__).warning(
            "Taking over the stale lock %s of pid %s on %s (started %s): that process no longer runs.",
            lock_path, holder.get("pid"), holder.get("host"), _when(holder),
        )
    os.remove(aside)


def _when(holder: dict) -> str:
    started = holder.get("started")
    if not isinstance(started, (int, float)):
        return "at an unknown time"
    return datetime.datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds")


def _locked_message(model_dir: str, lock_path: str, holder: dict) -> str:
    if not holder:
        who = "a run whose lock file cannot be read"
    else:
        who = f"pid {holder.get('pid')} on host {holder.get('host')} (started {_when(holder)})"
    here = holder.get("host") == socket.gethostname()
    return (
        f"model_dir {model_dir} is in use by {who}; two runs in one model directory would "
        "overwrite each other's checkpoints and exports. Wait for it to finish, or use another "
        f"--model_dir. If that run is gone{'' if here else ' (its host shut down or lost)'}, "
        f"delete {lock_path}"
    )
