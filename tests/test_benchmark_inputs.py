"""The benchmarks' synthetic input: the right batches, and no tf.data autotuning.

Timing `fit()` on an autotuned dataset measures tf.data's teardown (destroying
the iterator waits for the autotune thread's sleep, up to a minute), not the
training step: this guards the fix in `benchmarks/train_throughput.py`.
"""

import sys

import numpy as np

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import train_throughput  # noqa: E402


def test_synthetic_batches_repeat_one_batch_without_autotuning():
    data = train_throughput.synthetic_batches(batch=4, num_classes=10, steps=3)

    assert data.options().autotune.enabled is False
    batches = list(data.as_numpy_iterator())
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (4,) and labels.min() >= 0 and labels.max() < 10
    for other_images, other_labels in batches[1:]:
        np.testing.assert_array_equal(other_images, images)
        np.testing.assert_array_equal(other_labels, labels)


def test_autotuning_stays_off_through_take():
    """A shortened copy (e.g. a 2-step warm-up) stays untuned too."""
    data = train_throughput.synthetic_batches(batch=2, num_classes=5, steps=4).take(2)
    assert data.options().autotune.enabled is False
    assert len(list(data)) == 2


def test_dhm_variants_grid_covers_each_precision_with_and_without_xla():
    grid = train_throughput.dhm_variants(bf16=True, fp16=True, xla=True, jit_compile=False)
    assert sorted(grid.values()) == sorted([
        ("float32", True),
        ("mixed_bfloat16", False), ("mixed_bfloat16", True),
        ("mixed_float16", False), ("mixed_float16", True),
    ])  # the plain float32 step without XLA is the "dhm" row itself
    assert train_throughput.dhm_variants(False, False, False, False) == {}
    assert list(train_throughput.dhm_variants(False, True, False, True).values()) == [
        ("mixed_float16", True)
    ]


def test_fp16_variant_is_loss_scaled_and_trains():
    """The mixed_float16 row times a real loss-scaled step, not float32 relabelled."""
    import keras

    model = train_throughput.compiled_model("resnet32", "dhm", 10, False, "mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    conv = next(l for l in model.network.layers if isinstance(l, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # restored for the next model
    history = model.fit(train_throughput.synthetic_batches(2, 10, 1), verbose=0)
    assert np.isfinite(history.history["loss"][0])
