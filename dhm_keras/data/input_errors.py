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
  (exit 2): the dataset must be prepared again;
* a record that fails its CRC (``DataLossError``): TensorFlow gives only the
  byte offset, so `locate_damaged_record` walks the record headers of the
  files the pipelines read to find the file (and record index) that has a
  bad record at that offset;
* an image that does not decode: the decoder's message names neither file
  nor record, so `locate_undecodable_image` re-reads the splits' encoded
  images (up to a time budget) to find the first one that fails.

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
import struct
import time
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from dhm_keras import errors

# Marks the label check's assertion in TensorFlow's error text; the fields
# after it are parsed back by `_label_error` (see `checked_label`).
LABEL_CHECK = "dhm-label-check"
_LABEL_FAILURE = re.compile(
    re.escape(LABEL_CHECK)
    + r"\|(?P<source>[^|]*)\|(?P<classes>\d+)\|(?P<directory>.*?)\] \[(?P<record>[^\[\]]*)\] \[(?P<label>-?\d+ -?\d+)\]"
)
# Seconds spent looking for an undecodable image after a decode error.
LOCATE_BUDGET_S = 60.0
# Longest decoder message quoted in an error line.
_MAX_DETAIL = 300


@dataclasses.dataclass(frozen=True)
class Source:
    """What one pipeline reads, kept so that an error can name the damaged record.

    `description` names the split ("split 'train[:128]' of cifar10_jpeg");
    `shards` are its `(record file, first record, number of records)` in
    the order a fixed-order read visits them (TFDS's file instructions), so
    that a position in the split maps to a file and index; `images`, if
    given, returns a fresh dataset of the split's encoded images in that
    order, for `locate_undecodable_image`. `image_files`: each file is one
    image (re-ID folders), not a file of records.
    """

    description: str
    shards: Tuple[Tuple[str, int, int], ...]
    images: Optional[Callable[[], tf.data.Dataset]] = dataclasses.field(default=None, compare=False)
    image_files: bool = False

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
        """"record 12 of <file>" (or the image file) for the split's `position`-th example."""
        found = self.record(position)
        if found is None:
            return None
        return found[0] if self.image_files else f"record {found[1]} of {found[0]}"


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


# ----------------------------------------------------------------------------- damaged records


def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord stores: CRC-32C (Castagnoli), rotated and offset."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _record_at(path: str, offset: int, deadline: float) -> Optional[int]:
    """Index of the record starting at byte `offset` of `path` if that record
    is damaged (bad checksum, or cut short); None otherwise.

    Hops from record to record by their 8-byte length fields (no payload is
    read), so a file in which `offset` is not a record boundary is ruled out
    cheaply; only the record at `offset` is checksummed. Every record before
    `offset` passed TensorFlow's checks, so in the damaged file the hops do
    land on `offset`.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        position, index = 0, 0
        while position < offset:
            if time.monotonic() > deadline:
                return None
            f.seek(position)
            header = f.read(8)
            if len(header) < 8:
                return None
            (length,) = struct.unpack("<Q", header)
            position += 8 + 4 + length + 4
            index += 1
        if position != offset:
            return None
        f.seek(offset)
        header = f.read(12)
        if len(header) < 12:
            return index  # cut short
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
            return index
        payload = f.read(length + 4)
        if len(payload) < length + 4:
            return index
        intact = struct.unpack("<I", payload[length:])[0] == masked_crc32c(payload[:length])
        return None if intact else index


def locate_damaged_record(files: Sequence[str], offset: int, budget_s: float = LOCATE_BUDGET_S) -> Optional[Tuple[str, int]]:
    """(file, record index) of the damaged record TensorFlow reported at byte
    `offset` ("corrupted record at <offset>", without a file name), or None."""
    deadline = time.monotonic() + budget_s
    for path in files:
        try:
            if tf.io.gfile.stat(path).length <= offset:
                continue
            index = _record_at(path, offset, deadline)
        except (OSError, tf.errors.OpError):
            continue
        if index is not None:
            return path, index
        if time.monotonic() > deadline:
            return None
    return None


def locate_undecodable_image(budget_s: float = LOCATE_BUDGET_S) -> Optional[Tuple[str, str]]:
    """("record <index> of <file>" or the image file, source description) of
    the first image, over the live sources, that `tf.io.decode_image` rejects; None if none is
    found within `budget_s` seconds.

    Runs at tf.data speed: the decode errors are dropped (`ignore_errors`)
    and the first gap in the record positions is the bad one.
    """
    deadline = time.monotonic() + budget_s

    def decodes(position, encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return position, tf.shape(image)[0]

    for source in live_sources():
        if source.images is None:
            continue
        positions = (
            source.images().enumerate().map(decodes, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        )
        expected = 0
        for position, _ in positions.as_numpy_iterator():
            if position != expected:
                break  # record `expected` did not decode
            if time.monotonic() > deadline:
                return None
            expected += 1
        name = source.record_name(expected)  # None: every image decoded
        if name:
            return name, source.description
    return None


# ----------------------------------------------------------------------------- error text


def decoder_message(error: tf.errors.OpError, limit: int = _MAX_DETAIL) -> str:
    """The op's own message from TensorFlow's error text, on one line.

    In graph mode (Keras' fit) the text starts "Graph execution error:",
    then a Python stack of where the failing node was defined, then the
    op's message (e.g. "jpeg::Uncompress failed. Invalid JPEG data or
    size."), then node names. Keeps the message and the first node that is
    not the iterator itself ("op decode_image/DecodeImage"), drops the rest.
    """
    text = re.sub(r"\{\{function_node [^}]*\}\}", " ", error.message or "")
    kept, in_stack = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Detected at node"):
            in_stack = True
            continue
        if in_stack and (not stripped or line.startswith("  File ") or stripped == "<stack traces unavailable>"):
            continue
        in_stack = False
        kept.append(stripped)
    text = " ".join(kept).replace("Graph execution error:", " ")
    # tf.data's prefix naming the chain of iterators, then the op's message.
    text = re.sub(r"Error in user-defined function passed to \S+ transformation with iterator: \S+: ", "", text)
    nodes = [n for n in re.findall(r"\{\{node ([^}]+)\}\}", text) if "IteratorGetNext" not in n]
    text = re.sub(r"\[\[.*?\]\]", " ", text)
    text = re.sub(r"\[Op:[^\]]*\]( name:)?", " ", text)
    text = " ".join(text.split())
    if nodes:
        text = f"{text} (op {nodes[0]})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DECODE_WORDS = ("decode", "jpeg", "png", "gif", "bmp", "image", "record")


@contextlib.contextmanager
def input_errors_are_clear(what: str):
    """Turns TensorFlow's errors about the input data into one-line user errors.

    `what` names the data being read ("evaluation", "training or
    evaluation"). Labels out of range and undecodable or damaged records
    become `CorruptInputError` (exit 4), a missing record file
    `MissingDataFileError` (exit 2); each names the file and record where
    it can (see the module docstring) and quotes the decoder's message.
    """
    try:
        yield
    except tf.errors.NotFoundError as e:
        missing = re.match(r"(.+?); No such file or directory", decoder_message(e, limit=10_000))
        if not missing:
            raise
        raise errors.MissingDataFileError(
            _missing_message([missing.group(1)], f"the {what} data")
        ) from e
    except tf.errors.DataLossError as e:
        detail = decoder_message(e)
        offset = re.search(r"(?:corrupted|truncated) record at (\d+)", e.message or "")
        files = list(dict.fromkeys(
            f for source in live_sources() if not source.image_files for f in source.files
        ))
        found = locate_damaged_record(files, int(offset.group(1))) if offset and files else None
        if found:
            where = f"record {found[1]} (byte offset {offset.group(1)}) of {found[0]} is damaged"
        elif files:
            where = f"a record is damaged in one of {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
        else:
            where = "a record is damaged"
        raise errors.CorruptInputError(
            f"corrupt record in the {what} data: {where} ({detail}); re-create or re-download "
            "the dataset (TFDS checks record checksums)"
        ) from e
    except tf.errors.InvalidArgumentError as e:
        label_error = _label_error(e.message or "")
        if label_error is not None:
            raise label_error from e
        if not any(w in (e.message or "").lower() for w in _DECODE_WORDS):
            raise
        detail = decoder_message(e)
        found = locate_undecodable_image()
        where = f"{found[0]} ({found[1]})" if found else "an image"
        raise errors.CorruptInputError(
            f"undecodable record in the {what} data: {where} does not decode ({detail}); "
            "re-create the dataset from intact images"
        ) from e
