"""The one place that parses Gin (after t5x's `gin_utils`).

Every entry point (the CLI, the analysis tools, scripts and tests) parses
its Gin files and bindings here, so they accept and reject the same things,
and then reads the result once with `dhm_keras.experiment.from_gin`.

Paths work from any working directory. A relative Gin file, a Gin
`include` and a relative `dataset.data_dir` are looked up in the working
directory first (so `--gin_file=gin/quickstart.gin` from the repository root
means what it always meant), then in each resource root: the checkout this
package was imported from (a clone, or `pip install -e .`), then the
`share/dhm_keras/` folder that `pip install .` fills with `gin/` and
`quickstart_data/` (see pyproject.toml).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import tokenize
from typing import Optional

import gin

from dhm_keras.errors import GinSyntaxError

# The checkout's root: Gin files include each other by paths relative to it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTRIBUTION = "dhm-keras"  # pyproject.toml's [project] name
_MARKER = "share/dhm_keras/gin/quickstart.gin"  # one of the data files a wheel installs


@functools.lru_cache(maxsize=None)
def resource_roots() -> tuple[str, ...]:
    """Folders holding `gin/` and `quickstart_data/`, most specific first."""
    roots = []
    # A checkout holds gin/quickstart.gin; an installed package's parent is
    # site-packages, whose gin/ is the gin-config library.
    if os.path.isfile(os.path.join(REPO_ROOT, "gin", "quickstart.gin")):
        roots.append(REPO_ROOT)
    try:
        from importlib import metadata

        dist = metadata.distribution(DISTRIBUTION)
        for entry in dist.files or ():
            if entry.as_posix().endswith(_MARKER):  # found through RECORD: works for any install scheme
                root = os.path.normpath(os.path.join(str(dist.locate_file(entry)), "..", ".."))
                if root not in roots:
                    roots.append(root)
                break
    except Exception:  # not installed (a plain checkout): nothing more to find
        pass
    return tuple(roots)


def resolve_path(path: Optional[str]) -> Optional[str]:
    """`path` if it exists as given (or is absolute or empty); else the first
    resource root that holds it, as an absolute path; else `path` unchanged
    (so that the error that follows names what the user wrote)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    for root in resource_roots():
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    return path


def _registered() -> dict:
    """Short configurable name -> its parameter names, from Gin's registry
    (gin-config 0.5 has no public API that lists it)."""
    from gin import config as gin_config

    names = {}
    for _, configurable in gin_config._REGISTRY.items():
        if configurable.module == "gin":  # gin.macro, gin.constant, gin.singleton
            continue
        try:
            parameters = list(inspect.signature(configurable.wrapped).parameters)
        except (TypeError, ValueError):
            parameters = []
        names[configurable.name] = [p for p in parameters if p not in ("self", "args", "kwargs")]
    return names


def _closest(word: str, choices) -> Optional[str]:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def suggest_binding(message: str) -> Optional[str]:
    """The nearest valid `name.param` for Gin's "No configurable matching" or
    "doesn't have a parameter named" error, or None."""
    binding = re.search(r"^\s*(?:[\w./]+/)?([\w.]+)\.(\w+)\s*=", message.splitlines()[-1])
    unknown = re.search(r"No configurable matching '([\w.]+)'", message)
    no_param = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    registered = _registered()
    if unknown:
        name = _closest(unknown.group(1).split(".")[-1], registered)
        if not name:
            return None
        param = binding.group(2) if binding else None
        if param is None:
            return name
        if param in registered[name]:
            return f"{name}.{param}"
        closest = _closest(param, registered[name])
        return f"{name}.{closest}" if closest else name
    if no_param:
        name = no_param.group(1).split(".")[-1]
        closest = _closest(no_param.group(2), registered.get(name, ()))
        return f"{name}.{closest}" if closest else None
    return None


def _with_suggestion(error: ValueError) -> ValueError:
    suggestion = suggest_binding(str(error))
    if not suggestion:
        return error
    return ValueError(f"{str(error).rstrip()}\n  did you mean `{suggestion}`?")


def parse_gin(gin_files, gin_params) -> None:
    """Registers every configurable, then parses files and bindings.

    Importing the modules first is what lets Gin reject an unknown or
    misspelled binding at parse time instead of silently ignoring it; the
    error then suggests the nearest valid name.
    """
    from dhm_keras import train_lib  # noqa: F401  (registers the configurables and the tasks)

    for root in resource_roots():
        gin.add_config_file_search_path(root)
    for path in gin_files:
        if not os.path.exists(resolve_path(path)):
            raise FileNotFoundError(f"Gin file not found: {path}")
    try:
        gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
    except OSError as e:  # an `include` that names a missing file
        raise FileNotFoundError(" ".join(str(e).split())) from e
    except (SyntaxError, tokenize.TokenError) as e:  # gin's parser names only the line
        raise GinSyntaxError(f"cannot parse Gin file(s) {', '.join(gin_files)}: {e}") from e
    except ValueError as e:
        raise _with_suggestion(e) from e
    # One binding at a time, so that a malformed one is named in the error.
    for binding in gin_params or ():
        try:
            gin.parse_config(binding)
        except (SyntaxError, tokenize.TokenError) as e:
            raise GinSyntaxError(
                f"cannot parse --gin_param={binding!r} ({e}); expected 'name.param = value'"
            ) from e
        except ValueError as e:
            raise _with_suggestion(e) from e
    gin.finalize()
