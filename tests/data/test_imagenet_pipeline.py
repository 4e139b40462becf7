"""Tests of the ImageNet input path: random-resized crop, resize-256/centre-crop-224 eval.

Three data sources, none downloaded:
* `tfds.testing.mock_data` (fake imagenet2012 and imagenette from the real
  feature specs; under `SkipDecoding` it yields real encoded JPEGs of random
  small sizes): shapes, dtypes, ranges, labels, determinism, end to end.
* a tiny TFDS dataset written here into a temporary folder, mixing RGB
  JPEGs, grayscale JPEGs and PNGs of known content: the decode branches,
  grayscale -> RGB, pixel-exact eval preprocessing, label corruption and
  the encoded-bytes cache.
* the `imagenet.py` ops on synthetic images: crop-box geometry, the
  fallback, flips, crop-aware JPEG decoding, and the eval resize against an
  independent NumPy implementation of PIL's antialiased bilinear filter.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dhm_keras.data import channel_stats, dataset_info, make_dataset
from dhm_keras.data import imagenet
from dhm_keras.data.pipeline import AUGMENTATIONS, corrupt_label

IMAGENET_MEAN, IMAGENET_STD = channel_stats("imagenet2012")
MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


def _normalised_bounds(mean, std):
    mean, std = np.asarray(mean), np.asarray(std)
    return (-mean / std).min(), ((1 - mean) / std).max()


def _to_uint8(x, mean, std):
    """Inverts the normalisation: float32 batch -> the uint8 pixels it came from."""
    x = np.asarray(x, np.float64) * np.asarray(std) + np.asarray(mean)
    return np.round(x * 255.0).astype(np.int64)


def _arrays(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------- NumPy reference


def _pil_bilinear_weights(in_size, out_size):
    """[out, in] weights of PIL's (and torchvision's) antialiased bilinear resize:
    a triangle filter centred on (i + 0.5) * scale, widened by the scale when
    shrinking, normalised per output pixel."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale
    taps = np.arange(in_size) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def _np_resize_shorter_centre_crop(image, eval_resize, crop_hw):
    h, w = image.shape[:2]
    short = min(h, w)
    new_h, new_w = eval_resize * h // short, eval_resize * w // short
    wh, ww = _pil_bilinear_weights(h, new_h), _pil_bilinear_weights(w, new_w)
    rows = np.tensordot(wh, image.astype(np.float64), axes=(1, 0))  # [new_h, w, c]
    resized = np.tensordot(rows, ww, axes=(1, 1)).transpose(0, 2, 1)  # [new_h, new_w, c]
    resized = np.clip(np.round(resized), 0, 255)
    top, left = (new_h - crop_hw[0]) // 2, (new_w - crop_hw[1]) // 2
    return resized[top:top + crop_hw[0], left:left + crop_hw[1]].astype(np.int64)


# --------------------------------------------------------------- argument checks


def test_unknown_augmentation_names_the_choices():
    with pytest.raises(ValueError) as err:
        make_dataset("imagenet2012", "train", global_batch_size=8, training=True,
                     augmentation="autoaugment")
    message = str(err.value)
    assert "autoaugment" in message
    assert all(name in message for name in AUGMENTATIONS)
    assert AUGMENTATIONS == ("pad_crop_flip", "random_resized_crop", "none")


def test_eval_crop_larger_than_eval_resize_is_an_error():
    with pytest.raises(ValueError, match="eval_resize"):
        make_dataset("imagenet2012", "validation", global_batch_size=8, training=False,
                     image_size=224, eval_resize=200)
    with pytest.raises(ValueError, match="eval_resize"):
        make_dataset("imagenet2012", "validation", global_batch_size=8, training=False,
                     eval_resize=0)


# --------------------------------------------------------------- mock imagenet2012


def test_mock_imagenet_train_and_eval_shapes_ranges_labels():
    lo, hi = _normalised_bounds(IMAGENET_MEAN, IMAGENET_STD)
    with tfds.testing.mock_data(num_examples=20, **MOCK):
        assert dataset_info("imagenet2012").num_classes == 1000
        train = make_dataset("imagenet2012", "train", global_batch_size=8, training=True,
                             seed=1, augmentation="random_resized_crop", cache=False)
        assert train.element_spec[0].shape.as_list() == [8, 224, 224, 3]
        train_batches = list(train)
        evaluation = make_dataset("imagenet2012", "validation", global_batch_size=8,
                                  training=False, eval_resize=256, cache=False)
        assert evaluation.element_spec[0].shape.as_list() == [None, 224, 224, 3]
        eval_batches = list(evaluation)
    assert len(train_batches) == 2  # 20 // 8, remainder dropped
    assert [int(x.shape[0]) for x, _ in eval_batches] == [8, 8, 4]
    for x, y in train_batches + eval_batches:
        assert x.dtype == tf.float32 and y.dtype == tf.int32
        assert x.shape[1:] == (224, 224, 3)
        assert lo - 1e-6 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= hi + 1e-6
        # Random pixels: a constant (e.g. all-zero) output would be a bug.
        assert float(tf.reduce_max(x)) - float(tf.reduce_min(x)) > 2.0
        assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < 1000
        pixels = _to_uint8(x, IMAGENET_MEAN, IMAGENET_STD)
        assert pixels.min() >= 0 and pixels.max() <= 255


def test_mock_imagenet_eval_is_deterministic_and_seeded_training_reproducible():
    def train(seed, epoch=0):
        return make_dataset("imagenet2012", "train", global_batch_size=8, training=True,
                            seed=seed, augmentation="random_resized_crop", epoch=epoch)

    with tfds.testing.mock_data(num_examples=16, **MOCK):
        evaluation = make_dataset("imagenet2012", "validation", global_batch_size=8,
                                  training=False, eval_resize=256)
        first, second = _arrays(evaluation), _arrays(evaluation)
        x1, y1 = _arrays(train(7))
        x2, y2 = _arrays(train(7))
        x3, _ = _arrays(train(8))
        epoch1, epoch2 = _arrays(train(7)), _arrays(train(7, epoch=1))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    np.testing.assert_array_equal(epoch1[0], x1)  # epoch 0 of the seed, whenever read
    assert not np.array_equal(epoch1[0], epoch2[0])  # new crops every epoch


# --------------------------------------------------------------- mock imagenette


@pytest.mark.parametrize("name", ["imagenette", "imagenette/full-size-v2"])
def test_mock_imagenette_end_to_end(name):
    # Imagenette is an ImageNet subset: ImageNet statistics, passed explicitly
    # (the built-in table has none for it, as gin/imagenet/imagenette_* do).
    lo, hi = _normalised_bounds(IMAGENET_MEAN, IMAGENET_STD)
    with tfds.testing.mock_data(num_examples=12, **MOCK):
        info = dataset_info(name)
        assert info.num_classes == 10 and info.image_shape == (None, None, 3)
        common = dict(global_batch_size=4, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        x_train, y_train = _arrays(make_dataset(
            name, "train", training=True, seed=0, augmentation="random_resized_crop",
            **common))
        x_eval, y_eval = _arrays(make_dataset(
            name, "validation", training=False, eval_resize=256, **common))
    assert x_train.shape == (12, 224, 224, 3) and x_eval.shape == (12, 224, 224, 3)
    for x, y in ((x_train, y_train), (x_eval, y_eval)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6
        assert 0 <= y.min() and y.max() < 10


# --------------------------------------------------------------- tiny local dataset

TINY = "dhm_tiny_images"
TINY_CLASSES = 5


def _tiny_sources():
    """12 images of varied size: RGB JPEG (4:2:0), grayscale JPEG, RGB PNG, in turn."""
    rng = np.random.default_rng(0)
    sources = []
    for i in range(12):
        h, w = 48 + 5 * i, 90 - 3 * i  # landscape to portrait
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([yy * 255 // h, xx * 255 // w, (xx + yy) * 255 // (h + w)], -1)
        noise = rng.integers(-30, 31, (h, w, 3))
        image = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        kind = ("jpeg", "gray", "png")[i % 3]
        if kind == "jpeg":
            data = tf.io.encode_jpeg(image, quality=90).numpy()
        elif kind == "gray":
            data = tf.io.encode_jpeg(image[..., :1], quality=90).numpy()
        else:
            data = tf.io.encode_png(image).numpy()
        sources.append((data, i % TINY_CLASSES, kind))
    return sources


class DhmTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Mixed-format images stored as given (TFDS keeps file bytes as they are)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=TINY_CLASSES),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (data, label, _) in enumerate(_tiny_sources()):
            yield i, {"image": io.BytesIO(data), "label": label}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data_dir, [(encoded bytes, label, kind)] in the split's read order)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    DhmTinyImages(data_dir=data_dir).download_and_prepare()
    kinds = {data: kind for data, _, kind in _tiny_sources()}
    ds = tfds.builder(TINY, data_dir=data_dir).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    records = [(ex["image"].numpy(), int(ex["label"])) for ex in ds]
    assert sorted(kinds[d] for d, _ in records) == ["gray"] * 4 + ["jpeg"] * 4 + ["png"] * 4
    return data_dir, [(d, y, kinds[d]) for d, y in records]


def _tiny_dataset(data_dir, training, **kw):
    kw = {"global_batch_size": 12, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **kw}
    if training:
        kw = {"seed": 5, "shuffle_buffer": 1, "augmentation": "random_resized_crop", **kw}
    return make_dataset(TINY, "train", data_dir=data_dir, training=training, **kw)


def test_eval_resize_centre_crop_matches_numpy_reference_for_every_format(tiny):
    data_dir, records = tiny
    crop = (20, 24)
    x, y = _arrays(_tiny_dataset(data_dir, training=False, image_size=crop, eval_resize=32))
    assert x.shape == (12,) + crop + (3,)
    np.testing.assert_array_equal(y, [label for _, label, _ in records])
    pixels = _to_uint8(x, IMAGENET_MEAN, IMAGENET_STD)
    for i, (data, _, kind) in enumerate(records):
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        expected = _np_resize_shorter_centre_crop(decoded, 32, crop)
        assert np.abs(pixels[i] - expected).max() <= 1, f"example {i} ({kind})"
        if kind == "gray":  # decoded with channels=3: R == G == B
            assert np.array_equal(pixels[i][..., 0], pixels[i][..., 1])
            assert np.array_equal(pixels[i][..., 0], pixels[i][..., 2])
        else:
            assert not np.array_equal(pixels[i][..., 0], pixels[i][..., 1])


def test_random_resized_crop_training_on_every_format(tiny):
    data_dir, records = tiny
    (x1, y1), (x2, y2) = (_arrays(_tiny_dataset(data_dir, training=True, image_size=32, epoch=e)) for e in (0, 1))
    assert x1.shape == (12, 32, 32, 3) and x1.dtype == np.float32
    labels = [label for _, label, _ in records]
    np.testing.assert_array_equal(y1, labels)  # buffer 1: the split's order
    np.testing.assert_array_equal(y2, labels)
    for i, (_, _, kind) in enumerate(records):
        assert not np.array_equal(x1[i], x2[i]), f"example {i}: same crop in two epochs"
        pixels = _to_uint8(x1[i], IMAGENET_MEAN, IMAGENET_STD)
        gray = np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(
            pixels[..., 1], pixels[..., 2])
        assert gray == (kind == "gray"), f"example {i} ({kind})"
    again, _ = _arrays(_tiny_dataset(data_dir, training=True, image_size=32))
    np.testing.assert_array_equal(again, x1)


@pytest.mark.parametrize("training", [True, False])
def test_encoded_bytes_cache_gives_the_same_batches_as_no_cache(tiny, training):
    data_dir, _ = tiny
    kw = dict(image_size=24) if training else dict(image_size=24, eval_resize=28)
    cached = _tiny_dataset(data_dir, training, cache=True, **kw)
    uncached = _tiny_dataset(data_dir, training, cache=False, **kw)
    for _ in range(2):  # the second pass reads the cache
        x_c, y_c = _arrays(cached)
        x_u, y_u = _arrays(uncached)
        np.testing.assert_array_equal(x_c, x_u)
        np.testing.assert_array_equal(y_c, y_u)


def test_label_noise_keyed_by_index_on_every_path(tiny):
    data_dir, records = tiny
    rate, seed = 0.5, 3
    clean = np.array([label for _, label, _ in records])
    expected = np.array([
        int(corrupt_label(tf.constant(label), tf.constant(i), rate, TINY_CLASSES, seed))
        for i, label in enumerate(clean)
    ])
    assert (expected != clean).sum() >= 2  # the check below can tell them apart
    noise = dict(label_noise=rate, label_noise_seed=seed)
    paths = {
        "random_resized_crop": _tiny_dataset(data_dir, True, image_size=16, **noise),
        "eval_resize": _tiny_dataset(data_dir, False, image_size=16, eval_resize=20, **noise),
        "pad_crop_flip": _tiny_dataset(data_dir, True, image_size=16,
                                       augmentation="pad_crop_flip", **noise),
    }
    for path, ds in paths.items():
        for _ in range(2):  # fixed for the whole run
            np.testing.assert_array_equal(_arrays(ds)[1], expected, err_msg=path)


def test_default_path_unchanged_by_the_new_arguments(tiny):
    # augmentation only matters for training, eval_resize only for evaluation.
    data_dir, _ = tiny
    plain, _ = _arrays(_tiny_dataset(data_dir, False, image_size=24))
    with_aug, _ = _arrays(_tiny_dataset(data_dir, False, image_size=24,
                                        augmentation="random_resized_crop"))
    np.testing.assert_array_equal(plain, with_aug)
    kw = dict(image_size=24, augmentation="pad_crop_flip", padding=2)
    a, _ = _arrays(_tiny_dataset(data_dir, True, **kw))
    b, _ = _arrays(_tiny_dataset(data_dir, True, eval_resize=256, **kw))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- imagenet.py ops


def _boxes(shape, n, **kw):
    return np.array([
        imagenet.random_crop_box(tf.constant(shape), tf.constant([k, 1], tf.int64), **kw).numpy()
        for k in range(n)
    ])


def test_random_crop_box_scale_aspect_and_bounds():
    h, w = 300, 400
    boxes = _boxes((h, w, 3), 200)
    y, x, ch, cw = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (y + ch <= h).all() and (x + cw <= w).all()
    area = ch * cw / (h * w)
    assert (area >= 0.08).all() and (area <= 1.0).all()
    # width = round(height * ratio): the aspect is in range up to that rounding.
    aspect = cw / ch
    assert (aspect >= 0.75 - 0.5 / ch - 1e-9).all()
    assert (aspect <= 4 / 3 + 0.5 / ch + 1e-9).all()
    # The draws actually spread over the ranges and the image.
    assert area.min() < 0.2 and area.max() > 0.7
    assert aspect.min() < 0.85 and aspect.max() > 1.2
    assert len({(a, b) for a, b in zip(y, x)}) > 150
    # Stateless: a pure function of (shape, seed).
    np.testing.assert_array_equal(_boxes((h, w, 3), 200), boxes)
    # Other ranges are honoured too.
    narrow = _boxes((h, w, 3), 50, scale=(0.5, 0.6), ratio=(1.0, 1.0))
    narrow_area = narrow[:, 2] * narrow[:, 3] / (h * w)
    assert (narrow_area >= 0.5).all() and (narrow_area <= 0.6 + 2 * w / (h * w)).all()
    assert (np.abs(narrow[:, 3] - narrow[:, 2]) <= 1).all()


def test_random_crop_box_falls_back_to_the_clamped_centre_crop():
    # No crop of aspect 3/4..4/3 can cover 8% of a 10x400 strip.
    wide = _boxes((10, 400, 3), 5)
    np.testing.assert_array_equal(wide, [[0, (400 - 13) // 2, 10, 13]] * 5)
    tall = _boxes((400, 10, 3), 5)
    np.testing.assert_array_equal(tall, [[(400 - 13) // 2, 0, 13, 10]] * 5)
    # An image whose own aspect is in range falls back to the whole image
    # (or finds it: the only crop of >= 99% of the area).
    np.testing.assert_array_equal(_boxes((30, 36, 3), 20, scale=(0.99, 1.0)),
                                  [[0, 0, 30, 36]] * 20)


def test_random_resized_crop_resizes_and_flips():
    # Dark left half, bright right half; crop = the whole image (scale 1 and
    # its own aspect), so the output is the image resized, flipped or not.
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, 20:] = 255
    flips = set()
    for key in range(16):
        out = imagenet.random_resized_crop(
            tf.constant(image), tf.constant(key, tf.int64), (12, 16),
            scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)).numpy()
        assert out.shape == (12, 16, 3) and out.dtype == np.uint8
        left, right = out[:, :7].mean(), out[:, 9:].mean()
        assert {left, right} == {0.0, 255.0}
        flips.add(bool(left > right))
        encoded = tf.io.encode_png(image)  # the encoded path agrees exactly
        np.testing.assert_array_equal(
            imagenet.random_resized_crop(encoded, tf.constant(key, tf.int64), (12, 16),
                                         scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)).numpy(),
            out)
    assert flips == {False, True}


def test_decode_crop_box_semantics_and_crop_aware_jpeg():
    rng = np.random.default_rng(1)
    h, w = 96, 128
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 7),
                       128 + 80 * np.sin((xx + yy) / 13)], -1)
    image = np.clip(smooth + rng.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    boxes = [(0, 0, h, w), (5, 9, 40, 61), (17, 33, 50, 70), (1, 2, 3, 4)]
    for box in boxes:
        def box_fn(shape, box=box):
            tf.debugging.assert_equal(shape[:2], tf.constant([h, w]))
            return tf.constant(box, tf.int32)

        y, x, ch, cw = box
        # PNG is lossless: the window is exactly image[y:y+ch, x:x+cw].
        png = imagenet.decode_crop(tf.io.encode_png(image), box_fn).numpy()
        np.testing.assert_array_equal(png, image[y:y + ch, x:x + cw])
        # JPEG without chroma subsampling: partial decode == decode + slice.
        jpeg444 = tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False)
        np.testing.assert_array_equal(
            imagenet.decode_crop(jpeg444, box_fn, crop_aware=True).numpy(),
            imagenet.decode_crop(jpeg444, box_fn, crop_aware=False).numpy())
        # 4:2:0: only a crop-edge column inside a chroma block may differ, slightly.
        jpeg420 = tf.io.encode_jpeg(image, quality=95)
        aware = imagenet.decode_crop(jpeg420, box_fn, crop_aware=True).numpy().astype(int)
        full = imagenet.decode_crop(jpeg420, box_fn, crop_aware=False).numpy().astype(int)
        full_ref = tf.io.decode_jpeg(jpeg420).numpy()[y:y + ch, x:x + cw]
        np.testing.assert_array_equal(full, full_ref)
        assert aware.shape == (ch, cw, 3)
        interior = slice(1, cw - 1)
        np.testing.assert_array_equal(aware[:, interior], full[:, interior])
        assert np.abs(aware - full).max() <= 8  # edge column: small, never garbage


@pytest.mark.parametrize("shape, expected", [
    ((375, 500), (256, 341)), ((500, 375), (341, 256)), ((256, 256), (256, 256)),
    ((100, 333), (256, 852)), ((17, 9), (483, 256)),
])
def test_shorter_side_size_is_torchvision_resize(shape, expected):
    got = imagenet.shorter_side_size(tf.constant(shape + (3,)), 256).numpy()
    assert tuple(got) == expected
    # torchvision: long = int(size * long / short)
    short, long = min(shape), max(shape)
    assert max(expected) == int(256 * long / short)


@pytest.mark.parametrize("shape", [(375, 500), (333, 250)])
def test_resize_256_centre_crop_224_matches_numpy_reference(shape):
    image = np.random.default_rng(2).integers(0, 256, shape + (3,), dtype=np.uint8)
    got = imagenet.resize_and_centre_crop(tf.constant(image), 256, (224, 224)).numpy()
    expected = _np_resize_shorter_centre_crop(image, 256, (224, 224))
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.int64) - expected).max() <= 1
    # A one-pixel shift of the crop would be far off on random pixels.
    shifted = _np_resize_shorter_centre_crop(
        np.pad(image, ((0, 0), (1, 0), (0, 0)), mode="edge")[:, :-1], 256, (224, 224))
    assert np.abs(got.astype(np.int64) - shifted).mean() > 10
