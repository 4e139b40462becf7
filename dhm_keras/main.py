"""Command-line entry point: ``python -m dhm_keras.main --gin_file=... --model_dir=...``.

Flags choose what to run and where; Gin files (``gin/``) choose the
experiment. Errors a user can fix are reported as one line (``error:
<Class>: <what and how to fix>``) with a non-zero exit code: 2 for
configuration (a misspelled Gin binding or file, a missing dataset, class
count or image size mismatches, a model_dir of another run, in use by
another run or not writable), 3 for a run stopped by a NaN/inf loss, 4 for
corrupt input data (see `dhm_keras.errors`); ``--debug`` shows the full
traceback.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from dhm_keras.errors import UserError
from dhm_keras.gin_utils import parse_gin  # noqa: F401  (also what scripts import from here)
from official.common import flags as common_flags

common_flags.define_flags()
FLAGS = flags.FLAGS

def run(argv) -> dict:
    del argv
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required")
    parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    from dhm_keras import experiment, train_lib

    config = experiment.from_gin(FLAGS.data_dir)  # the one read of the configuration
    if FLAGS.mode in ("train_and_eval", "train"):
        return train_lib.train(FLAGS.model_dir, evaluate=FLAGS.mode == "train_and_eval", config=config)
    if FLAGS.mode == "eval":
        return train_lib.evaluate(FLAGS.model_dir, checkpoint=FLAGS.checkpoint, config=config)
    return train_lib.export(FLAGS.model_dir, checkpoint=FLAGS.checkpoint, config=config)


def main(argv) -> None:
    try:
        result = run(argv)
    except (UserError, ValueError, OSError, KeyError) as error:  # OSError: full/read-only disk...
        if FLAGS.debug:
            raise
        message = str(error).strip().splitlines()
        print(f"error: {type(error).__name__}: {' '.join(message)}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
    summary = {k: result[k] for k in ("split", "best", "last", "checkpoint", "export", "metrics") if k in result}
    logging.info("done: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
