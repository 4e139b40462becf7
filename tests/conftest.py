"""Shared test setup: the repository root on sys.path and TF's CPU defaults before TF loads."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import official  # noqa: E402,F401  (turns on oneDNN before TensorFlow is imported)


def run_cli(*args, timeout=1800):
    """`python -m dhm_keras.main *args` from the repository root, output captured."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
