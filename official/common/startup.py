"""A quiet TensorFlow start-up for command-line entry points.

Importing TensorFlow 2.21 writes, from C++ and before absl's C++ logging is
initialised (so `TF_CPP_MIN_LOG_LEVEL` cannot hide it), a banner of INFO
lines (oneDNN, "Could not find cuda drivers", CPU instructions) once per
shared library that loads, i.e. twice; the first device query on a machine
without a CUDA driver then logs "failed call to cuInit" as an ERROR. None of
it is actionable, and it buries the lines a user needs.

`import_tensorflow_quietly()` imports TensorFlow and queries the devices
with the process's stderr (file descriptor 2, which C++ writes to) sent to a
temporary file, then passes on every line except that known noise, once.
Nothing else is dropped: a real error while loading still reaches the user.
With `verbose=True` nothing is captured and everything prints as it comes.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile

# "I0000 00:00:1796104124.457844   10052 port.cc:153] ..." (absl C++ log prefix).
_CPP_PREFIX = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CPU_GUARD_CONTINUATION = "To enable the following instructions:"


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library can be loaded, i.e. whether a GPU could be used at all."""
    if not sys.platform.startswith("linux"):
        return True  # only filter what we have seen (Linux); elsewhere keep every line
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def filter_startup_lines(text: str, cuda_driver: bool) -> list[str]:
    """The lines of TensorFlow's start-up output worth showing (each once)."""
    kept, seen = [], set()
    for line in text.splitlines():
        match = _CPP_PREFIX.match(line)
        if line.strip() == _ABSL_PREINIT or line.startswith(_CPU_GUARD_CONTINUATION):
            continue
        if match and match.group(1) == "I":
            continue  # C++ INFO lines: the banner
        if match and not cuda_driver and "failed call to cuInit" in line:
            continue  # no driver, so no GPU: the failure to start CUDA says nothing new
        key = line[match.end():] if match else line  # the same message from a second library
        if key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return kept


def import_tensorflow_quietly(verbose: bool = False):
    """Imports TensorFlow without its start-up banner (see the module docstring); returns it.

    Also sets `TF_CPP_MIN_LOG_LEVEL=1` (unless set) so that C++ INFO lines
    after start-up stay hidden too. Call before anything imports TensorFlow;
    afterwards there is nothing left to hide and this just returns it.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # where the cuInit line comes from
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            for line in filter_startup_lines(text, cuda_driver_present()):
                print(line, file=sys.stderr)
    return tf
