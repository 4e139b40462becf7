"""absl flags shared by every entry point (Model Garden's `official/common/flags.py` idea).

An entry point that wants these flags in its own `--help` calls
`flags.adopt_module_key_flags(official.common.flags)` after `define_flags()`:
absl's `--help` lists only the main module's key flags and sends everything
else to `--helpfull`.
"""

from absl import flags

MODES = ("train_and_eval", "train", "eval", "export", "import")


def define_flags() -> None:
    """Defines the common flags once (safe to call from several modules)."""
    if "gin_file" in flags.FLAGS:
        return
    flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order. A relative path is "
        "looked up in the working directory, then in the repository (or installation) root, so "
        "'gin/quickstart.gin' works from anywhere.")
    flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.epochs = 2'; applied after the files. "
        "Repeatable; --gin_bindings is the same flag (t5x's name).")
    # t5x and Model Garden scripts spell it --gin_bindings; accept both.
    flags.DEFINE_alias("gin_bindings", "gin_param")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, results and exports go.")
    flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (overrides dataset.data_dir).")
    flags.DEFINE_string("checkpoint", None, "For eval: a .weights.h5 file or an export directory (<model_dir>/export/<version>); "
        "for export: a .weights.h5 file. Default: the latest checkpoint in model_dir. "
        "For import: the foreign checkpoint to convert (a PyTorch .pth/.pth.tar of the reference code).")
    flags.DEFINE_boolean("debug", False, "Show full tracebacks instead of one-line errors.")
