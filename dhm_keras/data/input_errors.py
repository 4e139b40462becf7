"""Damaged input data as one-line user errors that name the file and record.

A prepared dataset can go bad in ways the code cannot fix, and TensorFlow
reports each of them as a long "Graph execution error" whose first line says
nothing. This module turns them into errors of `dhm_keras.errors` that
`dhm_keras.main` prints as one line, and says where the damage is:

* a label outside ``[0, C-1]``: the pipeline checks every label as it comes
  out of its record (`checked_label`), before shuffling, caching or label
  noise, so that the error names the record (file and index: from the
  example's position in a fixed-order read, or TFDS's ``tfds_id`` when the
  files are read shuffled) and the split. Unchecked, the loss fails on CPU with an
  ``InvalidArgumentError`` naming neither, and on a GPU the sparse
  cross-entropy may silently read outside its row (garbage training);
* a missing record file: `require_files` looks for every file a split reads
  when the pipeline is built, before any training; a file that disappears
  later is a ``NotFoundError`` naming it. Both are `MissingDataFileError`
  (exit 2): the dataset must be prepared again.

The files and splits come from a process-wide list of the live pipelines
that `make_dataset` fills (`remember`): the error surfaces in Keras'
``fit``, far from the code that built the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
import weakref
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from dhm_keras import errors

# Marks the label check's assertion in TensorFlow's error text; the fields
# after it are parsed back by `_label_error` (see `checked_label`).
LABEL_CHECK = "dhm-label-check"
_LABEL_FAILURE = re.compile(
    re.escape(LABEL_CHECK)
    + r"\|(?P<source>[^|]*)\|(?P<classes>\d+)\|(?P<directory>.*?)\] \[(?P<record>[^\[\]]*)\] \[(?P<label>-?\d+ -?\d+)\]"
)


@dataclasses.dataclass(frozen=True)
class Source:
    """What one pipeline reads, kept so that an error can name the damaged record.

    `description` names the split ("split 'train[:128]' of cifar10_jpeg");
    `shards` are its `(record file, first record, number of records)` in
    the order a fixed-order read visits them (TFDS's file instructions), so
    that a position in the split maps to a file and index.
    """

    description: str
    shards: Tuple[Tuple[str, int, int], ...]

    @property
    def files(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(path for path, _, _ in self.shards))

    def record(self, position: int) -> Optional[Tuple[str, int]]:
        """(file, index in the file) of the split's `position`-th record (0-based)."""
        for path, skip, take in self.shards:
            if position < take:
                return path, skip + position
            position -= take
        return None

    def record_name(self, position: int) -> Optional[str]:
        """"record 12 of <file>" for the split's `position`-th example."""
        found = self.record(position)
        return None if found is None else f"record {found[1]} of {found[0]}"


# (source, weak reference to the dataset reading it), oldest first.
_SOURCES: List[Tuple[Source, "weakref.ref"]] = []


def remember(source: Source, dataset: tf.data.Dataset) -> None:
    """Records that `dataset` reads `source`, for as long as `dataset` lives.

    Only live datasets count: in a process that builds several pipelines
    (tests, notebooks), a damaged copy read earlier must not be blamed for
    the error of a later one.
    """
    _SOURCES[:] = [(s, ref) for s, ref in _SOURCES if ref() is not None]
    _SOURCES.append((source, weakref.ref(dataset)))


def live_sources() -> List[Source]:
    """Sources of the datasets still alive, newest first (the likeliest culprit)."""
    gc.collect()  # datasets only kept alive by reference cycles are not live
    return [source for source, ref in reversed(_SOURCES) if ref() is not None]


def _source(description: str, directory: str) -> Optional[Source]:
    for source in live_sources():
        if source.description == description and all(
            os.path.dirname(path) == directory for path in source.files
        ):
            return source
    return None


# ----------------------------------------------------------------------------- labels


def checked_label(label: tf.Tensor, num_classes: int, record: tf.Tensor, source: str, directory: str) -> tf.Tensor:
    """`label` as int32, after a check that fails the pipeline if it is outside [0, num_classes - 1].

    A handful of scalar ops per example, in the graph (measured: a few
    microseconds next to ~80 us to read and decode a 32x32 JPEG record).
    The assertion's data carry what the error must name: `source` (split
    and dataset, as given to `remember`), the class count, the records'
    `directory`, the `record` (its int position in a fixed-order read of the
    split, or TFDS's ``tfds_id`` string "<file>__<index>" when files are read
    shuffled) and the label. Ints travel bitcast to int32 pairs: exact for
    any int64 (a label of 2**32 + 3 is not shown as 3), and an Assert whose
    data are int32 and strings needs no `tf.cond` around it.
    """
    label = tf.convert_to_tensor(label)
    # One unsigned comparison: a negative label wraps to a huge one.
    valid = tf.cast(tf.cast(label, tf.int64), tf.uint64) < num_classes
    if record.dtype != tf.string:
        record = tf.bitcast(tf.cast(record, tf.int64), tf.int32)
    check = tf.debugging.Assert(
        valid,
        [f"{LABEL_CHECK}|{source}|{int(num_classes)}|{directory}", record,
         tf.bitcast(tf.cast(label, tf.int64), tf.int32)],
    )
    with tf.control_dependencies([check]):
        return tf.cast(label, tf.int32)


def _int64(pair: str) -> Optional[int]:
    """The int64 that `checked_label` printed as its bitcast int32 pair ("5 0")."""
    try:
        low, high = (int(v) for v in pair.split())
    except ValueError:
        return None
    value = (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
    return value - (1 << 64) if value >= 1 << 63 else value


def _record_name(record: str, description: str, directory: str) -> str:
    """"record 123 of <directory>/cifar10-train.tfrecord-00000-of-00001" from
    either TFDS's id ("<file>__123") or a position in the split (mapped
    through the remembered `Source`); "example at position N" if no file is known."""
    file, sep, index = record.rpartition("__")
    if sep and index.isdigit():
        return f"record {index} of {os.path.join(directory, file) if directory else file}"
    if record.isdigit():
        source = _source(description, directory)
        name = source.record_name(int(record)) if source else None
        return name or f"example at position {record}"
    return f"example {record}"


def _c_unescape(text: str) -> str:
    """Undoes the C escaping the Assert kernel applies to the strings it prints
    (quotes, backslashes and control characters; UTF-8 is left as it is), so
    that split names and paths read as written."""

    def one(match):
        code = match.group(1)
        if code[0] in "01234567":
            return chr(int(code, 8))
        return {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)

    return re.sub(r"\\([0-7]{1,3}|.)", one, text)


def _label_error(message: str) -> Optional[errors.CorruptInputError]:
    match = _LABEL_FAILURE.search(message)
    if not match:
        return None
    source, directory, record = (_c_unescape(match[k]) for k in ("source", "directory", "record"))
    position = _int64(record)  # a position prints as an int pair, a tfds_id as text
    if position is not None:
        record = str(position)
    classes = int(match["classes"])
    return errors.CorruptInputError(
        f"{_record_name(record, source, directory)} ({source}) has label "
        f"{_int64(match['label'])}, outside the valid range [0, {classes - 1}] of the dataset's {classes} "
        "classes: the record is damaged or the dataset was written for another class list; "
        "prepare the dataset again"
    )


# ----------------------------------------------------------------------------- missing files


def missing_files(files: Sequence[str]) -> List[str]:
    """The `files` that do not exist; one directory listing per directory
    (cheap on cloud storage too, where a stat per shard would not be)."""
    missing, listings = [], {}
    for path in files:
        directory, name = os.path.split(path)
        if directory not in listings:
            try:
                listings[directory] = set(tf.io.gfile.listdir(directory))
            except tf.errors.NotFoundError:
                listings[directory] = set()
        if name not in listings[directory]:
            missing.append(path)
    return missing


def _missing_message(missing: Sequence[str], description: str) -> str:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return (
        f"{missing[0]}{more} of {description} is missing: the prepared dataset is incomplete; "
        "prepare it again (or restore the file from a complete copy)"
    )


def require_files(files: Sequence[str], description: str) -> None:
    """Raises `MissingDataFileError` naming the first missing file, before any training."""
    missing = missing_files(files)
    if missing:
        raise errors.MissingDataFileError(_missing_message(missing, description))


# ----------------------------------------------------------------------------- error text


@contextlib.contextmanager
def input_errors_are_clear(what: str):
    """Turns TensorFlow's errors about the input data into one-line user errors.

    `what` names the data being read ("evaluation", "training or
    evaluation"). A label out of range (see `checked_label`) and damaged or
    undecodable records become `CorruptInputError` (exit 4), a missing
    record file `MissingDataFileError` (exit 2).
    """
    try:
        yield
    except tf.errors.NotFoundError as e:
        missing = re.search(r"(\S+); No such file or directory", e.message or "")
        if not missing:
            raise
        raise errors.MissingDataFileError(
            _missing_message([missing.group(1)], f"the {what} data")
        ) from e
    except tf.errors.DataLossError as e:
        raise errors.CorruptInputError(
            f"corrupt record in the {what} data: {e.message.splitlines()[0]} "
            "(re-create or re-download the dataset; TFDS checks record checksums)"
        ) from e
    except tf.errors.InvalidArgumentError as e:
        label_error = _label_error(e.message or "")
        if label_error is not None:
            raise label_error from e
        message = e.message.lower()
        if not any(w in message for w in ("decode", "jpeg", "png", "image", "record")):
            raise
        raise errors.CorruptInputError(
            f"undecodable record in the {what} data: {e.message.splitlines()[0]}"
        ) from e
