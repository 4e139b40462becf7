"""Per-image transforms shared by the pipelines and the served model.

Training augmentations are STATELESS: each is a pure function of the image
and a scalar int64 key, and ``(key, 1)`` / ``(key, 2)`` seed the crop and the
flip. So the output does not depend on how a parallel `map` schedules its
threads, and a key that depends only on (seed, epoch, position) makes every
epoch reproducible, also after a resume (`dhm_keras.data.epochs`).

`eval_image_transform` is the one resize/crop rule of evaluation; the
export's `serving_bytes` signature calls it too, so a served image is scored
as evaluation scored it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import tensorflow as tf

from dhm_keras.data import imagenet as imagenet_lib

ImageSize = Union[int, Sequence[int]]
HW = Tuple[int, int]

# Training augmentations the pipelines know. "none" trains on the plain
# images (shuffled only): the memorisation regime of small noisy-label studies.
AUGMENTATIONS = ("pad_crop_flip", "random_resized_crop", "none")


def image_hw(image_size: Optional[ImageSize]) -> Optional[HW]:
    """None, an int (square) or (H, W) -> (H, W) or None."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = (int(v) for v in image_size)
    return (h, w)


def resize_uint8(image: tf.Tensor, hw: HW) -> tf.Tensor:
    """Antialiased bilinear resize, rounded back to uint8, so that caches stay
    4x smaller than float32 and augmentation pads real pixel values (one
    implementation for every path: `imagenet.resize_to_uint8`)."""
    return imagenet_lib.resize_to_uint8(image, hw)


def pad_crop_flip(image: tf.Tensor, key: tf.Tensor, padding: int) -> tf.Tensor:
    """CIFAR recipe: zero-pad by `padding`, random crop back to the original
    size, random horizontal flip. Zero pixels are black BEFORE normalisation,
    as torchvision's `RandomCrop(32, padding=4)` pads the uint8 image."""
    static_shape = image.shape
    shape = tf.shape(image)
    key = tf.cast(key, tf.int64)
    seed_crop = tf.stack([key, tf.constant(1, tf.int64)])
    seed_flip = tf.stack([key, tf.constant(2, tf.int64)])
    if padding > 0:
        padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
        image = tf.image.stateless_random_crop(padded, size=shape, seed=seed_crop)
    image = tf.image.stateless_random_flip_left_right(image, seed=seed_flip)
    image.set_shape(static_shape)  # keep H, W static for the model's trace
    return image


def training_augmentation(augmentation: str, hw: Optional[HW], padding: int) -> Optional[Callable]:
    """(image, key) -> image for `augmentation`, or None for "none"."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augmentation {augmentation!r}; choose one of "
            f"{', '.join(repr(a) for a in AUGMENTATIONS)}"
        )
    if augmentation == "pad_crop_flip":
        return lambda image, key: pad_crop_flip(image, key, padding)
    if augmentation == "random_resized_crop":
        return lambda image, key: imagenet_lib.random_resized_crop(image, key, hw)
    return None


def eval_image_transform(image: tf.Tensor, hw: Optional[HW], eval_resize: Optional[int] = None) -> tf.Tensor:
    """Evaluation's resize/crop of one image (encoded bytes or uint8 [H, W, C]).

    With `eval_resize`: shorter side to `eval_resize`, centre crop `hw`
    (ImageNet: 256 -> 224). Otherwise an antialiased resize to `hw`, or the
    image as it is when `hw` is None. Returns uint8 [H, W, 3].
    """
    if eval_resize is not None:
        return imagenet_lib.resize_and_centre_crop(image, int(eval_resize), hw)
    if image.dtype == tf.string:
        image = imagenet_lib.decode_rgb(image)
    return image if hw is None else resize_uint8(image, hw)
