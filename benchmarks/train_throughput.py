"""Training-step throughput of baseline, DSL and DHM, measured side by side.

The machine is shared and noisy, so the three modes are timed in interleaved
rounds within one process and the ratios use the median of the rounds:

    .venv/bin/python benchmarks/train_throughput.py --model resnet32 --batch 128 --rounds 5

Prints images/s per mode and the ratios DHM/DSL (cost of the mimicking terms)
and DSL/baseline (cost of the branches). Synthetic input: this measures the
model step, not the input pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import official  # noqa: E402,F401  (CPU defaults before TensorFlow loads)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from dhm_keras import models  # noqa: E402
from dhm_keras.model import DHMModel  # noqa: E402
from official.modeling import optimization  # noqa: E402


def compiled_model(name, mode, num_classes, jit_compile):
    keras.utils.set_random_seed(0)
    model = DHMModel(models.build(name, num_classes, mode=mode), mode=mode)
    model.compile(optimizer=optimization.L2SGD(0.01, l2=1e-4), jit_compile=jit_compile)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args()

    images = tf.random.normal((args.batch, 32, 32, 3))
    labels = tf.random.uniform((args.batch,), 0, args.classes, tf.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat(args.steps)
    modes = ("baseline", "dsl", "dhm")
    compiled = {m: compiled_model(args.model, m, args.classes, args.jit_compile) for m in modes}
    for model in compiled.values():  # trace and warm up outside the timed rounds
        model.fit(data.take(2), verbose=0)
    rates = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            start = time.perf_counter()
            compiled[mode].fit(data, verbose=0)
            rates[mode].append(args.steps * args.batch / (time.perf_counter() - start))
    median = {m: statistics.median(r) for m, r in rates.items()}
    print(f"{args.model}, batch {args.batch}, {args.rounds} interleaved rounds of {args.steps} steps, "
          f"jit_compile={args.jit_compile}, devices={[d.name for d in tf.config.list_logical_devices()]}")
    for mode in modes:
        print(f"  {mode:9s} {median[mode]:8.1f} images/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[mode])})")
    print(f"  ratio DHM/DSL throughput      {median['dhm'] / median['dsl']:.3f}")
    print(f"  ratio DSL/baseline throughput {median['dsl'] / median['baseline']:.3f}")


if __name__ == "__main__":
    main()
