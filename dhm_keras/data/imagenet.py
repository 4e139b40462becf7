"""ImageNet-style preprocessing: Inception random-resized crop, resize-and-centre-crop eval.

The reference recipe (docs/method.md) is torchvision's
`RandomResizedCrop(224) + RandomHorizontalFlip` for training and
`Resize(256) + CenterCrop(224)` for evaluation, on PIL images. This module
reproduces both as pure TensorFlow functions that `pipeline.make_dataset`
maps over tf.data elements; they take either ENCODED image bytes (a scalar
tf.string, what TFDS yields under `tfds.decode.SkipDecoding()`) or an
already decoded uint8 `[H, W, C]` image, and return uint8 `[h, w, 3]`.

Design choices, and why:

* Crop-aware decoding. A random-resized crop keeps on average ~40% of the
  image's area. The crop box depends only on the image's SHAPE, which
  `tf.image.extract_jpeg_shape` reads from the JPEG header without
  decoding, so the box is drawn first and `tf.image.decode_and_crop_jpeg`
  decodes only what it needs: libjpeg still entropy-decodes every row above
  the window's bottom edge, but skips the IDCT and colour conversion outside
  it and everything below. Measured with `benchmarks/input_pipeline.py`
  (one thread, ~100 KB 430x385 JPEGs, CPU time, several runs): decoding
  1.2-1.35x faster, the whole training map 1.05-1.3x, because the
  antialiased resize, not the decode, is its most expensive op (the map
  without antialiasing runs ~1.35x faster; antialiasing is kept for
  fidelity to the reference's PIL resize). Other formats (PNG,
  the few non-JPEG files some datasets hold) are fully decoded and sliced;
  `tf.io.is_jpeg` picks the branch per image. Both paths decode with
  `channels=3`, which also turns grayscale (and gray PNG) files into RGB.
  libjpeg's partial decode is the same pixels as decode-then-crop, except
  that with 4:2:0 chroma subsampling the single column at a crop edge that
  falls inside a chroma block is upsampled from one side only (measured:
  <= 2 levels on natural-looking images; every other pixel identical).
* Same sampler as torchvision, stateless. The box comes from
  `tf.image.stateless_sample_distorted_bounding_box` with area range
  `scale` (fraction of the image), aspect range `ratio` (width / height) and
  `attempts` tries, keyed by the element's Philox key: a pure function of
  (image shape, key), so a seeded pipeline is reproducible under any
  parallel `map` schedule (see pipeline.py). When every try fails, TF falls
  back to the WHOLE image; torchvision instead takes the largest centred
  crop whose aspect ratio is clamped into `ratio`. `random_crop_box`
  applies torchvision's rule in that case (for an image whose own aspect is
  inside `ratio` both rules give the whole image). Differences that remain
  and do not matter for training: TF draws the aspect ratio uniformly (not
  log-uniformly) and the height (not the area) uniformly in its range.
* Resizing: bilinear WITH antialiasing, the filter PIL applies (a triangle
  kernel widened by the scale factor when shrinking), then rounded to uint8
  as PIL's output is. uint8 also keeps batches 4x smaller until the
  per-batch normalisation.
* Evaluation: the shorter side goes to `eval_resize` and the longer side to
  `floor(eval_resize * long / short)` (torchvision's integer rule), then a
  centred crop at offset `(size - crop) // 2`. torchvision rounds that
  offset half-to-even, which differs by one pixel for some odd margins.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import tensorflow as tf

DEFAULT_IMAGE_SIZE = 224
DEFAULT_EVAL_RESIZE = 256
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_ATTEMPTS = 10

# The whole image as the one "object" box: the crop is constrained only by
# `scale` and `ratio`, not by any annotation.
_WHOLE_IMAGE_BOX = (((0.0, 0.0, 1.0, 1.0),),)

HW = Tuple[int, int]


def resize_to_uint8(image: tf.Tensor, hw, antialias: bool = True) -> tf.Tensor:
    """Antialiased bilinear resize to `hw`, rounded back to uint8.

    Rounding keeps caches and batches 4x smaller than float32 and matches
    the reference, whose PIL resize outputs uint8. `hw` may be a tensor.
    """
    resized = tf.image.resize(image, hw, method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    if image.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(image)
    return image


def _crop(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
    return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))


def random_crop_box(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    attempts: int = DEFAULT_ATTEMPTS,
) -> tf.Tensor:
    """Inception crop box `[y, x, height, width]` (int32) for an image of `image_shape`.

    `image_shape` is `[H, W, C]` (or `[H, W]`); `seed` a shape-[2] int
    tensor. Area in `scale` x H*W, aspect (width / height) in `ratio`, up to
    `attempts` tries; when all fail, the largest centred crop with its
    aspect ratio clamped into `ratio` (torchvision's fallback).
    """
    shape = tf.cast(image_shape, tf.int32)
    h, w = shape[0], shape[1]
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=tf.stack([h, w, 3]),
        bounding_boxes=tf.constant(_WHOLE_IMAGE_BOX, tf.float32),
        seed=seed,
        # The crop's coverage of the whole-image box is its area fraction,
        # which `area_range` already bounds: no extra constraint.
        min_object_covered=0.0,
        aspect_ratio_range=tuple(float(r) for r in ratio),
        area_range=tuple(float(s) for s in scale),
        max_attempts=int(attempts),
        use_image_if_no_bounding_boxes=False,
    )
    sampled = tf.stack([begin[0], begin[1], size[0], size[1]])

    # TF signals "no try succeeded" by returning the whole image.
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    lo, hi = float(ratio[0]), float(ratio[1])
    in_ratio = wf / hf
    crop_h = tf.where(in_ratio < lo, tf.round(wf / lo), hf)
    crop_w = tf.where(in_ratio > hi, tf.round(hf * hi), wf)
    crop_h = tf.clip_by_value(tf.cast(crop_h, tf.int32), 1, h)
    crop_w = tf.clip_by_value(tf.cast(crop_w, tf.int32), 1, w)
    fallback = tf.stack([(h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w])
    whole = tf.logical_and(tf.equal(size[0], h), tf.equal(size[1], w))
    return tf.where(whole, fallback, sampled)


def decode_crop(
    encoded: tf.Tensor,
    box_fn: Callable[[tf.Tensor], tf.Tensor],
    crop_aware: bool = True,
) -> tf.Tensor:
    """Decodes the `box_fn(shape)` window of an encoded image as uint8 RGB.

    JPEGs: the shape comes from the header; with `crop_aware` only the
    window is decoded (`decode_and_crop_jpeg`), otherwise the whole image
    is decoded and sliced (kept for the benchmark's comparison). Other
    formats: full decode, then slice. `box_fn` maps `[H, W, C]` to
    `[y, x, height, width]`.
    """

    def jpeg():
        box = box_fn(tf.image.extract_jpeg_shape(encoded))
        if crop_aware:
            return tf.image.decode_and_crop_jpeg(encoded, box, channels=3)
        return _crop(tf.io.decode_jpeg(encoded, channels=3), box)

    def other():
        image = tf.io.decode_image(
            encoded, channels=3, dtype=tf.uint8, expand_animations=False
        )
        return _crop(image, box_fn(tf.shape(image)))

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """The full image, uint8 `[H, W, 3]`, from JPEG/PNG/... bytes (grayscale -> RGB)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def random_resized_crop(
    image: tf.Tensor,
    key: tf.Tensor,
    hw: HW = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
    scale: Sequence[float] = DEFAULT_SCALE,
    ratio: Sequence[float] = DEFAULT_RATIO,
    attempts: int = DEFAULT_ATTEMPTS,
    crop_aware: bool = True,
    antialias: bool = True,
) -> tf.Tensor:
    """Training augmentation: Inception crop resized to `hw`, then a random flip.

    `image`: encoded bytes (scalar tf.string) or decoded uint8 `[H, W, C]`.
    `key`: scalar int64; `(key, 1)` keys the crop box and `(key, 2)` the
    flip coin, the convention of `augment.pad_crop_flip`. Returns uint8
    `[hw[0], hw[1], 3]`. `crop_aware=False` and `antialias=False` exist for
    the benchmark's comparisons (the pipeline uses the defaults).
    """
    hw = (int(hw[0]), int(hw[1]))
    key = tf.cast(key, tf.int64)
    seed_crop = tf.stack([key, tf.constant(1, tf.int64)])
    seed_flip = tf.stack([key, tf.constant(2, tf.int64)])

    def box_fn(shape):
        return random_crop_box(shape, seed_crop, scale, ratio, attempts)

    if image.dtype == tf.string:
        crop = decode_crop(image, box_fn, crop_aware=crop_aware)
    else:
        image = _to_rgb(image)
        crop = _crop(image, box_fn(tf.shape(image)))
    out = resize_to_uint8(crop, hw, antialias=antialias)
    out = tf.image.stateless_random_flip_left_right(out, seed=seed_flip)
    out.set_shape(hw + (3,))
    return out


def shorter_side_size(shape: tf.Tensor, eval_resize: int) -> tf.Tensor:
    """`[h', w']` with the shorter side `eval_resize` and the longer side
    `floor(eval_resize * long / short)` (torchvision `Resize(int)`), int32."""
    h, w = tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)
    short = tf.minimum(h, w)
    size = tf.constant(int(eval_resize), tf.int64)
    return tf.cast(tf.stack([size * h // short, size * w // short]), tf.int32)


def resize_and_centre_crop(
    image: tf.Tensor,
    eval_resize: int = DEFAULT_EVAL_RESIZE,
    hw: HW = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
) -> tf.Tensor:
    """Evaluation preprocessing: shorter side to `eval_resize`, centre crop `hw`.

    `image`: encoded bytes (decoded in full: the antialiasing filter of the
    resize reads past any crop window) or decoded uint8 `[H, W, C]`.
    Returns uint8 `[hw[0], hw[1], 3]`, deterministically.
    """
    hw = (int(hw[0]), int(hw[1]))
    if max(hw) > eval_resize:
        raise ValueError(f"crop {hw} does not fit in an image resized to {eval_resize}")
    image = decode_rgb(image) if image.dtype == tf.string else _to_rgb(image)
    size = shorter_side_size(tf.shape(image), eval_resize)
    resized = resize_to_uint8(image, size)
    top, left = (size[0] - hw[0]) // 2, (size[1] - hw[1]) // 2
    out = tf.slice(resized, tf.stack([top, left, 0]), [hw[0], hw[1], 3])
    out.set_shape(hw + (3,))
    return out
