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
import os
import sys
import tokenize

from absl import app, flags, logging

from dhm_keras.errors import GinSyntaxError, UserError
from official.common import flags as common_flags

common_flags.define_flags()
FLAGS = flags.FLAGS

# Gin files include each other by paths relative to the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_gin(gin_files, gin_params) -> None:
    """Registers every configurable, then parses files and bindings.

    Importing the modules first is what lets Gin reject an unknown or
    misspelled binding at parse time instead of silently ignoring it.
    """
    import gin

    from dhm_keras import train_lib  # noqa: F401  (registers the configurables)

    gin.add_config_file_search_path(REPO_ROOT)
    for path in gin_files:
        if not os.path.exists(path) and not os.path.exists(os.path.join(REPO_ROOT, path)):
            raise FileNotFoundError(f"Gin file not found: {path}")
    try:
        gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
    except OSError as e:  # an `include` that names a missing file
        raise FileNotFoundError(" ".join(str(e).split())) from e
    except (SyntaxError, tokenize.TokenError) as e:  # gin's parser names only the line
        raise GinSyntaxError(f"cannot parse Gin file(s) {', '.join(gin_files)}: {e}") from e
    # One binding at a time, so that a malformed one is named in the error.
    for binding in gin_params or ():
        try:
            gin.parse_config(binding)
        except (SyntaxError, tokenize.TokenError) as e:
            raise GinSyntaxError(
                f"cannot parse --gin_param={binding!r} ({e}); expected 'name.param = value'"
            ) from e
    gin.finalize()


def run(argv) -> dict:
    del argv
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required")
    parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    from dhm_keras import train_lib

    if FLAGS.mode in ("train_and_eval", "train"):
        return train_lib.train(FLAGS.model_dir, FLAGS.data_dir, evaluate=FLAGS.mode == "train_and_eval")
    if FLAGS.mode == "eval":
        return train_lib.evaluate(FLAGS.model_dir, FLAGS.data_dir, FLAGS.checkpoint)
    return train_lib.export(FLAGS.model_dir, FLAGS.data_dir, FLAGS.checkpoint)


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
