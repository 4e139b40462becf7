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
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Optional, Sequence

import keras
import tensorflow as tf


SIGNATURES = {
    "serving_default": "images",
    "serving_float": "images",
    "serving_bytes": "image_bytes",
}


def next_version(export_dir: str) -> int:
    """1 + the largest numeric version already under export_dir (1 if none)."""
    if not tf.io.gfile.exists(export_dir):
        return 1
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(export_dir)]
    versions = [int(n) for n in names if n.isdigit()]
    return max(versions, default=0) + 1


def export_image_classifier(
    model: keras.Model,
    export_dir: str,
    image_shape: Sequence[int],
    preprocess: Callable[[tf.Tensor], tf.Tensor],
    top_k: int = 5,
    version: Optional[int] = None,
    decode: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
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
    """
    height, width, channels = (int(d) for d in image_shape)
    num_classes = int(model.outputs[0].shape[-1])
    k = min(top_k, num_classes)

    def classify(pixels: tf.Tensor) -> dict:
        logits = tf.cast(model(preprocess(tf.cast(pixels, tf.float32)), training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=k)
        return {"logits": logits, "probabilities": probabilities, "classes": classes, "scores": scores}

    def default_decode(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        return tf.image.resize(tf.cast(image, tf.float32), (height, width))

    def decode_one(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.cast((decode or default_decode)(encoded), tf.float32)
        image.set_shape((height, width, channels))
        return image

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        classify,
        input_signature=[tf.TensorSpec([None, height, width, channels], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_float",
        classify,
        input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serving_bytes",
        lambda encoded: classify(tf.map_fn(decode_one, encoded, fn_output_signature=tf.float32)),
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    tf.io.gfile.makedirs(export_dir)
    staging = os.path.join(export_dir, f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    archive.write_out(staging, verbose=False)
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
