"""Label corruption (Appendix E): rate, uniformity, stability across epochs and resumes."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from dhm_keras.data import make_dataset
from dhm_keras.data.pipeline import corrupt_label

DATA_DIR = f"{REPO_ROOT}/quickstart_data"
NUM_CLASSES = 10


def labels_of(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def sample(training=False, **kwargs):
    return make_dataset(
        "cifar10_jpeg",
        "train",
        data_dir=DATA_DIR,
        global_batch_size=500,
        training=training,
        seed=3,
        **kwargs,
    )


@pytest.fixture(scope="module")
def clean():
    return labels_of(sample())


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_rate_of_changed_labels(clean, rate):
    noisy = labels_of(sample(label_noise=rate, label_noise_seed=1))
    n = len(clean)
    # A picked label is redrawn uniformly, so it changes with probability 1 - 1/C.
    expected = rate * (1 - 1 / NUM_CLASSES)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs((noisy != clean).mean() - expected) < 4 * sigma
    assert noisy.min() >= 0 and noisy.max() < NUM_CLASSES


def test_picked_fraction_and_uniform_new_labels():
    rate, n = 0.3, 20_000
    index = tf.range(n, dtype=tf.int64)
    # A label no real class has (-1) shows exactly which examples were picked.
    labels = tf.data.Dataset.from_tensor_slices(index).map(
        lambda i: corrupt_label(-1, i, rate, NUM_CLASSES, 7), num_parallel_calls=tf.data.AUTOTUNE
    )
    out = np.concatenate([b.numpy() for b in labels.batch(5000)])
    picked = out >= 0
    assert abs(picked.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    counts = np.bincount(out[picked], minlength=NUM_CLASSES)
    expected = picked.sum() / NUM_CLASSES
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30, counts  # 9 degrees of freedom: p < 0.001 above ~27.9



def test_fixed_across_epochs_and_new_dataset_objects(clean):
    ds = sample(label_noise=0.2, label_noise_seed=1)
    first, second = labels_of(ds), labels_of(ds)
    resumed = labels_of(sample(label_noise=0.2, label_noise_seed=1))  # a restarted process
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, resumed)
    other_seed = labels_of(sample(label_noise=0.2, label_noise_seed=2))
    assert (other_seed != first).mean() > 0.1


def test_training_pairs_each_image_with_its_fixed_corrupted_label(clean):
    evaluation = sample(label_noise=0.2, label_noise_seed=1)
    label_of_image = {}
    for images, labels in evaluation:
        for image, label in zip(images.numpy(), labels.numpy()):
            label_of_image[image.tobytes()] = label
    # No padding: a training image is an evaluation image, maybe mirrored.
    orders = []
    for epoch in range(2):
        train = sample(training=True, label_noise=0.2, label_noise_seed=1, drop_remainder=False, padding=0,
                       epoch=epoch)
        order = []
        for images, labels in train:
            for image, label in zip(images.numpy(), labels.numpy()):
                key = image.tobytes()
                if key not in label_of_image:
                    key = image[:, ::-1].copy().tobytes()
                assert label == label_of_image[key]
                order.append(key)
        orders.append(order)
    assert len(orders[0]) == len(clean) and orders[0] != orders[1]  # reshuffled, same labels


def test_zero_rate_changes_nothing_and_bad_rate_is_refused(clean):
    np.testing.assert_array_equal(labels_of(sample(label_noise=0.0)), clean)
    with pytest.raises(ValueError, match="label_noise"):
        sample(label_noise=1.5)
