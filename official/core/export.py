"""SavedModel export of an image classifier for serving.

Exports one chosen Keras model (for multi-head training, the main head only)
with its preprocessing inside, under a numbered version directory
``<export_dir>/<version>/`` as TensorFlow Serving expects. The version appears
whole or not at all: it is written under a hidden temporary name and renamed,
so a server polling the directory never loads a half-written version and a
crash leaves no broken "latest". Three signatures:

* ``serving_default``: ``images`` uint8 [N, H, W, 3] -> ``logits``,
  ``probabilities``, ``classes`` (top-k class ids) and ``scores`` (their
  probabilities);
* ``serving_float``: ``images`` float32 [N, H, W, 3] in 0..255 (already
  decoded pixels from a pipeline that works in floats), same outputs;
* ``serving_bytes``: ``image_bytes`` string [N] of encoded JPEG/PNG, decoded
  and brought to H x W by the caller's `decode` (for a trainer: its evaluation
  resize/crop, so served bytes see what evaluation saw), then the same outputs.

SIGNATURES lists them with their inputs; tests and the README refer to it.

Given `class_names`, every signature also returns ``class_names`` (string
[N, k], the names of ``classes``), looked up in a table read from the
SavedModel's asset ``assets/class_names.txt`` (one name per line, in label
order), which a client can also read on its own. `extra_files` are written
under ``assets.extra/`` (TF Serving's place for files it does not load),
e.g. a record of the checkpoint an export was made from.

Every request is checked inside the graph, before the model runs. A bad one
is answered with an InvalidArgumentError that names the expected input (e.g.
"expected images of shape [N, 32, 32, 3] uint8, got shape [32,32,3]"), and the
process goes on serving. Unchecked, a rank-3 batch reached oneDNN's Conv2D,
whose CHECK aborts the whole process (SIGABRT), and a 64x64, a rank-5 or a
1-channel batch was answered with meaningless logits. Decisions:

* The signatures still declare ``[None, H, W, 3]`` (``[None]`` for bytes):
  that is what ``saved_model_cli show``, TF Serving's metadata and
  `--mode=eval` (which reads H x W from ``serving_float``) report. The
  declared shape is a promise nobody checks: neither a loaded signature nor
  a Session run (TF Serving's path) compares a request's shape with it, both
  were seen to pass a rank-3 batch to the model. Worse, the optimisers trust it:
  ``tf.rank(images)`` was folded to the constant 4, so a rank check on it let
  a ``[N, 32, 32, 3, 1]`` request through. The checks therefore read the
  shape's *values* at run time (as text, "N,32,32,3", matched against a
  pattern), which no optimiser can know in advance because N is unknown.
  Declaring ``[None, None, None, None]`` instead would also stop the folding,
  but would hide the image size from every reader of the signature.
* A dtype the signature does not take is refused by TensorFlow before the
  graph runs, by a loaded signature and by a Session alike, with an
  InvalidArgumentError naming the expected dtype ("Expects arg[0] to be uint8
  but float is provided"); no check in the graph could see such a request.
* ``serving_float`` also rejects NaN/inf and values outside 0..255: a NaN
  pixel would otherwise come back as NaN logits, and negative or > 255 values
  almost always mean the caller normalised already (the export normalises
  again). A caller whose resize overshoots slightly clips to 0..255 first.
* An empty batch returns empty outputs ``[0, C]`` / ``[0, k]`` without
  running the model: oneDNN's Conv2D returns its input unchanged for a batch
  of 0, so the next op failed with "Incompatible shapes: [16] vs.
  [0,32,32,3]".
* ``serving_bytes``: a string that is not an image (or a truncated one) is the
  decoder's InvalidArgumentError ("Unknown image file format. One of JPEG,
  ..., PNG, ... required."); the caller's `decode` output is checked against
  H x W x 3 at run time, not assumed.

A process killed while writing leaves its staging folder
(``.staging-<pid>-<random>-<host>``); the next export on the same host removes
those whose process is gone (see `remove_stale_staging`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from typing import Callable, Dict, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging


CLASS_NAMES_ASSET = "class_names.txt"
EXTRA_DIR = "assets.extra"

SIGNATURES = {
    "serving_default": "images",
    "serving_float": "images",
    "serving_bytes": "image_bytes",
}


def is_saved_model(path) -> bool:
    """Whether `path` is a SavedModel directory (an export version)."""
    return bool(path) and tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))


def next_version(export_dir: str) -> int:
    """1 + the largest numeric version already under export_dir (1 if none)."""
    if not tf.io.gfile.exists(export_dir):
        return 1
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(export_dir)]
    versions = [int(n) for n in names if n.isdigit()]
    return max(versions, default=0) + 1


def _host() -> str:
    """This host's name as it appears in staging folder names."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


# `.staging-<pid>-<8 hex>` (before hosts were recorded) or `...-<host>`.
_STAGING = re.compile(r"\.staging-(\d+)-[0-9a-f]{8}(?:-(.+))?")


def staging_name() -> str:
    """A hidden folder name for writing something whole before renaming it into
    place: `.staging-<pid>-<8 hex>-<host>`, which `remove_stale_staging` removes
    once its process is gone (a kill can skip any cleanup)."""
    return f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}-{_host()}"


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a process on this host; True when it cannot tell."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # e.g. another user's process: alive
        return True
    return True


def remove_stale_staging(export_dir: str) -> list:
    """Removes staging folders (`staging_name`) left by killed writers; returns their paths.

    A folder is stale when it names this host (or no host: older exports) and
    its process is gone. Folders of live processes are exports in progress
    and stay, as do other hosts' (their processes cannot be checked from here).
    A recycled pid keeps a stale folder until that process ends too: harmless.
    """
    removed = []
    if not tf.io.gfile.isdir(export_dir):
        return removed
    for name in tf.io.gfile.listdir(export_dir):
        match = _STAGING.fullmatch(name.rstrip("/"))
        if not match or (match[2] is not None and match[2] != _host()):
            continue
        pid = int(match[1])
        if _process_alive(pid):
            continue
        path = os.path.join(export_dir, name.rstrip("/"))
        logging.info("export: removing %s, left by process %d, which is gone (killed during an export?)", path, pid)
        try:
            tf.io.gfile.rmtree(path)
            removed.append(path)
        except (tf.errors.OpError, OSError) as error:  # not worth failing this export over
            logging.warning("export: could not remove %s: %s", path, error)
    return removed


def _shape_text(tensor: tf.Tensor) -> tf.Tensor:
    """The run-time shape as text, "2,32,32,3" ("" for a scalar).

    From the values of Shape, which cannot be folded into a constant while the
    batch size is unknown; tf.rank and the length of the shape vector were
    folded from the declared rank (see the module docstring).
    """
    return tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)), separator=",")


def _after(checks: list, tensor: tf.Tensor) -> tf.Tensor:
    """`tensor`, readable only once every check has passed."""
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


def _checked_images(images: tf.Tensor, shape: Sequence[int], dtype: str, check_values: bool) -> tf.Tensor:
    """`images` if it is [N, H, W, C] (and, with check_values, finite and in 0..255).

    Otherwise an InvalidArgumentError before any other op of the request runs;
    the value checks run only after the shape check passed, so a request gets
    the message of its first problem.
    """
    height, width, channels = shape
    expected = f"expected images of shape [N, {height}, {width}, {channels}] {dtype}"
    got = _shape_text(images)
    checks = [tf.debugging.Assert(
        tf.strings.regex_full_match(got, f"[0-9]+,{height},{width},{channels}"),
        [tf.strings.join([expected, ", got shape [", got, "]"])],
    )]
    if check_values:
        expected += " with values in 0..255"
        with tf.control_dependencies(checks):
            finite = tf.reduce_all(tf.math.is_finite(images))
            checks.append(tf.debugging.Assert(finite, [f"{expected}, got NaN or inf"]))
        with tf.control_dependencies(checks):
            low, high = tf.reduce_min(images), tf.reduce_max(images)  # +inf, -inf if empty
            checks.append(tf.debugging.Assert(
                tf.logical_and(low >= 0.0, high <= 255.0),
                [tf.strings.join([expected, ", got values from ", tf.strings.as_string(low, shortest=True),
                                  " to ", tf.strings.as_string(high, shortest=True)])],
            ))
    # ensure_shape: restates the static shape for the model and is a second,
    # run-time guard should a check above ever be optimised away.
    return tf.ensure_shape(_after(checks, images), [None, height, width, channels])


def _checked_bytes(encoded: tf.Tensor) -> tf.Tensor:
    """`encoded` if it is a vector [N] of strings; otherwise an InvalidArgumentError."""
    got = _shape_text(encoded)
    check = tf.debugging.Assert(
        tf.strings.regex_full_match(got, "[0-9]+"),
        [tf.strings.join(["expected image_bytes of shape [N] string (encoded JPEG/PNG), got shape [", got, "]"])],
    )
    return tf.ensure_shape(_after([check], encoded), [None])


def export_image_classifier(
    model: keras.Model,
    export_dir: str,
    image_shape: Sequence[int],
    preprocess: Callable[[tf.Tensor], tf.Tensor],
    top_k: int = 5,
    version: Optional[int] = None,
    decode: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
    class_names: Optional[Sequence[str]] = None,
    extra_files: Optional[Dict[str, str]] = None,
) -> str:
    """Writes `model` with `preprocess` and the three signatures; returns the version path.

    Args:
      model: maps preprocessed float images to logits [N, classes].
      export_dir: the model's base directory; a version subfolder is created.
      image_shape: (H, W, 3) the model expects.
      preprocess: float32 images in 0..255 -> model input (e.g. normalisation).
      top_k: how many classes and scores to return (capped at the class count).
      version: explicit version number; default is the next free one (and the
        one after it if another export takes it first).
      decode: one encoded image (scalar string) -> pixels [H, W, 3] (uint8 or
        float 0..255); default: decode, then plain bilinear resize to H x W.
      class_names: the name of every class in label order; adds the
        ``class_names`` output and the ``assets/class_names.txt`` asset.
      extra_files: {file name: text} written under ``assets.extra/``.
    """
    height, width, channels = (int(d) for d in image_shape)
    num_classes = int(model.outputs[0].shape[-1])
    k = min(top_k, num_classes)
    names_dir = tempfile.mkdtemp(prefix="class_names-")  # the asset's source until it is copied
    try:
        table = _class_name_table(class_names, num_classes, names_dir) if class_names else None
        keys = ("logits", "probabilities", "classes", "scores") + (("class_names",) if table is not None else ())

        # One traced graph of the network that all three signatures call
        # (each signature used to trace the whole network again, which is
        # slow for deep ones such as ResNet-1202's B0).
        @tf.function(input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)], autograph=False)
        def network_logits(pixels: tf.Tensor) -> tf.Tensor:
            return tf.cast(model(preprocess(pixels), training=False), tf.float32)

        network_logits = network_logits.get_concrete_function()  # traced here, once

        def predict(pixels: tf.Tensor) -> tuple:
            logits = network_logits(tf.cast(pixels, tf.float32))
            probabilities = tf.nn.softmax(logits, axis=-1)
            scores, classes = tf.math.top_k(probabilities, k=k)
            names = (table.lookup(tf.cast(classes, tf.int64)),) if table is not None else ()
            return (logits, probabilities, classes, scores) + names

        def nothing() -> tuple:
            names = (tf.fill([0, k], ""),) if table is not None else ()
            return (tf.zeros([0, num_classes]), tf.zeros([0, num_classes]),
                    tf.zeros([0, k], tf.int32), tf.zeros([0, k])) + names

        def classify(pixels: tf.Tensor) -> dict:
            # A batch of 0 must not reach the model (oneDNN's Conv2D mishandles it).
            outputs = tf.cond(tf.shape(pixels)[0] > 0, lambda: predict(pixels), nothing)
            return dict(zip(keys, outputs))

        return _write(model, table, classify, export_dir, (height, width, channels), version, decode, extra_files)
    finally:
        shutil.rmtree(names_dir, ignore_errors=True)


def _class_name_table(class_names: Sequence[str], num_classes: int, directory: str) -> tf.lookup.StaticHashTable:
    """class id -> name, initialised from a text file that the SavedModel keeps as
    its asset (TensorFlow copies the file into assets/ and reads it back on load)."""
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model of {num_classes} classes")
    if any("\n" in n or "\r" in n or not n for n in names):
        raise ValueError("class names must be non-empty and on one line each")
    path = os.path.join(directory, CLASS_NAMES_ASSET)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    initializer = tf.lookup.TextFileInitializer(
        path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
    )
    return tf.lookup.StaticHashTable(initializer, default_value="")


def _write(model, table, classify, export_dir, shape, version, decode, extra_files) -> str:
    """Builds the archive of `classify`'s three signatures and writes it as a new version."""
    height, width, channels = shape

    def default_decode(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        return tf.image.resize(tf.cast(image, tf.float32), (height, width))

    def decode_one(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.cast((decode or default_decode)(encoded), tf.float32)
        return tf.ensure_shape(image, (height, width, channels))

    def classify_bytes(encoded: tf.Tensor) -> dict:
        pixels = tf.map_fn(
            decode_one, _checked_bytes(encoded),
            fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32),
        )
        return classify(pixels)

    archive = keras.export.ExportArchive()
    archive.track(model)
    if table is not None:
        archive.track(table)
    archive.add_endpoint(
        "serving_default",
        lambda images: classify(_checked_images(images, shape, "uint8", check_values=False)),
        input_signature=[tf.TensorSpec([None, *shape], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_float",
        lambda images: classify(_checked_images(images, shape, "float32", check_values=True)),
        input_signature=[tf.TensorSpec([None, *shape], tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serving_bytes",
        classify_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    tf.io.gfile.makedirs(export_dir)
    remove_stale_staging(export_dir)
    staging = os.path.join(export_dir, staging_name())
    try:
        archive.write_out(staging, verbose=False)
        for name, text in (extra_files or {}).items():
            tf.io.gfile.makedirs(os.path.join(staging, EXTRA_DIR))
            with tf.io.gfile.GFile(os.path.join(staging, EXTRA_DIR, name), "w") as f:
                f.write(text)
    except BaseException:  # an error or Ctrl-C while writing; only a kill leaves it
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
        raise
    for _ in range(100):  # another export may claim the same number meanwhile
        candidate = version or next_version(export_dir)
        path = os.path.join(export_dir, str(candidate))
        try:
            tf.io.gfile.rename(staging, path, overwrite=False)
            return path
        except tf.errors.OpError:
            if version or not tf.io.gfile.exists(path):
                tf.io.gfile.rmtree(staging)
                raise
    tf.io.gfile.rmtree(staging)
    raise RuntimeError(f"no free version number under {export_dir}")
