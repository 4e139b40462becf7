"""TFDS image-classification input pipeline (CIFAR and ImageNet recipes, any TFDS dataset).

What it builds, in order. CIFAR path (`augmentation="pad_crop_flip"`, the
default, and evaluation without `eval_resize`):

    TFDS records -> decode (TFDS) -> (uint8 image, int32 label, label
    checked to lie in [0, C-1]: see `input_errors.checked_label`) -> [take]
    -> [label corruption, keyed by the example's position in the split]
    -> [resize] -> [cache decoded uint8 in memory]
    -> training only: epoch e's permutation, drawn from (seed, e)
                      -> a per-element key drawn from (seed, e, position)
                      -> pad `padding` zero pixels, random crop back, random flip
    -> batch by the GLOBAL batch size -> normalise per channel -> prefetch

ImageNet path (training with `augmentation="random_resized_crop"`, or
evaluation with `eval_resize`; the ops live in `imagenet.py`):

    TFDS records, image NOT decoded (`SkipDecoding`) -> (JPEG/PNG bytes,
    int32 label, checked) -> [take] -> [label corruption] -> [cache the ENCODED bytes]
    -> training: epoch e's permutation -> a per-element key
                 -> draw an Inception crop box from the JPEG header's shape,
                    decode only that window, resize to image_size, random flip
    -> evaluation: decode, shorter side to eval_resize, centre crop image_size
    -> batch -> normalise per channel -> prefetch

Design choices, and why:

* Stages (`read_split` -> `training_epoch` or the evaluation transform ->
  `batch_and_normalize`), each a function of its own; the per-image ops are
  `dhm_keras.data.augment`'s, the per-epoch randomness `dhm_keras.data.epochs`'.
* Augmentation tool: plain `tf.image` STATELESS ops (`stateless_random_crop`,
  `stateless_random_flip_left_right`), keyed by a per-element key drawn
  statelessly from (seed, epoch, position).
  - Deterministic: a stateless op is a pure function of (image, key), so the
    output does not depend on how the parallel `map` schedules its threads;
    the order and keys of epoch e depend on (seed, e) alone, so a given seed
    gives identical batches run to run, every epoch sees new crops and
    flips, and a resumed run (`make_training_stream(first_epoch=k)`) reads
    what an uninterrupted one reads.
  - Correct: the recipe (reference: torchvision `RandomCrop(32, padding=4)`
    on the uint8 image) pads with BLACK pixels before normalisation. Keras'
    `RandomCrop` has no padding mode (it resizes when the input is smaller),
    and applied to a batch it draws ONE crop offset for the whole batch;
    keras-cv 0.9.0 is the final, unmaintained release. Both draw from a
    stateful `SeedGenerator`, whose state is shared by the threads of a
    parallel map, so they are not reproducible under `num_parallel_calls`.
  - Fast: two small ops per 32x32 uint8 image; normalisation runs once per
    batch as a single vectorised op on [B, H, W, 3].
* Caching happens on decoded uint8 images BEFORE augmentation: JPEG decoding
  is paid once (CIFAR-10 train is ~150 MB decoded), augmentation stays fresh.
  Turn `cache` off for datasets that do not fit in memory.
* On the ImageNet path the cache holds the ENCODED bytes (plus labels),
  never decoded images: a random-resized crop must see the full-resolution
  image every epoch, and decoded full-size images are ~4x larger than
  their JPEGs (ImageNet train: ~140 GB encoded, over 0.5 TB decoded).
  Caching the bytes saves the disk reads and record parsing and costs
  exactly the split's size on disk (imagenette full-size-v2: ~1.5 GB, fine;
  ImageNet: turn `cache` off). Decoding stays per epoch (the crop-aware
  decode trims it). Evaluation caches bytes too, for one rule on one path
  (its deterministic 224x224 crops could be cached instead, at 150 KB per
  image, ~7.5 GB for ImageNet's validation split).
* Records are read in their fixed file order (label corruption is keyed by
  position; TFDS writes its shards already shuffled). The per-epoch
  permutation covers the whole split for small datasets (a true uniform
  permutation each epoch, like a PyTorch sampler); larger ones are permuted
  in windows of 10,000 examples, like a bounded shuffle buffer (see
  `_default_shuffle_buffer`).
* Across several workers (a `tf.distribute.InputContext` from
  `distribute_datasets_from_function`), each worker reads a disjoint set of
  the split's record files (TFDS `ReadConfig(input_context=...)`: files
  i, i+N, i+2N, ... go to worker i), so decoding work per worker falls as
  1/N. Its share is fixed; its order and crops in epoch e are drawn from
  (seed, e, worker) (`_worker_seed`), so a resumed worker reads what it
  would have read, and every worker gives the same number of per-replica
  batches per epoch (collectives pair them up step by step). A split with
  fewer files than workers, `take`, or `label_noise` (keyed by the position
  in the WHOLE split, which a worker reading only some files does not see)
  fall back to DATA sharding with one logged line saying why: every worker
  reads the whole split in the single-process order and keeps its rows of
  each global batch.
* Batches are GLOBAL: `tf.distribute` splits each one across replicas.
  Training drops the remainder so that every step has the same shape (no
  retracing, equal per-replica batches); evaluation keeps every example.
* Never downloads: the builder is only asked to read (`as_dataset`, what
  `tfds.load(..., download=False)` does), and a missing dataset is a clear
  `DatasetNotFoundError` naming the dataset and the directory searched.
* Damaged data stops the run with one line naming the file and record
  (`input_errors`): every label is range-checked as it leaves its record
  (one comparison per example), and the split's record files are looked
  for when the pipeline is built, so a missing shard is reported before
  training instead of in the middle of an epoch.
* Training without a seed draws one at random: that run cannot be repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
from typing import Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from dhm_keras.data import augment as augment_lib
from dhm_keras.data import epochs as epochs_lib
from dhm_keras.data import imagenet as imagenet_lib
from dhm_keras.data import input_errors
from dhm_keras.data import stats as stats_lib

AUTOTUNE = tf.data.AUTOTUNE

# A split whose decoded images take at most this many bytes is shuffled with
# a buffer holding all of it; larger splits get `_LARGE_SHUFFLE_BUFFER`.
_FULL_SHUFFLE_MAX_BYTES = 1 << 30
_LARGE_SHUFFLE_BUFFER = 10_000

ImageSize = augment_lib.ImageSize
AUGMENTATIONS = augment_lib.AUGMENTATIONS


class DatasetNotFoundError(ValueError):
    """The requested TFDS dataset is not prepared in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset before reading it.

    `image_shape` is `(H, W, C)` with `None` for sizes that vary per image.
    `splits` maps each prepared split name to its number of examples (empty
    under `tfds.testing.mock_data` with `MockPolicy.USE_CODE`).
    """

    name: str
    num_classes: int
    image_shape: Tuple[Optional[int], ...]
    splits: Mapping[str, int]
    data_dir: str
    _split_dict: object = dataclasses.field(default=None, repr=False, compare=False)
    # The label names in class order (TFDS ClassLabel names); () when the
    # dataset has none (TFDS then numbers them "0", "1", ...).
    class_names: Tuple[str, ...] = ()

    def num_examples(self, split: str) -> int:
        """Size of `split`, slicing syntax included ("train[:5000]")."""
        try:
            return int(self._split_dict[split].num_examples)  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"Cannot size split {split!r} of {self.name}; known splits: "
                f"{dict(self.splits)}"
            ) from e


def _resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
    # TFDS reads TFDS_DATA_DIR once, at import time; resolving it here means
    # that setting the variable later (tests, launch scripts) still works.
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR") or None


def _searched_dirs(data_dir: Optional[str]) -> str:
    if data_dir:
        return data_dir
    return f"{tfds.core.constants.DATA_DIR} (TFDS default; TFDS_DATA_DIR unset)"


@contextlib.contextmanager
def _tfds_quiet(quiet: bool):
    """absl at ERROR while TFDS looks for a dataset that may not be there."""
    level = logging.get_verbosity()
    if quiet:
        logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _not_found(name: str, data_dir: Optional[str], why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir "
        f"{_searched_dirs(data_dir)!s} ({why}). This pipeline never downloads: "
        "point --data_dir (or the TFDS_DATA_DIR environment variable) at a "
        f"directory holding a prepared copy, i.e. <data_dir>/{name.split(':')[0]}"
        "/<version>/dataset_info.json plus its record files."
    )


def _builder(name: str, data_dir: Optional[str], require_prepared: bool = True) -> tfds.core.DatasetBuilder:
    """A builder for an already prepared dataset, or DatasetNotFoundError;
    without `require_prepared`, also TFDS's builder of a registered dataset
    that is not prepared (its metadata only)."""
    data_dir = _resolve_data_dir(data_dir)
    try:
        with _tfds_quiet(not require_prepared):  # "no dataset_info.json" is the expected case then
            builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        # Neither a registered builder nor prepared files under data_dir.
        raise _not_found(name, data_dir, "no such builder or files") from e
    if not require_prepared:
        return builder
    if not builder.is_prepared():
        # Registered datasets (cifar100, ...) get a builder from code even
        # when nothing is on disk. Ask `as_dataset` itself: it fails on a
        # missing dataset, and `tfds.testing.mock_data` makes it succeed.
        splits = list(builder.info.splits) or ["train"]
        try:
            builder.as_dataset(split=splits[0])
        except Exception as e:  # AssertionError, split errors, I/O errors
            raise _not_found(name, data_dir, "no prepared files") from e
    return builder


def _check_features(builder: tfds.core.DatasetBuilder) -> Tuple[tuple, int]:
    features = builder.info.features
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if not {"image", "label"} <= keys:
        raise ValueError(
            f"{builder.name} must have 'image' and 'label' features; has {sorted(keys)}"
        )
    image, label = features["image"], features["label"]
    if not isinstance(image, tfds.features.Image):
        raise ValueError(f"{builder.name}: 'image' is a {type(image).__name__}")
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"{builder.name}: 'label' is a {type(label).__name__}")
    shape = tuple(image.shape)
    if shape[-1] not in (1, 3):
        raise ValueError(f"{builder.name}: {shape[-1]}-channel images unsupported")
    return shape, int(label.num_classes)


def dataset_info(name: str, data_dir: Optional[str] = None, require_prepared: bool = True) -> DatasetInfo:
    """Reads class count, image shape and split sizes from TFDS metadata.

    Reads only `dataset_info.json`/`features.json` (nothing is decoded or
    downloaded). Raises `DatasetNotFoundError` if the dataset is missing.
    Grayscale datasets report 3 channels, as the pipeline delivers them.

    `require_prepared=False` accepts a dataset that TFDS registers but that
    is not prepared: its features (class count and names) come from TFDS's
    own code and it has no splits. For work that reads no record, such as
    converting a checkpoint to serve ImageNet classes without ImageNet.
    """
    builder = _builder(name, data_dir, require_prepared)
    shape, num_classes = _check_features(builder)
    split_dict = builder.info.splits
    return DatasetInfo(
        name=name,
        num_classes=num_classes,
        image_shape=tuple(shape[:-1]) + (3,),
        splits={k: int(v.num_examples) for k, v in split_dict.items()},
        data_dir=os.fspath(builder.data_dir),
        _split_dict=split_dict,
        class_names=_class_names(builder.info.features["label"]),
    )


def _class_names(label: tfds.features.ClassLabel) -> Tuple[str, ...]:
    """The label's names, or () if TFDS only numbered the classes."""
    names = tuple(str(n) for n in (label.names or ()))
    if names == tuple(str(i) for i in range(len(names))):
        return ()
    return names


def _split_shards(builder: tfds.core.DatasetBuilder, split: str) -> Tuple[Tuple[str, int, int], ...]:
    """`(record file, first record, number of records)` that `split` (slicing
    included) reads, in file order; () when the metadata lists no files (e.g.
    under `tfds.testing.mock_data`)."""
    try:
        instructions = builder.info.splits[split].file_instructions
    except (KeyError, TypeError, ValueError):
        return ()
    return tuple((os.fspath(i.filename), int(i.skip), int(i.take)) for i in instructions)


def _encoded_images(builder: tfds.core.DatasetBuilder, split: str):
    """The encoded images of `split` in file order, for locating one that does
    not decode (`input_errors.locate_undecodable_image`)."""

    def images() -> tf.data.Dataset:
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        return ds.map(lambda example: example["image"])

    return images


def corrupt_label(
    label: tf.Tensor, index: tf.Tensor, rate: float, num_classes: int, seed: int
) -> tf.Tensor:
    """Label corruption of Appendix E for one example, a pure function of (seed, index).

    The example is picked with probability `rate` (so a fraction `rate` of
    the split is picked, up to binomial noise) and its label is replaced by
    one drawn uniformly from all `num_classes` classes (the draw may hit the
    true class, as in Zhang et al. 2017, whose protocol the supplement uses).
    Keyed by the example's index in the split rather than by a stateful RNG,
    an example's corrupted label is the same in every epoch, after a resume
    and in every process of a multi-worker run.
    """
    index = tf.cast(index, tf.int64)
    seed = tf.constant(seed, tf.int64)
    pick = tf.random.stateless_uniform([], seed=tf.stack([seed, 2 * index]))
    new = tf.random.stateless_uniform(
        [], seed=tf.stack([seed, 2 * index + 1]), maxval=num_classes, dtype=tf.int32
    )
    return tf.where(pick < rate, new, tf.cast(label, tf.int32))


def _default_shuffle_buffer(num_examples: int, image_shape: tuple) -> int:
    if num_examples <= 0:  # unknown cardinality
        return _LARGE_SHUFFLE_BUFFER
    pixels = 1
    for d in image_shape:
        pixels *= d if d else 500 * 500  # unknown size: assume ImageNet-like
    if num_examples * pixels <= _FULL_SHUFFLE_MAX_BYTES:
        return num_examples
    return min(num_examples, _LARGE_SHUFFLE_BUFFER)


@dataclasses.dataclass(frozen=True)
class SplitExamples:
    """The first stage: a split's examples, unbatched, in file order.

    `examples` yields (uint8 image [H, W, 3], or the encoded bytes on the
    ImageNet path; int32 label), labels checked and optionally corrupted,
    images resized to `hw` (decoded path) and cached if asked.
    """

    examples: tf.data.Dataset
    hw: Optional[Tuple[int, int]]
    encoded: bool
    num_classes: int
    image_shape: Tuple[int, ...]
    description: str
    shards: tuple
    builder: object
    split: str
    # Examples permuted together in training (see `_default_shuffle_buffer`).
    window: int
    count: int  # examples `examples` yields; negative if unknown
    # File sharding: this reader holds worker `worker`'s files of `workers`
    # (1: the whole split), and `split_count` examples are in the whole split.
    workers: int = 1
    worker: int = 0
    split_count: int = -1


def _file_sharding(shards: tuple, input_context, take, label_noise: float) -> Tuple[int, int, Optional[str]]:
    """(workers, this worker, why not) for reading `shards` under `input_context`.

    (N, i, None) when worker i of N can read files i, i+N, ... on its own;
    (1, 0, reason) when it must read the whole split, reason None when there
    is only one input pipeline anyway.
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return 1, 0, None
    workers = int(input_context.num_input_pipelines)
    if take is not None:
        return 1, 0, "`take` keeps the first examples of the whole split"
    if label_noise:
        return 1, 0, ("label_noise is keyed by an example's position in the whole split, "
                      "which a worker reading only some files does not know")
    if len(shards) < workers:
        return 1, 0, f"the split has {len(shards)} record file(s), fewer than the {workers} workers"
    return workers, int(input_context.input_pipeline_id), None


def _worker_seed(seed: int, worker: int, workers: int) -> int:
    """The seed of worker `worker`'s order and crops: `seed` itself for a
    single reader (single-process runs are unchanged), otherwise a hash of
    (seed, worker), so workers shuffle differently but reproducibly."""
    if workers <= 1:
        return int(seed)
    digest = hashlib.sha256(f"dhm-worker/{int(seed)}/{int(worker)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def check_split(name: str, split: str, data_dir: Optional[str] = None) -> None:
    """Before a run writes anything: the dataset is prepared and every record
    file `split` reads exists (`DatasetNotFoundError`, `MissingDataFileError`)."""
    builder = _builder(name, data_dir)
    files = [path for path, _, _ in _split_shards(builder, split)]
    input_errors.require_files(files, f"split {split!r} of {name}")


def read_split(
    name: str,
    split: str,
    *,
    data_dir: Optional[str],
    hw: Optional[Tuple[int, int]],
    encoded: bool,
    take: Optional[int] = None,
    cache: bool = True,
    label_noise: float = 0.0,
    label_noise_seed: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> SplitExamples:
    """Reads `split` in its fixed file order: decode (unless `encoded`),
    check every label against [0, C-1] as it leaves its record (before
    take, cache or label noise, so the record named is the record's),
    [take], [corrupt labels by position], [resize], [cache].

    The order is fixed: label corruption is keyed by position, and the
    training order is drawn per epoch afterwards (`dhm_keras.data.epochs`).
    With an `input_context` of several input pipelines, only this worker's
    files are read when `_file_sharding` allows it (`workers` > 1 in the
    result); positions in label errors then count within the worker's files.
    """
    builder = _builder(name, data_dir)
    shape, num_classes = _check_features(builder)
    if hw is None and (shape[0] is None or shape[1] is None):
        raise ValueError(f"{name} has images of varying size {shape}; pass image_size=...")
    description = f"split {split!r} of {name}"
    shards = _split_shards(builder, split)
    # Before training starts, not at the first read of the missing shard.
    input_errors.require_files([path for path, _, _ in shards], description)
    workers, worker, why_not = _file_sharding(shards, input_context, take, label_noise)
    if why_not:
        logging.warning("input: every worker reads all of %s and keeps its rows of each global batch "
                     "(DATA sharding): %s", description, why_not)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        read_config=tfds.ReadConfig(  # we cache ourselves, after decoding
            try_autocache=False, input_context=input_context if workers > 1 else None
        ),
        # ImageNet path: keep the bytes; imagenet.py decodes (only the crop).
        decoders={"image": tfds.decode.SkipDecoding()} if encoded else None,
    )
    # Encoded images are decoded with channels=3 later (grayscale included).
    grayscale = shape[-1] == 1 and ds.element_spec["image"].dtype != tf.string
    directory = os.fspath(builder.data_dir)

    def to_pair(position, example):
        image = example["image"]
        if grayscale:
            image = tf.image.grayscale_to_rgb(image)
        label = input_errors.checked_label(example["label"], num_classes, position, description, directory)
        return image, label

    ds = ds.enumerate().map(to_pair, num_parallel_calls=AUTOTUNE)
    split_count = sum(n for _, _, n in shards) if shards else -1
    if workers > 1:  # TFDS does not know the size of one worker's share
        ds = ds.apply(tf.data.experimental.assert_cardinality(sum(n for _, _, n in shards[worker::workers])))
    if take is not None:
        ds = ds.take(take)
    if label_noise:
        ds = ds.enumerate().map(
            lambda i, xy: (xy[0], corrupt_label(xy[1], i, label_noise, num_classes, label_noise_seed)),
            num_parallel_calls=AUTOTUNE,
        )
    if hw is not None and not encoded:
        ds = ds.map(lambda x, y: (augment_lib.resize_uint8(x, hw), y), num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache()
    image_shape = tuple(hw or shape[:2]) + (3,)
    count = int(ds.cardinality())
    window = _default_shuffle_buffer(count, image_shape)
    if workers == 1:
        split_count = count
    return SplitExamples(
        ds, hw, encoded, num_classes, image_shape, description, shards, builder, split, window, count,
        workers, worker, split_count,
    )


def training_epoch(
    read: SplitExamples,
    epoch: tf.Tensor,
    *,
    seed: int,
    augmentation: str,
    padding: int,
    shuffle_buffer: Optional[int] = None,
) -> tf.data.Dataset:
    """Epoch `epoch` of the training examples: the order and the augmentation
    draws of (seed, epoch) alone (`dhm_keras.data.epochs`), unbatched."""
    ds = epochs_lib.shuffled(read.examples, seed, epoch, shuffle_buffer or read.window, read.count)
    augment = augment_lib.training_augmentation(augmentation, read.hw, padding)
    if augment is None:
        return ds
    return epochs_lib.with_keys(ds, seed, epoch).map(
        lambda xy, key: (augment(xy[0], key), xy[1]), num_parallel_calls=AUTOTUNE
    )


def batch_and_normalize(ds, global_batch_size: int, drop_remainder: bool, mean, std) -> tf.data.Dataset:
    """Batches by the GLOBAL batch size, then normalises each batch in one op."""
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    return ds.map(lambda x, y: (stats_lib.normalize(x, mean, std), y), num_parallel_calls=AUTOTUNE)


def _finish(ds: tf.data.Dataset, read: SplitExamples, deterministic: bool) -> tf.data.Dataset:
    options = tf.data.Options()
    if deterministic:
        options.deterministic = True
    ds = ds.with_options(options).prefetch(AUTOTUNE)
    if read.shards:
        images = _encoded_images(read.builder, read.split)
        input_errors.remember(input_errors.Source(read.description, read.shards, images=images), ds)
    return ds


def _checked_arguments(name, global_batch_size, padding, label_noise, augmentation, eval_resize,
                       image_size, training, mean, std):
    """Validates the arguments shared by `make_dataset` and
    `make_training_stream`; returns (hw, encoded, mean, std)."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    augment_lib.training_augmentation(augmentation, None, padding)  # a known name
    if eval_resize is not None and int(eval_resize) <= 0:
        raise ValueError(f"eval_resize must be positive, got {eval_resize}")
    hw = augment_lib.image_hw(image_size)
    # The ImageNet path: read encoded bytes, crop/resize after the cache.
    random_resized = training and augmentation == "random_resized_crop"
    centre_crop = not training and eval_resize is not None
    encoded = random_resized or centre_crop
    if encoded and hw is None:
        hw = (imagenet_lib.DEFAULT_IMAGE_SIZE, imagenet_lib.DEFAULT_IMAGE_SIZE)
    if centre_crop and max(hw) > int(eval_resize):
        raise ValueError(f"image_size {hw} does not fit in images resized to eval_resize={eval_resize}")
    mean, std = stats_lib.channel_stats(name, mean, std)
    return hw, encoded, mean, std


def _training_seed(seed: Optional[int]) -> int:
    # No seed: fresh randomness for this run (it then cannot be reproduced).
    return int(seed) if seed is not None else random.SystemRandom().randrange(2**31)


def make_dataset(
    name: str,
    split: str,
    *,
    data_dir: Optional[str] = None,
    global_batch_size: int,
    training: bool,
    seed: Optional[int] = None,
    image_size: Optional[ImageSize] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    take: Optional[int] = None,
    cache: bool = True,
    shuffle_buffer: Optional[int] = None,
    drop_remainder: Optional[bool] = None,
    padding: int = 4,
    label_noise: float = 0.0,
    label_noise_seed: int = 0,
    augmentation: str = "pad_crop_flip",
    eval_resize: Optional[int] = None,
    epoch: int = 0,
) -> tf.data.Dataset:
    """Batched `(images float32 [B, H, W, 3] normalised, labels int32 [B])`:
    the evaluation split, or ONE training epoch (`epoch`, 0-based).

    Args:
      name: TFDS name (optionally "name:version") with `image`/`label` features.
      split: TFDS split spec, slicing included ("train[:5000]", "test").
      data_dir: prepared TFDS directory; default TFDS_DATA_DIR, then TFDS's.
      global_batch_size: examples per step across all replicas.
      training: shuffle + augmentation (see `augmentation`) + drop remainder.
      seed: makes order and augmentation reproducible (also sets
        `deterministic=True`); None draws fresh randomness.
      image_size: int or (H, W) to resize to; default keeps native size
        (required for datasets with variable image sizes). On the ImageNet
        path it is the crop size, default 224.
      mean, std: RGB in [0, 1] units; default `stats.channel_stats(name)`.
      take: keep only the first `take` examples of the split.
      cache: keep decoded uint8 images in memory after the first epoch
        (on the ImageNet path: the encoded bytes, see the module docstring).
      shuffle_buffer: examples permuted together; default the whole split if
        it is small (<= 1 GiB decoded), else 10,000.
      drop_remainder: default `training`.
      padding: zero pixels added on each side before the random crop
        (`pad_crop_flip` only).
      label_noise: fraction of labels to corrupt (Appendix E; see
        `corrupt_label`); 0 keeps every label. Corruption depends on the
        example's position in the split.
      label_noise_seed: which examples are corrupted, and to what.
      augmentation: training augmentation, one of `AUGMENTATIONS`:
        "pad_crop_flip" (CIFAR: zero-pad, random crop back, flip) or
        "random_resized_crop" (ImageNet: Inception crop of scale 0.08-1 and
        aspect 3/4-4/3 resized to image_size, flip; decodes only the crop
        window of JPEGs) or "none" (shuffle only, images as they are).
        Ignored when `training` is False.
      eval_resize: evaluation only: resize the shorter side to this size
        (keeping the aspect ratio), then centre-crop image_size (ImageNet:
        256 -> 224). None (default) resizes straight to image_size, if given.
        Ignored when `training` is True.
      epoch: training only: which epoch's order and augmentation draws.

    Raises:
      DatasetNotFoundError: the dataset is not prepared under data_dir.
      MissingDataFileError: a record file the split needs is missing.
      ValueError: unsupported features or missing statistics, an unknown
        `augmentation`, or a crop larger than `eval_resize`.
    """
    hw, encoded, mean, std = _checked_arguments(
        name, global_batch_size, padding, label_noise, augmentation, eval_resize, image_size, training, mean, std
    )
    read = read_split(
        name, split, data_dir=data_dir, hw=hw, encoded=encoded, take=take, cache=cache,
        label_noise=label_noise, label_noise_seed=label_noise_seed,
    )
    if drop_remainder is None:
        drop_remainder = training
    if training:
        seed = _training_seed(seed)
        ds = training_epoch(read, tf.constant(int(epoch), tf.int64), seed=seed, augmentation=augmentation,
                            padding=padding, shuffle_buffer=shuffle_buffer)
    else:
        ds = read.examples
        if eval_resize is not None:
            ds = ds.map(lambda x, y: (augment_lib.eval_image_transform(x, hw, eval_resize), y),
                        num_parallel_calls=AUTOTUNE)
    ds = batch_and_normalize(ds, global_batch_size, drop_remainder, mean, std)
    return _finish(ds, read, deterministic=seed is not None or not training)


def make_training_stream(
    name: str,
    split: str,
    *,
    first_epoch: int = 0,
    data_dir: Optional[str] = None,
    global_batch_size: int,
    seed: Optional[int] = None,
    image_size: Optional[ImageSize] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    take: Optional[int] = None,
    cache: bool = True,
    shuffle_buffer: Optional[int] = None,
    padding: int = 4,
    label_noise: float = 0.0,
    label_noise_seed: int = 0,
    augmentation: str = "pad_crop_flip",
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Training epochs `first_epoch`, `first_epoch + 1`, ... back to back,
    endlessly; each is exactly `make_dataset(training=True, epoch=e)`'s
    batches (whole batches only). Read with `fit(steps_per_epoch=...)`: a
    run resumed at epoch k starts the stream at k and reads what an
    uninterrupted run reads. Arguments as for `make_dataset`.

    `input_context` (from `distribute_datasets_from_function`): this
    worker's stream of PER-REPLICA batches, `steps` = (examples in the
    split) // global_batch_size per local replica and epoch on every worker.
    By file when the split allows it: the worker's files, permuted per
    (seed, epoch, worker), their first steps x per-replica x local-replicas
    examples (wrapping around if the worker's files hold fewer); otherwise
    by data: this worker's rows of the single-process stream's global batches.
    """
    hw, encoded, mean, std = _checked_arguments(
        name, global_batch_size, padding, label_noise, augmentation, None, image_size, True, mean, std
    )
    read = read_split(
        name, split, data_dir=data_dir, hw=hw, encoded=encoded, take=take, cache=cache,
        label_noise=label_noise, label_noise_seed=label_noise_seed, input_context=input_context,
    )
    seed = _training_seed(seed)
    if input_context is None:
        def one_epoch(epoch):
            ds = training_epoch(read, epoch, seed=seed, augmentation=augmentation, padding=padding,
                                shuffle_buffer=shuffle_buffer)
            return batch_and_normalize(ds, global_batch_size, True, mean, std)

        return _finish(epochs_lib.stream(one_epoch, first_epoch), read, deterministic=True)
    return _finish(
        _worker_stream(read, input_context, first_epoch, global_batch_size, seed=seed, augmentation=augmentation,
                       padding=padding, shuffle_buffer=shuffle_buffer, mean=mean, std=std),
        read, deterministic=True,
    )


def _worker_stream(read: SplitExamples, context, first_epoch: int, global_batch_size: int, *, seed: int,
                   augmentation: str, padding: int, shuffle_buffer: Optional[int], mean, std) -> tf.data.Dataset:
    """One worker's endless stream of per-replica batches (see `make_training_stream`)."""
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    local_replicas = max(1, context.num_replicas_in_sync // context.num_input_pipelines)
    per_worker = per_replica * local_replicas  # this worker's rows of each global batch
    steps = read.split_count // global_batch_size
    if read.workers > 1:
        worker_seed = _worker_seed(seed, read.worker, read.workers)
        needed = steps * per_worker
        if read.count < needed:
            logging.warning("input: worker %d's files hold %d examples, fewer than the %d it takes per epoch "
                            "(files of unequal size); it wraps around", read.worker, read.count, needed)

        def one_epoch(epoch):
            ds = training_epoch(read, epoch, seed=worker_seed, augmentation=augmentation, padding=padding,
                                shuffle_buffer=shuffle_buffer)
            if read.count < needed:
                ds = ds.repeat()
            return batch_and_normalize(ds, per_replica, True, mean, std).take(steps * local_replicas)

        return epochs_lib.stream(one_epoch, first_epoch)

    first_row = int(context.input_pipeline_id) * per_worker

    def one_epoch(epoch):
        ds = training_epoch(read, epoch, seed=seed, augmentation=augmentation, padding=padding,
                            shuffle_buffer=shuffle_buffer)
        ds = batch_and_normalize(ds, global_batch_size, True, mean, std)
        ds = ds.map(lambda x, y: (x[first_row:first_row + per_worker], y[first_row:first_row + per_worker]))
        if local_replicas > 1:
            ds = ds.rebatch(per_replica, drop_remainder=True)
        return ds

    return epochs_lib.stream(one_epoch, first_epoch)
