"""Train, evaluate, export or import a DHM model: ``dhm-train --gin_file=... --model_dir=...``
(the same as ``python -m dhm_keras.main``).

Flags choose what to run and where; Gin files (``gin/``) choose the
experiment. ``--mode=import --checkpoint=<file.pth>`` converts a checkpoint
of the authors' PyTorch code into a run of this trainer (PyTorch needed for
that only). Errors a user can fix are reported as one line (``error:
<Class>: <what and how to fix>``) with a non-zero exit code: 2 for
configuration (a misspelled Gin binding or file, a missing dataset, class
count or image size mismatches, a model_dir of another run, in use by
another run or not writable), 3 for a run stopped by a NaN/inf loss, 4 for
corrupt input data (see `dhm_keras.errors`); ``--debug`` shows the full
traceback.

Quiet by default: TensorFlow's start-up banner and the INFO lines of absl
and TFDS are hidden; ``--verbosity=0`` (or ``-v 0``) shows everything.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from dhm_keras.errors import UserError
from dhm_keras.gin_utils import parse_gin  # noqa: F401  (also what scripts import from here)
from official.common import flags as common_flags
from official.common import startup

common_flags.define_flags()
# absl's --help lists only the main module's key flags: make the common ones ours.
flags.adopt_module_key_flags(common_flags)
flags.declare_key_flag("verbosity")  # absl logging's; shows TensorFlow, TFDS and absl INFO lines
FLAGS = flags.FLAGS


def verbose() -> bool:
    """Whether the user asked for log output with --verbosity (or -v) >= 0 (INFO)."""
    return FLAGS["verbosity"].present and FLAGS.verbosity >= 0


def run(argv) -> dict:
    del argv
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required")
    if not verbose():  # absl switches an unset --verbosity to INFO; TFDS logs every split it opens
        logging.set_verbosity(logging.WARNING)
    startup.import_tensorflow_quietly(verbose())
    parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    from dhm_keras import experiment, train_lib

    config = experiment.from_gin(FLAGS.data_dir)  # the one read of the configuration
    if FLAGS.mode in ("train_and_eval", "train"):
        return train_lib.train(FLAGS.model_dir, evaluate=FLAGS.mode == "train_and_eval", config=config)
    if FLAGS.mode == "import":
        return train_lib.import_checkpoint(FLAGS.model_dir, FLAGS.checkpoint, config=config)
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
    summary = {k: result[k] for k in ("split", "best", "last", "checkpoint", "export", "metrics", "imported") if k in result}
    logging.info("done: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))


def console_main() -> None:
    """The `dhm-train` console command (pyproject.toml's [project.scripts]).

    absl's `--help` shows the docstring of `__main__` and the key flags of
    the module named `sys.argv[0]`; for a console script those are pip's
    wrapper, so hand both over from this module first.
    """
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    console_main()
