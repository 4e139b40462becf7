"""absl flags shared by every entry point (Model Garden's `official/common/flags.py` idea)."""

from absl import flags

MODES = ("train_and_eval", "train", "eval", "export")


def define_flags() -> None:
    """Defines the common flags once (safe to call from several modules)."""
    if "gin_file" in flags.FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
    flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.epochs = 2'; applied after the files.")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, results and exports go.")
    flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (overrides dataset.data_dir).")
    flags.DEFINE_string("checkpoint", None, "For eval: a .weights.h5 file or an export directory (<model_dir>/export/<version>); "
        "for export: a .weights.h5 file. Default: the latest checkpoint in model_dir.")
    flags.DEFINE_boolean("debug", False, "Show full tracebacks instead of one-line errors.")
