"""Person re-identification folders (Market-1501, DukeMTMC-reID) as tf.data pipelines.

Both datasets ship as three folders of JPEG crops whose FILE NAMES carry the
labels (there is no TFDS builder for either):

    <root>/bounding_box_train/   training identities      -> split "train"
    <root>/query/                one image per id and camera -> split "query"
    <root>/bounding_box_test/    the search set              -> split "gallery"

    Market-1501:    0002_c1s1_000451_03.jpg  person 0002, camera 1 (sequence s1, frame, box)
    DukeMTMC-reID:  0005_c2_f0046985.jpg     person 0005, camera 2, frame

Person id -1 marks junk boxes (Market-1501 "-1_c1s1_..."), id 0 distractors
("0000_..."). What the readers do with them, and why:

* junk (-1) is dropped from every split: it is neither a match nor a fair
  negative (the benchmark's own evaluation ignores it; so does torchreid);
* distractors (0) are kept in query/gallery, where they act as negatives
  (see `dhm_keras.evaluation.reid`), and dropped from "train", where they are
  not an identity to classify (the official training folders contain none);
* training ids are relabelled to contiguous labels 0..N-1 in ascending
  person-id order, so `num_classes` = N (751 Market-1501, 702 DukeMTMC-reID);
  query/gallery keep the ORIGINAL person ids (`pid`), which is what
  retrieval compares;
* cameras are stored 0-based (`camid` = the digit after "c" minus 1);
* files are read in sorted name order; anything that is not .jpg/.jpeg
  (Market-1501 ships a Thumbs.db) is skipped; a .jpg whose name does not
  parse is an error rather than a silently lost example.

The pipeline (images are small - 128x64 in Market-1501 - so every step is cheap):

    sorted (path, label) -> [train: epoch e's permutation of (seed, e)]
    -> read + decode JPEG -> [cache decoded uint8] -> resize to image_size
    (256x128 by default)
    -> train: pad `padding` black pixels, random crop back, random flip
       (`augment.pad_crop_flip`, stateless, keyed by (seed, epoch, position))
       + the random-erasing rectangle drawn per element (stateless)
    -> batch by the GLOBAL batch size (train drops the remainder)
    -> normalise per channel -> train: erase (fill 0) -> prefetch

Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation"): with
probability p, a rectangle of area U(0.02, 0.4) x H x W and aspect ratio
h/w ~ U(0.3, 1/0.3) is placed uniformly inside the image (the first of 100
candidates that fits strictly inside, as in the reference code; none fitting
= no erasing) and its pixels are set to 0 AFTER normalisation, i.e. to the
per-channel mean pixel - the fill the re-ID "strong baseline" (Luo et al.
2019) uses. Zhong's paper fills with random values; the mean is the common
re-ID choice and keeps the step a pure function of the key.

Determinism follows `pipeline.py`: every random draw is a stateless op keyed
by a per-element key from `tf.data.Dataset.random(seed,
rerandomize_each_iteration=True)`, so a seed gives identical epochs run to
run and new augmentation every epoch; query/gallery are fixed-order and
augmentation-free.

Normalisation: ImageNet mean/std (`stats.channel_stats("imagenet2012")`)
unless `mean`/`std` are given; `dhm_keras.data.stats` has no entries for the
re-ID datasets, and the re-ID literature normalises with ImageNet's.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from dhm_keras.data import augment as augment_lib
from dhm_keras.data import epochs as epochs_lib
from dhm_keras.data import input_errors, pipeline
from dhm_keras.data import stats as stats_lib

AUTOTUNE = tf.data.AUTOTUNE
JUNK_ID = -1
DISTRACTOR_ID = 0
DEFAULT_IMAGE_SIZE = (256, 128)
SPLITS = ("train", "query", "gallery")
_SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_EXTENSIONS = (".jpg", ".jpeg")
# Random erasing (Zhong et al.): area fraction, aspect ratio h/w, candidates.
_ERASE_AREA = (0.02, 0.4)
_ERASE_ASPECT = (0.3, 1.0 / 0.3)
_ERASE_ATTEMPTS = 100


@dataclasses.dataclass(frozen=True)
class _Layout:
    folders: Tuple[str, ...]  # accepted names of the dataset root under data_dir
    num_cameras: int


_LAYOUTS: Dict[str, _Layout] = {
    "market1501": _Layout(("market1501", "Market-1501-v15.09.15"), 6),
    "dukemtmc_reid": _Layout(("dukemtmc_reid", "DukeMTMC-reID"), 8),
}
REID_DATASETS: Tuple[str, ...] = tuple(_LAYOUTS)


class ReidDatasetNotFoundError(pipeline.DatasetNotFoundError):
    """A re-ID dataset folder (or one of its split folders) is missing."""


def is_reid_dataset(name: str) -> bool:
    """True for the names this module reads (`REID_DATASETS`)."""
    return isinstance(name, str) and name.strip().lower() in _LAYOUTS


def _layout(name: str) -> _Layout:
    if not is_reid_dataset(name):
        raise ValueError(f"Unknown re-ID dataset {name!r}; known: {', '.join(REID_DATASETS)}")
    return _LAYOUTS[name.strip().lower()]


@dataclasses.dataclass(frozen=True)
class Record:
    """One image: its file, person id as in the file name, 0-based camera."""

    path: str
    pid: int
    camid: int


def _required(root: str) -> List[str]:
    return [os.path.join(root, f) for f in _SPLIT_FOLDERS.values()]


def dataset_root(name: str, data_dir: Optional[str]) -> str:
    """The folder holding `bounding_box_train/`, `query/`, `bounding_box_test/`.

    Tried in order: `<data_dir>/<each accepted folder name>` (e.g.
    `<data_dir>/market1501`, `<data_dir>/Market-1501-v15.09.15`), then
    `data_dir` itself if it already is such a root. `data_dir` None falls
    back to TFDS_DATA_DIR, like the TFDS pipeline.
    """
    layout = _layout(name)
    data_dir = pipeline._resolve_data_dir(data_dir)
    if not data_dir:
        raise ReidDatasetNotFoundError(
            f"Re-ID dataset {name!r} needs a data directory: pass --data_dir (or set "
            f"dataset.data_dir / TFDS_DATA_DIR) to the folder that holds "
            f"{' or '.join(layout.folders)}/"
        )
    candidates = [os.path.join(data_dir, f) for f in layout.folders] + [data_dir]
    for root in candidates:
        if all(os.path.isdir(p) for p in _required(root)):
            return root
    present = [root for root in candidates[:-1] if os.path.isdir(root)]
    if present:
        missing = [p for p in _required(present[0]) if not os.path.isdir(p)]
        why = f"{present[0]} exists but lacks {', '.join(missing)}"
    else:
        why = f"expected {' or '.join(candidates[:-1])}"
    raise ReidDatasetNotFoundError(
        f"Re-ID dataset {name!r} not found under data_dir {data_dir} ({why}). Each "
        "root must hold bounding_box_train/, query/ and bounding_box_test/ as "
        "extracted from the official archive. Nothing is downloaded: point --data_dir "
        "at the folder that contains the dataset folder."
    )


def parse_name(filename: str, num_cameras: int) -> Tuple[int, int]:
    """`"0002_c1s1_000451_03.jpg"` -> (2, 0): person id, 0-based camera."""
    match = _NAME.match(os.path.basename(filename))
    if not match:
        raise ValueError(f"Cannot parse person id and camera from file name {filename!r}")
    pid, cam = int(match.group(1)), int(match.group(2))
    if pid < JUNK_ID:
        raise ValueError(f"{filename!r}: person id {pid} < -1")
    if not 1 <= cam <= num_cameras:
        raise ValueError(f"{filename!r}: camera {cam} outside 1..{num_cameras}")
    return pid, cam - 1


def read_split(name: str, split: str, data_dir: Optional[str]) -> List[Record]:
    """Records of a split in sorted file order: junk dropped everywhere,
    distractors dropped from "train" (see the module doc)."""
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"Unknown re-ID split {split!r}; expected one of {SPLITS}")
    layout = _layout(name)
    folder = os.path.join(dataset_root(name, data_dir), _SPLIT_FOLDERS[split])
    records = []
    for filename in sorted(os.listdir(folder)):
        if not filename.lower().endswith(_EXTENSIONS):
            continue
        pid, camid = parse_name(filename, layout.num_cameras)
        if pid == JUNK_ID or (split == "train" and pid == DISTRACTOR_ID):
            continue
        records.append(Record(os.path.join(folder, filename), pid, camid))
    if not records:
        raise ReidDatasetNotFoundError(f"No usable .jpg image in {folder}")
    return records


def train_label_map(records: Sequence[Record]) -> Dict[int, int]:
    """Person id -> contiguous training label, in ascending person-id order."""
    return {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}


@dataclasses.dataclass(frozen=True)
class _SplitSize:
    # What DatasetInfo.num_examples reads from a TFDS SplitInfo.
    num_examples: int


def reid_info(name: str, data_dir: Optional[str] = None) -> pipeline.DatasetInfo:
    """Class count (training identities), image shape (256, 128, 3), split sizes.

    Lists the three folders (nothing is decoded). `info.num_examples(split)`
    works for "train", "query" and "gallery" (no slicing syntax).
    """
    records = {split: read_split(name, split, data_dir) for split in SPLITS}
    sizes = {split: len(r) for split, r in records.items()}
    train_ids = train_label_map(records["train"])
    return pipeline.DatasetInfo(
        name=name,
        num_classes=len(train_ids),
        image_shape=DEFAULT_IMAGE_SIZE + (3,),
        splits=sizes,
        data_dir=dataset_root(name, data_dir),
        _split_dict={split: _SplitSize(n) for split, n in sizes.items()},
    )


# ----------------------------------------------------------------------------- augmentation


def erase_box(key: tf.Tensor, height: int, width: int, probability: float) -> tf.Tensor:
    """Random-erasing rectangle `[top, left, h, w]` (int32; h = w = 0: no erasing).

    A pure function of the scalar int64 `key`: (key, 3..7) seed the coin and the
    candidates' area, aspect, top and left draws.
    """

    def seed(i):
        return tf.stack([key, tf.constant(i, tf.int64)])

    n = _ERASE_ATTEMPTS
    coin = tf.random.stateless_uniform([], seed=seed(3))
    area = tf.random.stateless_uniform([n], seed(4), *_ERASE_AREA) * float(height * width)
    aspect = tf.random.stateless_uniform([n], seed(5), *_ERASE_ASPECT)
    h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = h[first], w[first]
    # Offsets uniform over 0..H-h inclusive (Python's randint in the reference).
    u_top, u_left = tf.unstack(tf.random.stateless_uniform([2], seed=seed(6)))
    top = tf.minimum(tf.cast(u_top * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
    left = tf.minimum(tf.cast(u_left * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
    on = (coin < probability) & tf.reduce_any(fits)
    box = tf.stack([top, left, h, w])
    return tf.where(on, box, tf.zeros_like(box))


def apply_erasing(images: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """Sets each image's box (`erase_box` rows, [B, 4]) to 0 in all channels."""
    shape = tf.shape(images)
    rows = tf.range(shape[1])[None, :, None]
    cols = tf.range(shape[2])[None, None, :]
    top, left, h, w = (boxes[:, i][:, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return tf.where(inside[..., None], tf.zeros_like(images), images)


# ----------------------------------------------------------------------------- pipeline


def _decode(path: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_jpeg(tf.io.read_file(path), channels=3)


def _decode_resized(path: tf.Tensor, hw) -> tf.Tensor:
    """The image at `path`, resized to `hw` (uint8, antialiased)."""
    return augment_lib.resize_uint8(_decode(path), hw)


def make_reid_dataset(
    name: str,
    split: str,
    *,
    data_dir: Optional[str],
    global_batch_size: int,
    training: bool,
    seed: Optional[int] = None,
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    padding: int = 10,
    random_erasing: float = 0.0,
    cache: bool = False,
    epoch: int = 0,
) -> tf.data.Dataset:
    """Batched re-ID data.

    split "train": `(images float32 [B, H, W, 3] normalised, labels int32 [B])`,
      contiguous labels (see `train_label_map`); with `training` it is shuffled
      (the whole split), pad-`padding`-crop + flip augmented, randomly erased
      with probability `random_erasing`, and drops the last partial batch.
    split "query"/"gallery": `(images, {"pid": int32 [B], "camid": int32 [B]})`
      in sorted file order, every example kept, no augmentation (`training`
      must be False: retrieval splits are never augmented).

    Args:
      name: one of `REID_DATASETS`.
      data_dir: folder holding the dataset folder (see `dataset_root`).
      global_batch_size: examples per step across all replicas.
      training: shuffle + augment + drop remainder ("train" only).
      seed: makes order and augmentation reproducible; None = fresh randomness.
      epoch: training only: which epoch's order and augmentation draws (0-based;
        they depend on (seed, epoch) alone, see `dhm_keras.data.epochs`).
      image_size: (H, W) every image is resized to (bilinear, antialiased).
      mean, std: RGB in [0, 1] units; default ImageNet's.
      padding: black pixels added on each side before the random crop.
      random_erasing: probability of erasing a rectangle (0 = off).
      cache: keep decoded uint8 images in memory after the first pass
        (Market-1501 train: ~320 MB at its native 128x64).

    Raises:
      ReidDatasetNotFoundError: the dataset folder is missing.
      ValueError: bad arguments.
    """
    prepared = _prepare(name, split, data_dir, global_batch_size, training, seed, image_size,
                        mean, std, padding, random_erasing, cache)
    if training:
        ds = prepared.training_epoch(tf.constant(int(epoch), tf.int64))
    else:
        ds = prepared.examples.batch(global_batch_size, drop_remainder=False, num_parallel_calls=AUTOTUNE)
        ds = ds.map(lambda x, y: (stats_lib.normalize(x, prepared.mean, prepared.std), y),
                    num_parallel_calls=AUTOTUNE)
    return prepared.finish(ds, deterministic=seed is not None or not training)


def make_reid_training_stream(
    name: str,
    split: str,
    *,
    first_epoch: int = 0,
    data_dir: Optional[str],
    global_batch_size: int,
    seed: Optional[int] = None,
    image_size: Sequence[int] = DEFAULT_IMAGE_SIZE,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    padding: int = 10,
    random_erasing: float = 0.0,
    cache: bool = False,
) -> tf.data.Dataset:
    """Training epochs `first_epoch`, `first_epoch + 1`, ... back to back,
    endlessly, each exactly `make_reid_dataset(training=True, epoch=e)`'s
    batches (see `pipeline.make_training_stream`)."""
    prepared = _prepare(name, split, data_dir, global_batch_size, True, seed, image_size,
                        mean, std, padding, random_erasing, cache)
    return prepared.finish(epochs_lib.stream(prepared.training_epoch, first_epoch), deterministic=True)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A re-ID split read and decoded (and cached) as asked, ready for epochs."""

    examples: tf.data.Dataset  # (path or decoded uint8 image, target), sorted file order
    decoded: bool
    size: int
    hw: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    seed: int
    padding: int
    random_erasing: float
    global_batch_size: int
    description: str
    files: Tuple[str, ...]

    def training_epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        """One epoch, order and draws from (seed, epoch): shuffled paths (or
        cached images), decoded, resized, augmented, erased, batched."""
        hw, padding, erasing = self.hw, self.padding, self.random_erasing
        ds = epochs_lib.shuffled(self.examples, self.seed, epoch, self.size, self.size)
        if not self.decoded:  # shuffle cheap paths, decode after
            ds = ds.map(lambda path, y: (_decode_resized(path, hw), y), num_parallel_calls=AUTOTUNE)

        def augment(xy, key):
            image = augment_lib.pad_crop_flip(xy[0], key, padding)
            return image, xy[1], erase_box(key, hw[0], hw[1], erasing)

        ds = epochs_lib.with_keys(ds, self.seed, epoch).map(augment, num_parallel_calls=AUTOTUNE)
        ds = ds.batch(self.global_batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)
        mean, std = self.mean, self.std

        def finish(images, labels, boxes):
            images = stats_lib.normalize(images, mean, std)
            if erasing > 0:
                images = apply_erasing(images, boxes)
            return images, labels

        return ds.map(finish, num_parallel_calls=AUTOTUNE)

    def finish(self, ds: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
        options = tf.data.Options()
        options.deterministic = deterministic
        ds = ds.with_options(options).prefetch(AUTOTUNE)
        files = self.files
        # So that an image that does not decode is named (input_errors).
        input_errors.remember(
            input_errors.Source(
                self.description,
                tuple((path, 0, 1) for path in files),
                images=lambda: tf.data.Dataset.from_tensor_slices(list(files)).map(tf.io.read_file),
                image_files=True,
            ),
            ds,
        )
        return ds


def _prepare(name, split, data_dir, global_batch_size, training, seed, image_size, mean, std,
             padding, random_erasing, cache) -> _Prepared:
    """Checks the arguments, lists the split and builds its (decoded/cached) examples."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing must be in [0, 1], got {random_erasing}")
    if training and split != "train":
        raise ValueError(f"split {split!r} is for retrieval and is never augmented; "
                         "pass training=False")
    hw = augment_lib.image_hw(image_size)
    if hw is None:
        raise ValueError("image_size is required for re-ID data")
    if mean is None and std is None:
        mean, std = stats_lib.channel_stats("imagenet2012")
    else:
        mean, std = stats_lib.channel_stats(name, mean, std)

    records = read_split(name, split, data_dir)
    paths = tf.constant([r.path for r in records])
    if split == "train":
        labels = train_label_map(records)
        targets = tf.constant([labels[r.pid] for r in records], tf.int32)
    else:
        targets = {
            "pid": tf.constant([r.pid for r in records], tf.int32),
            "camid": tf.constant([r.camid for r in records], tf.int32),
        }
    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    # Evaluation always decodes; training decodes before the cache, or after
    # the shuffle when nothing is cached (shuffling paths is cheaper). Images
    # are resized as they are decoded: DukeMTMC crops vary in size, and an
    # epoch's permutation batches the split (dhm_keras.data.epochs).
    decoded = cache or not training
    if decoded:
        ds = ds.map(lambda path, y: (_decode_resized(path, hw), y), num_parallel_calls=AUTOTUNE)
        if cache:
            ds = ds.cache()
    seed = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
    return _Prepared(
        ds, decoded, len(records), hw, tuple(mean), tuple(std), seed, padding, random_erasing,
        global_batch_size, f"split {split!r} of {name}", tuple(r.path for r in records),
    )
