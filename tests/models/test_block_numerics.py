"""Block functions of the new families against NumPy forward passes written here.

Each block is wrapped in a tiny functional model (a few channels, a few pixels), given random
BN parameters and moving statistics, and compared at inference with a float64 NumPy
computation with PyTorch semantics: symmetric padding, max pooling whose padding never
wins, pre-activated WRN shortcuts, stride in the bottleneck's 3x3 conv, DenseNet concat
order and compression, depthwise-separable units.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dhm_keras.models import PaddedMaxPooling2D, blocks

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- NumPy reference


def np_conv(x, kernel, stride, pad):
    """Cross-correlation with `pad` zeros on EVERY side (PyTorch Conv2d), NHWC/HWIO."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride: i * stride + k, j * stride: j * stride + k, :]
            out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel)
    return out


def np_depthwise(x, kernel, stride, pad):
    """Depthwise conv (PyTorch groups=C), Keras kernel layout (k, k, C, 1)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride: i * stride + k, j * stride: j * stride + k, :]
            out[:, i, j, :] = np.einsum("bhwc,hwc->bc", patch, kernel[..., 0])
    return out


def np_maxpool(x, k, stride, pad):
    """PyTorch MaxPool2d: implicit -inf padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    return np.stack([
        np.stack([x[:, i * stride: i * stride + k, j * stride: j * stride + k].max(axis=(1, 2))
                  for j in range(out_w)], axis=1)
        for i in range(out_h)], axis=1)


def np_avgpool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def relu(x):
    return np.maximum(x, 0)


class Ref:
    """NumPy ops reading the weights of a built tiny model by layer name."""

    def __init__(self, model):
        self.model = model

    def kernel(self, name):
        return self.model.get_layer(name).kernel.numpy().astype(np.float64)

    def conv(self, x, name, stride=1):
        kernel = self.kernel(name)
        return np_conv(x, kernel, stride, kernel.shape[0] // 2)

    def bn(self, x, name):
        gamma, beta, mean, var = (w.numpy() for w in self.model.get_layer(name).weights)
        return gamma * (x - mean) / np.sqrt(var + 1e-5) + beta


def tiny(block, in_shape, *args, **kwargs):
    """Functional model around one block/stage/stem call; random BN parameters/statistics."""
    inputs = keras.Input(in_shape)
    model = keras.Model(inputs, block(inputs, *args, **kwargs))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([v.astype("float32") for v in (
                RNG.uniform(0.5, 1.5, c), RNG.normal(size=c),
                RNG.normal(size=c), RNG.uniform(0.5, 2.0, c))])
    return model


def run(model, x):
    return np.asarray(model(x.astype("float32"), training=False), np.float64)


def check(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- ImageNet stem


def test_padded_max_pool_never_picks_the_padding():
    """All-negative input: -inf padding (PyTorch) differs from zero padding and from
    Keras "same" (bottom/right only); ours matches PyTorch's semantics."""
    x = -RNG.uniform(1, 2, size=(2, 8, 8, 3))
    layer = PaddedMaxPooling2D(3, 2, 1)
    got = np.asarray(layer(x.astype("float32")))
    check(got, np_maxpool(x, 3, 2, 1))
    assert got.max() < 0  # a zero pad would have won every border window
    keras_same = tf.nn.max_pool2d(x.astype("float32"), 3, 2, "SAME").numpy()
    assert keras_same.shape == got.shape and np.abs(keras_same - got).max() > 0.1
    assert layer.compute_output_shape((None, 112, 112, 64)) == (None, 56, 56, 64)
    clone = PaddedMaxPooling2D.from_config(layer.get_config())
    assert (clone.pool_size, clone.strides, clone.padding) == (3, 2, 1)
    with pytest.raises(ValueError, match="padding"):
        PaddedMaxPooling2D(3, 2, 2)


def test_imagenet_stem_matches_numpy():
    """conv7x7/2 pad 3 - BN - ReLU - maxpool3x3/2 pad 1 (torchvision), even input size."""
    model = tiny(blocks.STEMS["imagenet"], (20, 20, 3), 8, name="stem")
    ref = Ref(model)
    x = RNG.normal(size=(2, 20, 20, 3))
    y = relu(ref.bn(ref.conv(x, "stem_conv", 2), "stem_bn"))
    want = np_maxpool(y, 3, 2, 1)
    got = run(model, x)
    assert got.shape == (2, 5, 5, 8)
    check(got, want)
    # Keras "same" for the strided 7x7 conv would shift the grid: the check has teeth.
    same = tf.nn.conv2d(x.astype("float32"), model.get_layer("stem_conv").kernel, 2, "SAME")
    assert np.abs(same.numpy() - ref.conv(x, "stem_conv", 2)).max() > 1e-2


# ----------------------------------------------------------------------------- residual blocks


def test_torchvision_basic_block_with_projection():
    model = tiny(blocks.basic_block, (8, 8, 4), 6, 2, name="blk")
    ref = Ref(model)
    x = RNG.normal(size=(2, 8, 8, 4))
    y = relu(ref.bn(ref.conv(x, "blk_conv1", 2), "blk_bn1"))
    y = ref.bn(ref.conv(y, "blk_conv2"), "blk_bn2")
    shortcut = ref.bn(np_conv(x, ref.kernel("blk_shortcut_conv"), 2, 0), "blk_shortcut_bn")
    check(run(model, x), relu(y + shortcut))


def test_torchvision_basic_block_identity():
    model = tiny(blocks.basic_block, (6, 6, 4), 4, 1, name="blk")
    ref = Ref(model)
    x = RNG.normal(size=(2, 6, 6, 4))
    y = relu(ref.bn(ref.conv(x, "blk_conv1"), "blk_bn1"))
    y = ref.bn(ref.conv(y, "blk_conv2"), "blk_bn2")
    check(run(model, x), relu(y + x))
    assert "blk_shortcut_conv" not in {l.name for l in model.layers}


def test_bottleneck_strides_in_the_3x3_conv():
    """ResNet v1.5 (torchvision): 1x1 (stride 1) - 3x3 (stride 2) - 1x1 (4x planes)."""
    model = tiny(blocks.bottleneck_block, (8, 8, 6), 3, 2, name="blk")
    ref = Ref(model)
    assert model.get_layer("blk_conv1").strides == (1, 1)
    assert model.get_layer("blk_conv2").strides == (2, 2)
    x = RNG.normal(size=(2, 8, 8, 6))
    y = relu(ref.bn(np_conv(x, ref.kernel("blk_conv1"), 1, 0), "blk_bn1"))
    y = relu(ref.bn(ref.conv(y, "blk_conv2", 2), "blk_bn2"))
    y = ref.bn(np_conv(y, ref.kernel("blk_conv3"), 1, 0), "blk_bn3")
    shortcut = ref.bn(np_conv(x, ref.kernel("blk_shortcut_conv"), 2, 0), "blk_shortcut_bn")
    got = run(model, x)
    assert got.shape == (2, 4, 4, 12)
    check(got, relu(y + shortcut))


def test_wrn_block_shortcut_takes_the_preactivated_input():
    """Shape change: out = conv1x1(relu(bn1(x))) + conv2(relu(bn2(conv1(relu(bn1(x))))))."""
    model = tiny(blocks.preact_block, (8, 8, 4), 6, 2, name="blk")
    ref = Ref(model)
    x = RNG.normal(size=(2, 8, 8, 4))
    a = relu(ref.bn(x, "blk_bn1"))
    y = relu(ref.bn(ref.conv(a, "blk_conv1", 2), "blk_bn2"))
    y = ref.conv(y, "blk_conv2")
    want = np_conv(a, ref.kernel("blk_shortcut_conv"), 2, 0) + y
    check(run(model, x), want)
    # Taking the raw input instead (a common port error) gives other numbers.
    raw = np_conv(x, ref.kernel("blk_shortcut_conv"), 2, 0) + y
    assert np.abs(raw - want).max() > 1e-2


def test_wrn_block_identity_adds_the_raw_input_and_no_relu_after():
    model = tiny(blocks.preact_block, (6, 6, 4), 4, 1, name="blk")
    ref = Ref(model)
    x = RNG.normal(size=(2, 6, 6, 4))
    y = relu(ref.bn(ref.conv(relu(ref.bn(x, "blk_bn1")), "blk_conv1"), "blk_bn2"))
    got = run(model, x)
    check(got, x + ref.conv(y, "blk_conv2"))
    assert got.min() < 0  # pre-activation blocks end with the addition


# ----------------------------------------------------------------------------- DenseNet


@pytest.mark.parametrize("bottleneck, compression", [(False, 1.0), (True, 0.5)])
def test_dense_stage_with_transition_matches_numpy(bottleneck, compression):
    """Two dense layers (growth 3), input channels first in every concat, then the
    transition BN-ReLU-conv1x1(floor(c * compression))-avgpool2."""
    growth, in_c = 3, 5
    model = tiny(blocks.dense_stage, (6, 6, in_c), growth, 2, 2, name="s",
                 bottleneck=bottleneck, compression=compression)
    ref = Ref(model)
    x = RNG.normal(size=(2, 6, 6, in_c))
    h = x
    for i in range(2):
        p = f"s_block{i}"
        y = relu(ref.bn(h, f"{p}_bn1"))
        if bottleneck:
            y = relu(ref.bn(np_conv(y, ref.kernel(f"{p}_conv1"), 1, 0), f"{p}_bn2"))
            assert ref.kernel(f"{p}_conv1").shape[-1] == 4 * growth
            y = ref.conv(y, f"{p}_conv2")
        else:
            y = ref.conv(y, f"{p}_conv1")
        h = np.concatenate([h, y], axis=-1)
    assert h.shape[-1] == in_c + 2 * growth == 11
    t = relu(ref.bn(h, "s_transition_bn"))
    t = np_conv(t, ref.kernel("s_transition_conv"), 1, 0)
    assert t.shape[-1] == int(np.floor(11 * compression))  # 11 or 5
    check(run(model, x), np_avgpool2(t))


def test_dense_stage_without_stride_has_no_transition():
    model = tiny(blocks.dense_stage, (4, 4, 2), 3, 2, 1, name="s")
    assert not [l.name for l in model.layers if "transition" in l.name]
    assert tuple(model.output.shape[1:]) == (4, 4, 8)
    with pytest.raises(ValueError, match="compression"):
        tiny(blocks.dense_stage, (4, 4, 2), 3, 1, 2, name="t", compression=0.0)


# ----------------------------------------------------------------------------- MobileNet


def test_separable_unit_matches_numpy():
    model = tiny(blocks.separable_unit, (8, 6, 4), 5, 2, name="u")
    ref = Ref(model)
    x = RNG.normal(size=(2, 8, 6, 4))
    y = np_depthwise(x, ref.kernel("u_dw"), 2, 1)
    y = relu(ref.bn(y, "u_dw_bn"))
    y = relu(ref.bn(np_conv(y, ref.kernel("u_pw"), 1, 0), "u_pw_bn"))
    got = run(model, x)
    assert got.shape == (2, 4, 3, 5)
    check(got, y)
    assert model.get_layer("u_dw").kernel.shape == (3, 3, 4, 1)


def test_mobilenet_stem_is_conv3x3_stride2_bn_relu():
    model = tiny(blocks.STEMS["mobilenet"], (8, 6, 3), 4, name="stem")
    ref = Ref(model)
    x = RNG.normal(size=(2, 8, 6, 3))
    check(run(model, x), relu(ref.bn(ref.conv(x, "stem_conv", 2), "stem_bn")))


def test_depthwise_init_is_he_normal_over_pytorch_fan_out():
    """PyTorch's depthwise weight is (C, 1, 3, 3): fan-out 9*C, std sqrt(2 / (9*C))."""
    inputs = keras.Input((4, 4, 2048))
    model = keras.Model(inputs, blocks.L.depthwise_conv2d(inputs, 3, 1, name="dw"))
    kernel = model.get_layer("dw").kernel.numpy()
    assert abs(kernel.std() / np.sqrt(2 / (9 * 2048)) - 1) < 0.05


def test_stem_with_padded_max_pool_saves_and_reloads(tmp_path):
    """The custom pooling layer is registered: a .keras file reloads without custom code."""
    model = tiny(blocks.STEMS["imagenet"], (12, 12, 3), 4, name="stem")
    x = -np.abs(RNG.normal(size=(1, 12, 12, 3))).astype("float32")
    model.save(tmp_path / "stem.keras")
    loaded = keras.models.load_model(tmp_path / "stem.keras")
    assert isinstance(loaded.get_layer("stem_pool"), PaddedMaxPooling2D)
    np.testing.assert_allclose(run(loaded, x), run(model, x), atol=1e-6)
