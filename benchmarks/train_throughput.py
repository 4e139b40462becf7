"""Training-step throughput of baseline, DSL and DHM, the input pipeline, and serving latency.

The machine is shared and noisy, so everything is timed in interleaved rounds
within one process, after one untimed round of all of it, and the ratios use
the median of the rounds:

    .venv/bin/python benchmarks/train_throughput.py --model resnet32 --batch 128 --rounds 5

Prints, side by side:

* images/s of the baseline, DSL and DHM training steps on synthetic input
  (the model step alone), and the ratios DHM/DSL (cost of the mimicking terms)
  and DSL/baseline (cost of the branches);
* images/s of the real input pipeline (`dhm_keras.data.make_dataset` on the
  committed CIFAR-10 sample, training split, cached, augmented, batch
  `--batch`) over DHM's step images/s: the pipeline must keep the model fed
  (target >= 3);
* latency of the exported B0 SavedModel (`DHMModel.main_branch()` through
  `official.core.export.export_image_classifier`) over a plain backbone built
  with mode='baseline' exported and served the same way, at batch 1 and
  `--batch` (target <= 1.02: the branches cost nothing at inference);
* with `--bf16`, `--fp16`, `--xla`: the DHM step under mixed_bfloat16 and/or
  mixed_float16 (loss-scaled), each with XLA off and, with `--xla`, on, as
  images/s over the float32 step, with the per-round ratios (the GPU grid of
  issue #4: `--bf16 --fp16 --xla`). `--bf16` is on by default where the CPU
  has native bfloat16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo) or a GPU
  is present, off elsewhere: without native kernels bfloat16 is ~14x slower
  (`--no-bf16` / `--bf16` override). The first line names the CPU and its
  BF16 flags and what `set_precision_policy.policy = 'auto'` picks here;
* with `--dhm_only`: only the DHM steps (float32 and the variants above), no
  baseline/DSL, pipeline or serving: the short precision comparison;
* with `--keras_bn`: DHM step images/s with our fused batch-norm training path
  over Keras' own unfused one (`layers.BatchNormalization.fused = False`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import official  # noqa: E402,F401  (CPU defaults before TensorFlow loads)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dhm_keras import data as data_lib  # noqa: E402
from dhm_keras import models  # noqa: E402
from dhm_keras.model import DHMModel  # noqa: E402
from dhm_keras.models import layers as layers_lib  # noqa: E402
from official.core import export as export_lib  # noqa: E402
from official.modeling import optimization, performance  # noqa: E402

DATASET = "cifar10_jpeg"
DATA_DIR = str(REPO_ROOT / "quickstart_data")


def compiled_model(name, mode, num_classes, jit_compile, precision="float32", fused_bn=True):
    performance.set_precision_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        network = models.build(name, num_classes, mode=mode)
        for layer in network.layers:  # before the first trace
            if isinstance(layer, layers_lib.BatchNormalization):
                layer.fused = fused_bn
        model = DHMModel(network, mode=mode)
        model.compile(optimizer=optimization.L2SGD(0.01, l2=1e-4), jit_compile=jit_compile)
    finally:
        performance.set_precision_policy("float32")
    return model


PRECISIONS = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def dhm_variants(bf16: bool, fp16: bool, xla: bool, jit_compile: bool) -> dict:
    """{label: (precision policy, jit_compile)} of the extra DHM steps to time.

    The grid is every requested precision (float32 always) times XLA as given
    by `--jit_compile` and, with `--xla`, its opposite; the plain "dhm" step
    (float32, `jit_compile`) is timed anyway and is left out.
    """
    precisions = ["float32"] + ["bf16"] * bf16 + ["fp16"] * fp16
    jits = [jit_compile] + [not jit_compile] * xla
    return {
        f"dhm {p}, jit_compile={jit}": (PRECISIONS[p], jit)
        for p in precisions
        for jit in jits
        if (p, jit) != ("float32", jit_compile)
    }


def synthetic_batches(batch: int, num_classes: int, steps: int) -> tf.data.Dataset:
    """`steps` copies of one random batch, with tf.data's autotuning off.

    Why off: with autotuning on, tf.data runs a model thread that re-plans with
    a doubling period (10 ms, 20 ms, ... up to a minute) and, in TF 2.21,
    destroying the iterator waits for that thread's current sleep to end. Keras
    destroys the iterator when `fit()` returns, so each timed `fit()` lasted
    until the next point of 10 ms x (2**k - 1) after its start: rates landed on
    exactly 50.0 / 62.5 / 100.0 / 125.0 images/s whatever the model did (the
    stack of such a wait: `RootDataset::Iterator::~Iterator` joining the
    thread). A repeated constant tensor has nothing to tune.
    """
    images = tf.random.normal((batch, 32, 32, 3), seed=0)
    labels = tf.random.uniform((batch,), 0, num_classes, tf.int32, seed=0)
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensors((images, labels)).repeat(steps).with_options(options)


def pipeline(batch):
    return data_lib.make_dataset(
        DATASET, "train", data_dir=DATA_DIR, global_batch_size=batch, training=True, seed=0, cache=True
    )


def time_epoch(dataset) -> float:
    """images/s of one pass over `dataset` (nothing but the pipeline runs).

    The iterator is kept alive until the clock is read: destroying it waits
    for tf.data's autotuning thread (see `synthetic_batches`), which is a
    teardown cost, not a cost per image.
    """
    start, images = time.perf_counter(), 0
    iterator = iter(dataset)
    for x, _ in iterator:
        images += int(x.shape[0])
    rate = images / (time.perf_counter() - start)
    del iterator
    return rate


def exported_servers(model_name, num_classes, export_root):
    """{"B0 of DHM": fn, "baseline": fn}: serving_default of two SavedModels."""
    mean, std = data_lib.channel_stats(DATASET)
    preprocess = lambda pixels: data_lib.normalize(pixels, mean, std)  # noqa: E731
    keras.utils.set_random_seed(0)
    dhm = DHMModel(models.build(model_name, num_classes, mode="dhm"), mode="dhm")
    plain = models.build(model_name, num_classes, mode="baseline")
    # The same call path for both: input -> b0 logits, exported and reloaded.
    candidates = {
        "B0 of DHM": dhm.main_branch(),
        "baseline": keras.Model(plain.inputs, plain.output["b0"], name="baseline"),
    }
    servers = {}
    for label, model in candidates.items():
        path = export_lib.export_image_classifier(
            model, os.path.join(export_root, label.replace(" ", "_")), (32, 32, 3), preprocess
        )
        loaded = tf.saved_model.load(path)
        servers[label] = (loaded, loaded.signatures["serving_default"])
    counts = {label: sum(int(np.prod(v.shape)) for v in s[0].variables) for label, s in servers.items()}
    return {label: s[1] for label, s in servers.items()}, counts


def latency_ms(servers: dict, images, calls) -> dict:
    """Median wall time of one call per server, in ms. Calls alternate between servers,
    in an order reversed every call, so load changes on the shared machine hit all alike."""
    times = {label: [] for label in servers}
    labels = list(servers)
    for i in range(calls):
        for label in labels if i % 2 == 0 else labels[::-1]:
            start = time.perf_counter()
            servers[label](images=images)["logits"].numpy()
            times[label].append(time.perf_counter() - start)
    return {label: 1000.0 * statistics.median(t) for label, t in times.items()}


def gpu_names() -> str:
    """", GPUs: <card names>" when TensorFlow sees GPUs (numbers need the card next to them)."""
    names = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
             for g in tf.config.list_physical_devices("GPU")]
    return f", GPUs: {names}" if names else ""


def default_bf16() -> bool:
    """`--bf16`'s default: where bfloat16 has native kernels (a CPU with avx512_bf16
    or amx_bf16, or a GPU, where the row shows what the card does), not elsewhere."""
    return bool(performance.native_bf16_flags(performance.read_cpu_flags())
                or tf.config.list_physical_devices("GPU"))


def print_variants(variants, rates, median, jit_compile):
    """Each extra DHM step beside the float32 one: images/s, ratio of medians and
    per-round ratios (each round times them back to back, so a burst of load on the
    shared machine hits both)."""
    for label in variants:
        paired = [v / f for v, f in zip(rates[label], rates["dhm"])]
        print(f"  {label:32s} {median[label]:8.1f} images/s, "
              f"x{median[label] / median['dhm']:.3f} of dhm float32, jit_compile={jit_compile}  "
              f"(rounds: {fmt(rates[label])}; per-round ratios {fmt(paired, 3)}, "
              f"median {statistics.median(paired):.3f})")


def fmt(values, digits=1):
    return ", ".join(f"{v:.{digits}f}" for v in values)


def reference_step(batch: int, classes: int):
    """A closure running one DHM step of the PyTorch reference re-implementation.

    Imported only on request: PyTorch is a benchmark dependency, not a runtime one.
    Same batch, classes, loss (3 CE + 6 KL) and SGD as our step; 2 threads like TF here.
    """
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_reference

    return torch_reference.step_closure(batch, classes, threads=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time DHM under mixed_bfloat16 (default: on where this CPU has native "
                             "BF16 or a GPU is present)")
    parser.add_argument("--fp16", action="store_true", help="also time DHM under mixed_float16")
    parser.add_argument("--xla", action="store_true",
                        help="also time each DHM precision with jit_compile the other way")
    parser.add_argument("--keras_bn", action="store_true",
                        help="also time DHM with Keras' unfused batch norm")
    parser.add_argument("--dhm_only", action="store_true",
                        help="time only the DHM step and its precision/XLA variants")
    parser.add_argument("--latency_calls", type=int, default=20, help="batch-1 calls per round")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch re-implementation of the reference DHM step "
                             "(benchmarks/torch_reference.py; pip install -r benchmarks/requirements.txt)")
    args = parser.parse_args()
    machine = performance.cpu_description()
    auto, reason = performance.resolve_precision_policy("auto")
    if args.bf16 is None:
        args.bf16 = default_bf16()
    print(f"CPU: {machine}; set_precision_policy 'auto' -> {auto} ({reason}); --bf16 {'on' if args.bf16 else 'off'}",
          flush=True)
    if args.dhm_only and (args.torch or args.keras_bn):
        parser.error("--torch and --keras_bn print with the full table; drop --dhm_only")
    torch_step = reference_step(args.batch, args.classes) if args.torch else None

    data = synthetic_batches(args.batch, args.classes, args.steps)
    modes = ("dhm",) if args.dhm_only else ("baseline", "dsl", "dhm")
    compiled = {m: compiled_model(args.model, m, args.classes, args.jit_compile) for m in modes}
    variants = dhm_variants(args.bf16, args.fp16, args.xla, args.jit_compile)
    for label, (precision, jit) in variants.items():
        compiled[label] = compiled_model(args.model, "dhm", args.classes, jit, precision)
    if args.keras_bn:
        compiled["dhm keras bn"] = compiled_model(args.model, "dhm", args.classes, args.jit_compile,
                                                  fused_bn=False)
    if args.dhm_only:
        train_ds, servers, params, serve_inputs = None, {}, {}, {}
    else:
        train_ds = pipeline(args.batch)
        export_root = tempfile.mkdtemp(prefix="dhm_bench_export_")
        try:
            servers, params = exported_servers(args.model, args.classes, export_root)
        finally:  # the loaded SavedModels keep what they need in memory
            shutil.rmtree(export_root, ignore_errors=True)
        rng = np.random.default_rng(0)
        serve_inputs = {
            n: tf.constant(rng.integers(0, 256, (n, 32, 32, 3)), tf.uint8) for n in sorted({1, args.batch})
        }

    rates = {m: [] for m in compiled}
    input_rates = []
    latency = {(label, n): [] for label in servers for n in serve_inputs}
    # Round 0 is the untimed warm-up of every measurement: it traces the train
    # steps, fills the pipeline's cache and loads the servers' graphs. (A
    # 2-step fit() per model was not enough: the first timed round still came
    # out 20-40% low for TensorFlow only, skewing the ratio to the reference.)
    for round_index in range(args.rounds + 1):
        # Every other round in reverse order, so no step always runs right after the same one.
        for mode, model in list(compiled.items())[:: -1 if round_index % 2 else 1]:
            start = time.perf_counter()
            model.fit(data, verbose=0)
            rates[mode].append(args.steps * args.batch / (time.perf_counter() - start))
        if torch_step is not None:
            start = time.perf_counter()
            for _ in range(args.steps):
                torch_step()
            rates.setdefault("torch reference dhm", []).append(
                args.steps * args.batch / (time.perf_counter() - start)
            )
        if train_ds is not None:
            input_rates.append(time_epoch(train_ds))
        for n, x in serve_inputs.items():
            calls = args.latency_calls if n == 1 else max(4, args.latency_calls // 2)
            for label, ms in latency_ms(servers, x, calls).items():
                latency[(label, n)].append(ms)

    for measured in (*rates.values(), input_rates, *latency.values()):
        if measured:
            del measured[0]  # the warm-up round
    median = {m: statistics.median(r) for m, r in rates.items()}
    print(f"CPU: {machine}")
    print(f"{args.model}, batch {args.batch}, {args.rounds} interleaved rounds of {args.steps} steps "
          "after one untimed round, "
          f"jit_compile={args.jit_compile}, devices={[d.name for d in tf.config.list_logical_devices()]}"
          f"{gpu_names()}")
    for mode in modes:
        print(f"  {mode:9s} {median[mode]:8.1f} images/s  (rounds: {fmt(rates[mode])})")
    if args.dhm_only:
        print_variants(variants, rates, median, args.jit_compile)
        return
    print(f"  ratio DHM/DSL throughput      {median['dhm'] / median['dsl']:.3f}")
    print(f"  ratio DSL/baseline throughput {median['dsl'] / median['baseline']:.3f}")

    input_median = statistics.median(input_rates)
    print(f"input pipeline ({DATASET} train, {args.batch}/batch, cached, augmented):")
    print(f"  pipeline  {input_median:8.1f} images/s  (rounds: {fmt(input_rates)})")
    print(f"  ratio pipeline/DHM step       {input_median / median['dhm']:.2f}  (target >= 3)")

    print(f"serving latency, serving_default of reloaded SavedModels "
          f"(params: {', '.join(f'{k} {v:,}' for k, v in params.items())}):")
    for n in serve_inputs:
        b0 = statistics.median(latency[("B0 of DHM", n)])
        base = statistics.median(latency[("baseline", n)])
        print(f"  batch {n:3d}: B0 of DHM {b0:8.2f} ms, baseline {base:8.2f} ms, "
              f"ratio {b0 / base:.3f}  (target <= 1.02; rounds B0: {fmt(latency[('B0 of DHM', n)], 2)}; "
              f"baseline: {fmt(latency[('baseline', n)], 2)})")

    if torch_step is not None:
        ref = median["torch reference dhm"]
        print(f"  torch ref {ref:8.1f} images/s  (rounds: {fmt(rates['torch reference dhm'])})")
        print(f"  ratio DHM (ours)/PyTorch reference {median['dhm'] / ref:.3f}  (target >= 1.2)")
        # The two are timed back to back within a round, so a burst of load
        # hits both: the per-round ratios are the steadier comparison.
        paired = [ours / theirs for ours, theirs in zip(rates["dhm"], rates["torch reference dhm"])]
        print(f"  per-round ratios DHM/reference {fmt(paired, 3)}; median {statistics.median(paired):.3f}")
    print_variants(variants, rates, median, args.jit_compile)
    if args.keras_bn:
        print(f"  dhm, Keras' unfused BN {median['dhm keras bn']:8.1f} images/s  "
              f"(rounds: {fmt(rates['dhm keras bn'])})")
        print(f"  ratio DHM fused BN/Keras BN  {median['dhm'] / median['dhm keras bn']:.3f}")


if __name__ == "__main__":
    main()
