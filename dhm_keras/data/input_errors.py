"""Damaged input data as one-line user errors.

The input pipelines are where bad data is read, so the knowledge of what
TensorFlow's errors about it look like lives next to them; the trainer only
wraps its reading loops in `input_errors_are_clear`, and `dhm_keras.main`
prints the resulting `dhm_keras.errors.UserError` as one line.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from dhm_keras import errors


@contextlib.contextmanager
def input_errors_are_clear(what: str):
    """Turns tf.data's errors on unreadable records into `CorruptInputError`.

    TFRecord readers check a CRC per record (DataLossError); image decoders
    fail with InvalidArgumentError naming the codec. Either way the user
    needs to know it is the data, not the code.
    """
    try:
        yield
    except tf.errors.DataLossError as e:
        raise errors.CorruptInputError(
            f"corrupt record in the {what} data: {e.message.splitlines()[0]} "
            "(re-create or re-download the dataset; TFDS checks record checksums)"
        ) from e
    except tf.errors.InvalidArgumentError as e:
        message = e.message.lower()
        if not any(w in message for w in ("decode", "jpeg", "png", "image", "record")):
            raise
        raise errors.CorruptInputError(
            f"undecodable record in the {what} data: {e.message.splitlines()[0]}"
        ) from e
