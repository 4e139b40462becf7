"""The one place that parses Gin (after t5x's `gin_utils`).

Every entry point (the CLI, the analysis tools, scripts and tests) parses
its Gin files and bindings here, so they accept and reject the same things,
and then reads the result once with `dhm_keras.experiment.from_gin`.
"""

from __future__ import annotations

import os
import tokenize

import gin

from dhm_keras.errors import GinSyntaxError

# Gin files include each other by paths relative to the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_gin(gin_files, gin_params) -> None:
    """Registers every configurable, then parses files and bindings.

    Importing the modules first is what lets Gin reject an unknown or
    misspelled binding at parse time instead of silently ignoring it.
    """
    from dhm_keras import train_lib  # noqa: F401  (registers the configurables and the tasks)

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
