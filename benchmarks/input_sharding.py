"""Decode work per worker under multi-worker input sharding, old (DATA) against new (FILE).

Question answered: with N workers, how many images does each worker decode
per global epoch? Under the old policy (`distribute.shard_by_data`, tf.data's
DATA sharding) every worker reads and decodes the whole split and keeps 1/N
of each global batch, so the answer is the split size whatever N is: the
input pipeline caps scaling. Under the new one (`make_training_stream` with
a `tf.distribute.InputContext`, files i, i+N, ... for worker i) it should
fall as 1/N.

    .venv/bin/python benchmarks/input_sharding.py        # ~1 min on 2 shared cores
    .venv/bin/python benchmarks/input_sharding.py --files 16 --batch 256 --workers 1 2 4

What it does: writes the committed quick-start training split (5,000 real
CIFAR-10 JPEG records) into `--files` record files (`tools/reshard_tfds.py`,
in a temporary directory), then, for each simulated worker count N and each
worker i, builds the worker's training stream exactly as a run does (seeded,
`cache=False`, pad-crop-flip) under both policies and reads ONE epoch:
`make_training_stream()` as every worker built it before (the whole global
stream, what DATA sharding then filters), and
`make_training_stream(input_context=InputContext(N, i, N))`. Every record that
leaves TFDS is decoded there (the CIFAR path decodes at read), so it counts
records read by a counting `map` placed right after the reader. It prints the
counts and the wall time per worker (workers are run one after another on
this machine; a real cluster runs them in parallel).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import official  # noqa: E402,F401  (oneDNN on before TensorFlow loads)
import tensorflow as tf  # noqa: E402

from dhm_keras.data import epochs as epochs_lib  # noqa: E402
from dhm_keras.data import pipeline  # noqa: E402
from tools.reshard_tfds import reshard  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "quickstart_data", "cifar10_jpeg", "1.0.0")


class DecodeCounter:
    """Wraps `pipeline.read_split` so that every example it yields is counted."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()
        self._real = pipeline.read_split

    def _tick(self, label):
        with self._lock:
            self.count += 1
        return label

    def read_split(self, *args, **kwargs):
        read = self._real(*args, **kwargs)
        counted = read.examples.map(
            lambda x, y: (x, tf.py_function(self._tick, [y], tf.int32)), num_parallel_calls=1
        )
        return dataclasses.replace(read, examples=counted)


def one_epoch_only(one_epoch, first_epoch=0):
    """Stands in for `epochs.stream`: just epoch `first_epoch`, so that
    prefetching cannot start reading the next epoch and inflate the count."""
    return one_epoch(tf.constant(int(first_epoch), tf.int64))


def measure(data_dir: str, workers: int, worker: int, batch: int, sharded: bool):
    counter = DecodeCounter()
    pipeline.read_split = counter.read_split
    try:
        context = tf.distribute.InputContext(workers, worker, workers) if sharded else None
        ds = pipeline.make_training_stream(
            "cifar10_jpeg", "train", data_dir=data_dir, global_batch_size=batch, seed=0, cache=False,
            input_context=context,
        )
        start, examples = time.perf_counter(), 0
        for _, labels in ds:
            examples += int(labels.shape[0])
        return counter.count, examples, time.perf_counter() - start
    finally:
        pipeline.read_split = counter._real


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    epochs_lib.stream = one_epoch_only
    pipeline.epochs_lib.stream = one_epoch_only
    tmp = tempfile.mkdtemp(prefix="dhm_input_sharding_")
    try:
        reshard(SAMPLE, tmp, args.files)
        print(f"split: 5000 CIFAR-10 JPEG records in {args.files} files, global batch {args.batch}, one epoch")
        print(f"{'workers':>7} {'policy':>11} {'decoded/worker':>15} {'trained/worker':>15} "
              f"{'decoded vs N=1':>15} {'s/worker':>9}")
        base = None
        for n in args.workers:
            for policy, sharded in (("DATA (old)", False), ("FILE (new)", True)):
                runs = [measure(tmp, n, i, args.batch, sharded and n > 1) for i in range(n)]
                decoded = max(r[0] for r in runs)
                # Under DATA every worker trains on 1/N of what it reads.
                trained = max(r[1] for r in runs) // (1 if sharded or n == 1 else n)
                base = base or decoded
                seconds = sum(r[2] for r in runs) / n
                print(f"{n:>7} {policy:>11} {decoded:>15} {trained:>15} {decoded / base:>15.3f} {seconds:>9.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
