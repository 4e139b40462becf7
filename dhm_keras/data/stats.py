"""Per-channel image statistics and the normalisation that uses them.

Why a module of its own: the same numbers are applied twice, once in the
tf.data training/eval pipeline and once inside the exported serving model
(which takes raw uint8 pixels). If the two copies ever drift, the deployed
model silently sees differently scaled inputs than it was trained on, so
both places import `channel_stats` and `normalize` from here.

All values are in [0, 1] units (pixel / 255), RGB order, computed over the
training split (population statistics over every pixel, not the average of
per-image standard deviations that circulates as "CIFAR std" 0.2023/...).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

Stats = Tuple[Tuple[float, float, float], Tuple[float, float, float]]

# name -> (mean, std)
_STATS: dict = {
    # Krizhevsky CIFAR-10 train set.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # Krizhevsky CIFAR-100 train set.
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # CIFAR-10 rebuilt from a lossy JPEG dump (the dataset quickstart_data/
    # samples): pixels differ slightly, so its own statistics, measured on its 50,000 training images.
    "cifar10_jpeg": ((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)),
    # The torchvision / reference ImageNet values.
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def known_datasets() -> Tuple[str, ...]:
    """Names for which statistics are built in."""
    return tuple(sorted(_STATS))


def _base_name(name: str) -> str:
    # "cifar100:3.0.2" or "imagenet2012/subset" -> the builder name: the
    # statistics belong to the data, not to a TFDS version or config.
    return name.split(":")[0].split("/")[0].strip().lower()


def _as_triple(values: Sequence[float], what: str) -> Tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{what} must have 3 (RGB) values, got {values!r}")
    return values  # type: ignore[return-value]


def channel_stats(
    name: str,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Stats:
    """Returns `(mean, std)`, each an RGB triple in [0, 1] units.

    Explicit `mean`/`std` win (both or neither). Otherwise the dataset
    `name` must be one of `known_datasets()`: an unknown name is an error
    rather than a silent fallback to some other dataset's numbers.
    """
    if (mean is None) != (std is None):
        raise ValueError("Pass both `mean` and `std`, or neither.")
    if mean is not None:
        m, s = _as_triple(mean, "mean"), _as_triple(std, "std")
    else:
        key = _base_name(name)
        if key not in _STATS:
            raise ValueError(
                f"No built-in per-channel mean/std for dataset {name!r}; known: "
                f"{', '.join(known_datasets())}. Pass mean=... and std=... "
                "explicitly (RGB, in [0, 1] units)."
            )
        m, s = _STATS[key]
    if any(v <= 0 for v in s):
        raise ValueError(f"std must be positive, got {s!r}")
    return m, s


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """`(images / 255 - mean) / std` in float32, channels last.

    `images` holds pixel values in [0, 255]: uint8 (the decoded image, or
    the serving model's raw input) or any float/int dtype. Works on a single
    image `[H, W, 3]` or a batch `[..., H, W, 3]`, eagerly, in tf.data and
    inside a Keras/SavedModel graph.

    Computed exactly as `(x * f32(1/255) - f32(mean)) * f32(1/std)`, with the
    reciprocals rounded to float32 in Python. Why not divide: Grappler
    rewrites `x / const` into `x * (1 / const)` inside `tf.function` graphs
    (the exported model) but not inside tf.data functions, so a division
    gives results 1 ulp apart in training and serving for about half of the
    pixels. Multiplying by the reciprocals is what both would compute anyway,
    and is then bit-identical in eager mode, tf.data, `tf.function` and
    Keras `predict` (checked); it differs from the textbook division by at
    most ~5e-7 (see `normalize_reference_np`). Under XLA (`jit_compile`) the
    compiler fuses the arithmetic and results may again differ by ~1 ulp.
    """
    scale, mean_f, inv_std = _constants(mean, std)
    x = tf.cast(images, tf.float32) * scale
    return (x - mean_f) * inv_std


def _constants(mean, std):
    scale = np.float32(1.0) / np.float32(255.0)
    mean_f = np.asarray(mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(std, np.float32)
    return scale, mean_f, inv_std


def normalize_reference_np(images, mean: Sequence[float], std: Sequence[float]):
    """NumPy twin of `normalize`, bit for bit (for tests and offline checks)."""
    scale, mean_f, inv_std = _constants(mean, std)
    x = np.asarray(images).astype(np.float32) * scale
    return (x - mean_f) * inv_std
