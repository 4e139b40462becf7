"""ImageNet input pipeline throughput next to the rate at which a DHM step consumes images.

Question answered: on this machine, can `make_dataset`'s ImageNet path
(random-resized crop 224 + flip + normalise for training, resize 256 +
centre crop 224 for evaluation) feed a ResNet-18 DHM training step, and what
does decoding only the crop window of each JPEG save?

    .venv/bin/python benchmarks/input_pipeline.py    # ~3 min on 2 idle cores, more when shared
    .venv/bin/python benchmarks/input_pipeline.py --num_images 1024 --batch 128 --seconds 20

What it does:
1. Writes `--num_images` random JPEGs of ImageNet-like size (400-500 x
   350-375, a quarter of them portrait, quality 90) as a temporary TFDS dataset
   (`tempfile`, removed afterwards; nothing is downloaded). Colour fields
   at two scales plus pixel noise give ~100 KB files, like ImageNet's
   photographs, rather than the much larger (and slower to decode) files of
   white noise.
2. Times `make_dataset` itself on it, as a training run would call it:
   seeded (deterministic), `cache=False` (the ImageNet setting: records are
   read and parsed every epoch), training and evaluation.
3. On ONE tf.data thread and the encoded bytes in memory, in alternating
   rounds (the machine is shared and noisy): the decode stage alone with
   crop-aware decoding (`decode_and_crop_jpeg`) and with a full decode
   followed by the crop (same crop boxes); the whole training map
   (`imagenet.random_resized_crop` + normalise) both ways; and the map with
   a resize without antialiasing, its most expensive op. Reported per
   CPU-second of the process, i.e. per core, which other jobs on the
   machine disturb far less than wall-clock rates.
4. Times `fit` steps of `models.build('resnet18', 1000, mode='dhm')` wrapped
   in `DHMModel` and compiled with the project's SGD (momentum 0.9, coupled
   weight decay), on synthetic 224x224 input, float32, no XLA (slower on
   CPU, see docs/keras3-notes.md), and prints pipeline/model rate ratios.

In step 2 tf.data runs with AUTOTUNE parallelism, on every core it may use;
the per-CPU-second figures help to extrapolate to a bigger host (images/s
~ cores x per-CPU-second rate, if nothing else competes). On a GPU host the
model side is 2-3 orders of magnitude faster than on this CPU, so the ratio
printed here says little about a GPU run: compare the pipeline's images/s
(scaled by cores) with the accelerator's step rate instead.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import official  # noqa: E402,F401  (CPU defaults before TensorFlow loads)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from dhm_keras.data import channel_stats, imagenet, make_dataset, normalize  # noqa: E402

NAME = "dhm_bench_jpegs"
NUM_CLASSES = 1000


def synthetic_jpegs(n, seed, quality):
    """n (jpeg bytes, label, (h, w)) with photograph-like size and structure."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(350, 376)), int(rng.integers(400, 501))
        if rng.random() < 0.25:
            h, w = w, h
        coarse = rng.uniform(0, 255, (max(h // 24, 2), max(w // 24, 2), 3)).astype(np.float32)
        detail = rng.normal(0, 60, (h // 4, w // 4, 3)).astype(np.float32)
        field = tf.image.resize(coarse, (h, w), method="bicubic").numpy()
        field += tf.image.resize(detail, (h, w), method="bicubic").numpy()
        noise = rng.normal(0, 12, (h, w, 3))
        image = np.clip(field + noise, 0, 255).astype(np.uint8)
        data = tf.io.encode_jpeg(image, quality=quality).numpy()
        out.append((data, int(rng.integers(0, NUM_CLASSES)), (h, w)))
    return out


class DhmBenchJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The synthetic JPEGs as a TFDS dataset (bytes stored as they are)."""

    VERSION = tfds.core.Version("1.0.0")
    EXAMPLES: list = []

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (data, label, _) in enumerate(self.EXAMPLES):
            yield i, {"image": io.BytesIO(data), "label": label}


class Rate:
    """Images per wall-clock second, and per CPU-second of this process (all threads).

    On a shared machine the wall rate depends on the other jobs; CPU time
    is what the work itself costs, so `per_cpu_s` is the steadier figure and
    roughly what one uncontended core delivers.
    """

    def __init__(self, images, wall_s, cpu_s):
        self.per_s = images / wall_s
        self.per_cpu_s = images / max(cpu_s, 1e-9)

    def __str__(self):
        digits = 1 if self.per_s >= 10 else 2
        return f"{self.per_s:7.{digits}f} images/s, {self.per_cpu_s:6.{digits}f} per CPU-second"


def measure(run, images):
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Rate(images, time.perf_counter() - wall, time.process_time() - cpu)


def images_per_second(ds, seconds, warmup_batches=2):
    """Pulls batches from `ds` (repeated) for `seconds` after a warm-up; a `Rate`."""
    it = iter(ds.repeat())
    for _ in range(warmup_batches):
        next(it)
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        images, _ = next(it)
        count += int(images.shape[0])
    return Rate(count, time.perf_counter() - wall, time.process_time() - cpu)


def one_thread(ds):
    """Runs `ds` on a private pool of one thread: a clean per-core cost, no thread contention."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    return ds.with_options(options)


def in_memory_train(examples, batch, crop_aware, seed, hw, antialias=True):
    """The pipeline's training map on in-memory bytes: decode (+crop) -> resize -> flip -> normalise."""
    mean, std = channel_stats("imagenet2012")
    data = [d for d, _, _ in examples]
    labels = [y for _, y, _ in examples]
    ds = tf.data.Dataset.from_tensor_slices((data, labels))
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, keys)).map(
        lambda xy, key: (
            imagenet.random_resized_crop(xy[0], key, hw, crop_aware=crop_aware, antialias=antialias),
            xy[1],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch, drop_remainder=True).map(
        lambda x, y: (normalize(x, mean, std), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def in_memory_decode(examples, batch, crop_aware, seed):
    """The decode stage alone (random-resized-crop boxes, no resize): images/s of decoding."""
    data = [d for d, _, _ in examples]
    ds = tf.data.Dataset.from_tensor_slices(data)
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def decode(encoded, key):
        seed_crop = tf.stack([key, tf.constant(1, tf.int64)])
        crop = imagenet.decode_crop(
            encoded, lambda shape: imagenet.random_crop_box(shape, seed_crop), crop_aware=crop_aware
        )
        return tf.reduce_max(crop), 0  # something that depends on every decoded pixel

    ds = tf.data.Dataset.zip((ds, keys)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def model_images_per_second(batch, steps, image_size):
    import keras

    from dhm_keras import models
    from dhm_keras.model import DHMModel
    from official.modeling import optimization

    keras.utils.set_random_seed(0)
    network = models.build("resnet18", NUM_CLASSES, mode="dhm", input_shape=(image_size, image_size, 3))
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.9, l2=1e-4), jit_compile=False)
    images = tf.random.normal((batch, image_size, image_size, 3))
    labels = tf.random.uniform((batch,), 0, NUM_CLASSES, tf.int32)
    data = tf.data.Dataset.from_tensors((images, labels))
    start = time.perf_counter()
    model.fit(data.repeat(1), verbose=0)  # trace + first step
    first = time.perf_counter() - start
    rate = measure(lambda: model.fit(data.repeat(steps), verbose=0), steps * batch)
    return rate, first, len(network.output)


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="pipeline batch size")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per pipeline measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the one-thread comparisons")
    parser.add_argument("--model_batch", type=int, default=16)
    parser.add_argument("--model_steps", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--eval_resize", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--skip_model", action="store_true")
    args = parser.parse_args()
    hw = (args.image_size, args.image_size)
    wall = time.perf_counter()

    examples = synthetic_jpegs(args.num_images, seed=0, quality=args.quality)
    sizes = np.array([s for _, _, s in examples])
    kilobytes = np.array([len(d) for d, _, _ in examples]) / 1000
    tmp = tempfile.mkdtemp(prefix="dhm_input_bench_")
    try:
        DhmBenchJpegs.EXAMPLES = examples
        DhmBenchJpegs(data_dir=tmp).download_and_prepare()
        common = dict(data_dir=tmp, global_batch_size=args.batch, seed=0, cache=False,
                      mean=channel_stats("imagenet2012")[0], std=channel_stats("imagenet2012")[1])
        train_ds = make_dataset(NAME, "train", training=True, image_size=hw,
                                augmentation="random_resized_crop", **common)
        eval_ds = make_dataset(NAME, "train", training=False, image_size=hw,
                               eval_resize=args.eval_resize, drop_remainder=True, **common)
        train_rate = images_per_second(train_ds, args.seconds)
        eval_rate = images_per_second(eval_ds, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    variants = {
        "decode_aware": lambda: in_memory_decode(examples, args.batch, True, seed=0),
        "decode_full": lambda: in_memory_decode(examples, args.batch, False, seed=0),
        "map_aware": lambda: in_memory_train(examples, args.batch, True, seed=0, hw=hw),
        "map_full": lambda: in_memory_train(examples, args.batch, False, seed=0, hw=hw),
        "map_aware_no_antialias": lambda: in_memory_train(
            examples, args.batch, True, seed=0, hw=hw, antialias=False),
    }
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, build in variants.items():
            rounds[name].append(images_per_second(one_thread(build()), args.seconds / 2))
    # CPU-time rates: the wall-clock ones swing with the machine's other jobs.
    median = {k: statistics.median(r.per_cpu_s for r in v) for k, v in rounds.items()}

    if not args.skip_model:
        model_rate, first_step, heads = model_images_per_second(args.model_batch, args.model_steps, args.image_size)

    n = cores()
    print()
    print(f"ImageNet input pipeline vs ResNet-18 DHM step on {n} CPU core(s) "
          f"(tf {tf.__version__}, tf.data AUTOTUNE, {time.perf_counter() - wall:.0f} s in all)")
    print(f"  data: {args.num_images} synthetic JPEGs, quality {args.quality}, mean "
          f"{sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} (HxW), mean {kilobytes.mean():.0f} KB")
    print(f"  load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"(above {n}: other jobs share these cores, wall-clock rates drop)")
    print(f"  train pipeline  make_dataset random_resized_crop {hw[0]} + flip + normalise, "
          f"batch {args.batch}, seeded, cache=False:")
    print(f"                  {train_rate}")
    print(f"  eval pipeline   make_dataset resize {args.eval_resize} + centre crop {hw[0]} + normalise, "
          f"batch {args.batch}:")
    print(f"                  {eval_rate}")
    print(f"  one tf.data thread on in-memory bytes, images per CPU-second (= per core), median of "
          f"{args.rounds} alternating rounds:")
    rows = (
        ("decode stage alone (same crop boxes), crop-aware decode_and_crop_jpeg", "decode_aware"),
        ("decode stage alone (same crop boxes), full decode then crop          ", "decode_full"),
        ("whole training map, crop-aware decode (what make_dataset runs)       ", "map_aware"),
        ("whole training map, full decode then crop                            ", "map_full"),
        ("whole training map, crop-aware, resize WITHOUT antialiasing          ", "map_aware_no_antialias"),
    )
    for what, name in rows:
        print(f"    {what} {median[name]:7.1f}  "
              f"(rounds: {', '.join(f'{r.per_cpu_s:.0f}' for r in rounds[name])})")
    print(f"    crop-aware speed-up: decode stage {median['decode_aware'] / median['decode_full']:.2f}x, "
          f"whole map {median['map_aware'] / median['map_full']:.2f}x;  dropping antialiasing: "
          f"{median['map_aware_no_antialias'] / median['map_aware']:.2f}x")
    if not args.skip_model:
        print(f"  model           resnet18 DHM ({heads} heads) fit step, batch {args.model_batch}, "
              f"float32, no XLA (trace + first step {first_step:.0f} s):")
        print(f"                  {model_rate}")
        print(f"  ratio train pipeline / model: {train_rate.per_s / model_rate.per_s:7.1f}x wall, "
              f"{train_rate.per_cpu_s / model_rate.per_cpu_s:.1f}x per CPU-second;  eval pipeline / model: "
              f"{eval_rate.per_s / model_rate.per_s:.1f}x wall  (> 1: the pipeline keeps up)")


if __name__ == "__main__":
    main()
