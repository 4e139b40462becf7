"""Shared test setup: the repository root on sys.path and TF's CPU defaults before TF loads."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import official  # noqa: E402,F401  (turns on oneDNN before TensorFlow is imported)


def run_cli(*args, timeout=1800, env_extra=None):
    """`python -m dhm_keras.main *args` from the repository root, output captured
    (`env_extra`: environment variables to add, e.g. PYTHONPATH)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "dhm_keras.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})},
    )


def run_report_script(script, timeout=300):
    """Runs `script` in a fresh Python (logical devices must be set before TF
    starts) and returns the JSON it printed on its `REPORT ` line."""
    import json
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


# A small, quick run of the quick-start recipe for tests of errors and run files.
TINY_RUN_ARGS = [
    "--gin_file=gin/quickstart.gin",
    "--gin_param=dataset.train_split = 'train[:128]'",
    "--gin_param=dataset.eval_split = 'test[:64]'",
    "--gin_param=train.batch_size = 64",
    "--gin_param=train.epochs = 2",
    "--gin_param=train.verbose = 0",
    "--gin_param=model.overrides = {'blocks_per_stage': 1}",
]


def rewrite_record(record_file, index, edit):
    """Rewrites example `index` of a TFRecord file through `edit(tf.train.Example)`;
    the file stays well-formed (checksums recomputed), only the content changes."""
    import tensorflow as tf

    records = [r.numpy() for r in tf.data.TFRecordDataset(str(record_file))]
    example = tf.train.Example.FromString(records[index])
    edit(example)
    records[index] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(record_file)) as writer:
        for r in records:
            writer.write(r)
