"""Tests of the TFDS input pipeline and the normalisation statistics.

Three data sources, none downloaded:
* `tfds.testing.mock_data` (fake cifar100 from the feature spec): shapes,
  dtypes, ranges, batching.
* the committed `quickstart_data/` (first 5,000/1,000 real CIFAR-10 JPEGs):
  determinism, augmentation correctness, slicing. Small, so fast. Copies
  with one record rewritten (bad label, truncated JPEG) or a record file
  deleted: the errors name the file and record.
* the full prepared `cifar10_jpeg` in `<repo>/../shared/tensorflow_datasets`
  (where CI's fresh clone finds it): exact normalisation against a NumPy
  reference, and that the quickstart sample is a byte-exact prefix of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dhm_keras.data import (
    DatasetNotFoundError,
    channel_stats,
    dataset_info,
    make_dataset,
    normalize,
    normalize_reference_np,
)
from conftest import rewrite_record
from dhm_keras.data.input_errors import input_errors_are_clear
from dhm_keras.errors import CorruptInputError, MissingDataFileError

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = REPO_ROOT / "quickstart_data"
SHARED = (REPO_ROOT / ".." / "shared" / "tensorflow_datasets").resolve()
NAME = "cifar10_jpeg"

# CI always has ../shared beside the clone: there a missing copy must fail, not skip.
needs_shared = pytest.mark.skipif(
    not (SHARED / NAME).exists() and not os.environ.get("CI"),
    reason=f"no prepared {NAME} in {SHARED}",
)


def _np_normalize(images_uint8, mean, std):
    """NumPy reference, bit for bit what `normalize` computes (reciprocals)."""
    return normalize_reference_np(images_uint8, mean, std)


def _np_textbook(images_uint8, mean, std):
    """The recipe as written: (x / 255 - mean) / std, float32."""
    x = images_uint8.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _uint8_split(data_dir, split):
    ds = tfds.load(NAME, data_dir=str(data_dir), split=split,
                   as_supervised=True, download=False)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.stack(images), np.array(labels)


def _first_batch(ds):
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


# --------------------------------------------------------------- stats


def test_channel_stats_known_unknown_and_explicit():
    mean, std = channel_stats("cifar10_jpeg")
    assert mean == (0.4913, 0.4821, 0.4465) and std == (0.2452, 0.2428, 0.2606)
    assert channel_stats("cifar100:3.0.2") == channel_stats("cifar100")
    assert channel_stats("my_set", [0.5] * 3, [0.25] * 3) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="my_set.*mean=.*std="):
        channel_stats("my_set")
    with pytest.raises(ValueError, match="both"):
        channel_stats("cifar10", mean=[0.5] * 3)


def test_normalize_uint8_and_float_inputs_agree_with_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    mean, std = channel_stats("cifar100")
    expected = _np_normalize(images, mean, std)
    np.testing.assert_array_equal(normalize(images, mean, std).numpy(), expected)
    as_float = normalize(tf.constant(images, tf.float32), mean, std)
    np.testing.assert_array_equal(as_float.numpy(), expected)
    # Graph mode (what the exported model runs): Grappler must not change
    # a single bit, so training and serving see identical inputs.
    in_graph = tf.function(lambda x: normalize(x, mean, std), autograph=False)(images)
    np.testing.assert_array_equal(in_graph.numpy(), expected)
    np.testing.assert_allclose(expected, _np_textbook(images, mean, std), rtol=0, atol=1e-6)


# --------------------------------------------------------------- mock cifar100


def test_mock_cifar100_shapes_dtypes_ranges_and_batching():
    mean, std = np.array(channel_stats("cifar100"))
    lo, hi = (-mean / std).min(), ((1 - mean) / std).max()
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        info = dataset_info("cifar100")
        assert info.num_classes == 100 and info.image_shape == (32, 32, 3)

        train = make_dataset("cifar100", "train", global_batch_size=8,
                             training=True, seed=1)
        batches = list(train)
        assert len(batches) == 2  # 20 // 8, remainder dropped
        assert train.element_spec[0].shape.as_list() == [8, 32, 32, 3]
        evaluation = make_dataset("cifar100", "test", global_batch_size=8,
                                  training=False)
        assert [int(x.shape[0]) for x, _ in evaluation] == [8, 8, 4]

    for x, y in batches + list(evaluation):
        assert x.dtype == tf.float32 and y.dtype == tf.int32
        assert x.shape[1:] == (32, 32, 3)
        assert lo - 1e-6 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= hi + 1e-6
        assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < 100


# --------------------------------------------------------------- quickstart


def test_quickstart_info_and_split_slicing():
    info = dataset_info(NAME, str(QUICKSTART))
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    assert dict(info.splits) == {"train": 5000, "test": 1000}
    assert info.num_examples("train[:10%]") == 500

    ds = make_dataset(NAME, "train[100:250]", data_dir=str(QUICKSTART),
                      global_batch_size=64, training=False)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert len(labels) == 150
    _, all_labels = _uint8_split(QUICKSTART, "train[:250]")
    np.testing.assert_array_equal(labels, all_labels[100:250])
    assert len(list(make_dataset(NAME, "test", data_dir=str(QUICKSTART),
                                 global_batch_size=128, training=False,
                                 take=300))) == 3


def _train(seed, **kw):
    kw = {"take": 256, "global_batch_size": 64, **kw}
    return make_dataset(NAME, "train", data_dir=str(QUICKSTART), training=True,
                        seed=seed, **kw)


def test_determinism_same_seed_equal_other_seed_and_epoch_differ():
    x1, y1 = _first_batch(_train(seed=7))
    x2, y2 = _first_batch(_train(seed=7))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)

    x3, _ = _first_batch(_train(seed=8))
    assert not np.array_equal(x1, x3)

    # Epoch e is a function of (seed, e): the same when read again, another
    # for another epoch (what lets a resumed run read what it missed).
    ds = _train(seed=7)
    np.testing.assert_array_equal(_first_batch(ds)[0], _first_batch(ds)[0])
    epoch2 = _first_batch(_train(seed=7, epoch=1))
    assert not np.array_equal(x1, epoch2[0])

    # Order held fixed (buffer 1 = no shuffle): augmentation alone differs.
    (a, la), (b, lb) = _first_batch(_train(seed=7, shuffle_buffer=1)), _first_batch(
        _train(seed=7, shuffle_buffer=1, epoch=1)
    )
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, b)


def test_training_stream_is_the_epochs_back_to_back_from_any_first_epoch():
    from dhm_keras.data.pipeline import make_training_stream

    kw = dict(data_dir=str(QUICKSTART), take=256, global_batch_size=64, seed=3)
    epochs = [list(make_dataset(NAME, "train", training=True, epoch=e, **kw)) for e in range(3)]
    assert [len(e) for e in epochs] == [4, 4, 4]
    for first in (0, 1):
        stream = list(make_training_stream(NAME, "train", first_epoch=first, **kw).take(8))
        expected = [batch for epoch in epochs[first:first + 2] for batch in epoch]
        for (x, y), (ex, ey) in zip(stream, expected):
            np.testing.assert_array_equal(x.numpy(), ex.numpy())
            np.testing.assert_array_equal(y.numpy(), ey.numpy())
    # Every epoch is a permutation of the same examples.
    labels = [sorted(np.concatenate([y.numpy() for _, y in e])) for e in epochs]
    assert labels[0] == labels[1] == labels[2]


def test_augmentation_is_a_flipped_or_plain_crop_of_the_zero_padded_image():
    pad, n = 4, 64
    originals, labels = _uint8_split(QUICKSTART, f"train[:{n}]")
    # A shuffle buffer of 1 keeps the order, so batch row i is example i.
    aug, aug_labels = _first_batch(_train(seed=3, take=n, global_batch_size=n,
                                          shuffle_buffer=1, padding=pad))
    np.testing.assert_array_equal(aug_labels, labels)
    mean, std = channel_stats(NAME)
    seen = set()
    for i in range(n):
        padded = np.pad(originals[i], ((pad, pad), (pad, pad), (0, 0)))
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if np.array_equal(
                aug[i],
                _np_normalize(
                    (lambda c: c[:, ::-1] if flip else c)(padded[dy:dy + 32, dx:dx + 32]),
                    mean, std,
                ),
            )
        ]
        assert matches, f"augmented image {i} is no crop/flip of its source"
        seen.update(matches)
    assert {f for _, _, f in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20  # offsets actually vary


def test_no_augmentation_trains_on_the_plain_normalised_images():
    n = 32
    originals, labels = _uint8_split(QUICKSTART, f"train[:{n}]")
    plain, plain_labels = _first_batch(_train(seed=3, take=n, global_batch_size=n,
                                              shuffle_buffer=1, augmentation="none"))
    np.testing.assert_array_equal(plain_labels, labels)
    mean, std = channel_stats(NAME)
    np.testing.assert_array_equal(plain, _np_normalize(originals, mean, std))
    # Still shuffled (seeded) with a real buffer: same pixels, another order.
    shuffled, _ = _first_batch(_train(seed=3, take=n, global_batch_size=n,
                                      augmentation="none"))
    assert not np.array_equal(shuffled, plain)
    np.testing.assert_array_equal(np.sort(shuffled.ravel()), np.sort(plain.ravel()))


def test_resize_option():
    x, _ = _first_batch(_train(seed=0, image_size=24, take=64))
    assert x.shape == (64, 24, 24, 3)


def test_missing_dataset_error_names_dataset_dir_and_flag(tmp_path):
    for name in (NAME, "cifar100"):  # unregistered, and registered-but-absent
        with pytest.raises(DatasetNotFoundError) as err:
            make_dataset(name, "train", data_dir=str(tmp_path),
                         global_batch_size=8, training=True)
        message = str(err.value)
        assert name in message and str(tmp_path) in message
        assert "--data_dir" in message and "TFDS_DATA_DIR" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(DatasetNotFoundError):
        dataset_info(NAME, str(tmp_path))


# --------------------------------------------------------------- damaged data


def _damaged_copy(tmp_path, split, index=None, edit=None):
    """A copy of the quickstart sample whose `split` record file has example
    `index` rewritten by `edit(tf.train.Example)` (checksums stay valid)."""
    import shutil

    shutil.copytree(QUICKSTART, tmp_path / "data")
    (record,) = (tmp_path / "data" / NAME / "1.0.0").glob(f"{NAME}-{split}.tfrecord-*")
    if edit is not None:
        rewrite_record(record, index, edit)
    return tmp_path / "data", record


def _read_all(data_dir, split, **kw):
    """Reads a pipeline to the end the way Keras does (in a tf.function, so
    errors come as "Graph execution error"), under the trainer's error handler."""
    ds = make_dataset(NAME, split, data_dir=str(data_dir), global_batch_size=32, **kw)
    step = tf.function(lambda iterator: next(iterator))
    with input_errors_are_clear("test"):
        iterator = iter(ds)
        for _ in range(len(ds)):
            step(iterator)


def test_evaluation_label_out_of_range_names_record_and_valid_range(tmp_path):
    def relabel(example):
        example.features.feature["label"].int64_list.value[0] = -1

    data, record = _damaged_copy(tmp_path, "test", 3, relabel)
    with pytest.raises(CorruptInputError) as err:
        _read_all(data, "test[:64]", training=False)
    message = str(err.value)
    assert f"record 3 of {record} (split 'test[:64]' of {NAME})" in message, message
    assert "label -1" in message and "[0, 9]" in message
    # A slice that starts later still names the record, not its position in the slice.
    with pytest.raises(CorruptInputError, match=f"record 3 of {record} "):
        _read_all(data, "test[2:64]", training=False)


@pytest.mark.parametrize("augmentation", ["pad_crop_flip", "random_resized_crop"])
def test_undecodable_image_names_record_and_decoder_message(tmp_path, augmentation):
    def truncate(example):
        image = example.features.feature["image"].bytes_list.value
        image[0] = image[0][:200]

    data, record = _damaged_copy(tmp_path, "train", 7, truncate)
    with pytest.raises(CorruptInputError) as err:
        _read_all(data, "train[:64]", training=True, seed=0, image_size=32, augmentation=augmentation)
    message = str(err.value)
    assert f"record 7 of {record} (split 'train[:64]' of {NAME}) does not decode" in message, message
    assert "JPEG data" in message  # the decoder's own words
    assert "Graph execution error" not in message and "\n" not in message


def test_reid_image_that_does_not_decode_is_named(tmp_path):
    from dhm_keras.data.reid import make_reid_dataset

    jpeg = tf.io.encode_jpeg(np.full((16, 8, 3), 128, np.uint8)).numpy()
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "market1501" / folder).mkdir(parents=True)
        for person in (1, 2, 3):
            (tmp_path / "market1501" / folder / f"000{person}_c1s1_000001_01.jpg").write_bytes(jpeg)
    broken = tmp_path / "market1501" / "bounding_box_train" / "0002_c1s1_000001_01.jpg"
    broken.write_bytes(jpeg[:100])
    ds = make_reid_dataset("market1501", "train", data_dir=str(tmp_path), global_batch_size=2,
                           training=False, image_size=(16, 8))
    with pytest.raises(CorruptInputError) as err:
        with input_errors_are_clear("test"):
            list(ds)
    assert f"{broken} (split 'train' of market1501) does not decode" in str(err.value), str(err.value)


def test_record_file_missing_before_or_during_reading_is_named(tmp_path):
    data, record = _damaged_copy(tmp_path, "train")
    ds = make_dataset(NAME, "train[:64]", data_dir=str(data), global_batch_size=32,
                      training=True, cache=False, seed=0)
    record.unlink()
    with pytest.raises(MissingDataFileError, match=f"{record} of the test data is missing"):
        with input_errors_are_clear("test"):
            list(ds)
    with pytest.raises(MissingDataFileError, match=f"{record} of split 'train\\[:64\\]'.*prepare it again"):
        make_dataset(NAME, "train[:64]", data_dir=str(data), global_batch_size=32, training=False)


# --------------------------------------------------------------- full dataset


@needs_shared
def test_eval_images_equal_numpy_normalisation_of_decoded_jpeg():
    n = 200
    mean, std = channel_stats(NAME)
    files = sorted(str(p) for p in (SHARED / NAME / "1.0.0").glob(f"{NAME}-test.tfrecord-*"))
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64)}
    ref_x, ref_y = [], []
    for record in tf.data.TFRecordDataset(files).take(n):
        ex = tf.io.parse_single_example(record, spec)
        ref_x.append(tf.io.decode_jpeg(ex["image"], channels=3).numpy())
        ref_y.append(int(ex["label"]))
    ds = make_dataset(NAME, "test", data_dir=str(SHARED), global_batch_size=128,
                      training=False, take=n)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    np.testing.assert_array_equal(np.concatenate(ys), ref_y)
    ref_x = np.stack(ref_x)
    np.testing.assert_array_equal(np.concatenate(xs), _np_normalize(ref_x, mean, std))
    np.testing.assert_allclose(np.concatenate(xs), _np_textbook(ref_x, mean, std),
                               rtol=0, atol=1e-6)


@needs_shared
def test_full_dataset_info_and_quickstart_is_its_prefix():
    info = dataset_info(NAME, str(SHARED))
    assert dict(info.splits) == {"train": 50000, "test": 10000}
    for split in ("train", "test"):
        quick = _uint8_split(QUICKSTART, f"{split}[:100]")
        full = _uint8_split(SHARED, f"{split}[:100]")
        np.testing.assert_array_equal(quick[0], full[0])
        np.testing.assert_array_equal(quick[1], full[1])
