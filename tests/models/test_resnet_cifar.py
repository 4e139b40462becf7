"""CIFAR ResNets of Table 1 (resnet32/110/1202): structure, counts, numerics, I/O.

Reference numbers come from docs/models.md (the authors' PyTorch implementation); the
numerical checks compare against NumPy / tf.nn computations written here, independently
of the Keras layers under test.
"""

import contextlib
import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from dhm_keras import models
from dhm_keras.models import ChannelZeroPad, build, head_names

NUM_CLASSES = 100

# Trainable parameters per head with 100 classes (docs/models.md, reference counts).
EXPECTED = {
    "resnet32": {"b0": 470_004, "b1": 1_379_428, "b2": 298_212, "total": 2_147_644},
    "resnet110": {"b0": 1_733_812, "b1": 5_219_940, "b2": 816_356, "total": 7_770_108},
    "resnet1202": {
        "b0": 19_427_124,
        "b1": 58_987_108,
        "b2": 9_237_860,
        "total": 87_652_092,
    },
}
BRANCH_LAYER = re.compile(r"^(b[1-9][0-9]*)_")


@functools.lru_cache(maxsize=None)
def cached(name, mode="dhm"):
    """Each model is built once per test session (resnet1202 takes tens of seconds)."""
    return build(name, NUM_CLASSES, mode=mode)


def count_params(model):
    """Trainable parameters per head, by layer-name prefix ("bK_" -> bK, else b0)."""
    counts = {}
    for layer in model.layers:
        match = BRANCH_LAYER.match(layer.name)
        head = match.group(1) if match else "b0"
        n = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
        counts[head] = counts.get(head, 0) + n
    counts["total"] = sum(counts.values())
    return counts


def submodel(model, first_layer, last_layer):
    """Functional slice from the input of `first_layer` to the output of `last_layer`."""
    return keras.Model(model.get_layer(first_layer).input, model.get_layer(last_layer).output)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts_per_head_match_reference(name):
    model = cached(name)
    assert count_params(model) == EXPECTED[name]
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == EXPECTED[name]["total"]


@pytest.mark.parametrize("name", ["resnet32", "resnet110"])
def test_baseline_is_the_bare_backbone(name):
    model = cached(name, "baseline")
    assert head_names(model) == ["b0"]
    assert not [layer.name for layer in model.layers if BRANCH_LAYER.match(layer.name)]
    assert not [w.path for w in model.weights if re.search(r"(^|/)b[1-9][0-9]*_", w.path)]
    assert count_params(model) == {"b0": EXPECTED[name]["b0"], "total": EXPECTED[name]["b0"]}


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "mode, heads",
    [("baseline", ["b0"]), ("dsl", ["b0", "b1", "b2"]), ("dhm", ["b0", "b1", "b2"])],
)
def test_outputs_are_a_dict_of_float32_logits(mode, heads):
    model = cached("resnet32", mode)
    assert model.name == f"resnet32_{mode}"
    assert model.input.name == "images" and tuple(model.input.shape) == (None, 32, 32, 3)
    out = model(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32"))
    assert isinstance(out, dict) and sorted(out) == heads == head_names(model)
    for head in heads:
        assert tuple(out[head].shape) == (2, NUM_CLASSES)
        assert out[head].dtype == "float32"
        # Logits, not probabilities: rows do not sum to one.
        assert not np.allclose(np.sum(np.asarray(out[head]), axis=-1), 1.0)


def test_dsl_and_dhm_build_the_same_network():
    dsl, dhm = cached("resnet32", "dsl"), cached("resnet32", "dhm")
    assert [l.name for l in dsl.layers] == [l.name for l in dhm.layers]
    assert [w.shape for w in dsl.weights] == [w.shape for w in dhm.weights]


def test_input_shape_can_be_overridden():
    model = build("resnet32", 10, mode="baseline", input_shape=(16, 16, 3))
    assert tuple(model.input.shape) == (None, 16, 16, 3)
    assert tuple(model(np.zeros((1, 16, 16, 3), "float32"))["b0"].shape) == (1, 10)


# ----------------------------------------------------------------------------- naming


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_branch_layers_carry_their_branch_prefix(name):
    """Walk the graph: layers only reachable from bK's logits are named bK_*, and the
    layers feeding b0 (backbone + B0 head) never carry a branch prefix."""
    model = cached(name)
    outputs = model.output
    paths = {h: {l.name for l in keras.Model(model.input, outputs[h]).layers} for h in outputs}
    for layer_name in paths["b0"]:
        assert not BRANCH_LAYER.match(layer_name), layer_name
    for head in ("b1", "b2"):
        own = paths[head] - paths["b0"]
        assert own and all(n.startswith(f"{head}_") for n in own), sorted(own)[:5]
        # Nothing named for this branch sits on the backbone path.
        assert {n for n in paths[head] if n.startswith(f"{head}_")} == own
        classifier = model.get_layer(f"{head}_classifier")
        assert isinstance(classifier, keras.layers.Dense)
        assert outputs[head]._keras_history.operation is classifier
    assert outputs["b0"]._keras_history.operation is model.get_layer("b0_classifier")
    assert set().union(*paths.values()) == {l.name for l in model.layers}


def test_branch_topology_matches_table_1():
    """B2 forks after conv2_x (16ch, 32x32); B1 after conv3_x (32ch, 16x16) at 128ch."""
    model = cached("resnet32")
    b2_in = model.get_layer("b2_stage2_block0_conv1_pad").input
    b1_in = model.get_layer("b1_stage3_block0_conv1_pad").input
    assert b2_in is model.get_layer("stage1_block4_out").output
    assert b1_in is model.get_layer("stage2_block4_out").output
    assert tuple(b2_in.shape[1:]) == (32, 32, 16) and tuple(b1_in.shape[1:]) == (16, 16, 32)
    assert model.get_layer("b1_stage3_block4_out").output.shape[1:] == (8, 8, 128)
    assert model.get_layer("b2_stage3_block2_out").output.shape[1:] == (8, 8, 64)
    assert {l.name for l in models.branch_layers(model, "b1")} == {
        l.name for l in model.layers if l.name.startswith("b1_")
    }


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="resnet33") as info:
        build("resnet33", 10)
    for known in ("resnet32", "resnet110", "resnet1202"):
        assert known in str(info.value)
    assert {"resnet32", "resnet110", "resnet1202"} <= set(models.available_models())


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="baseline.*dsl.*dhm"):
        build("resnet32", 10, mode="kd")


def test_unknown_override_names_the_key_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"'dropout'.*blocks_per_stage.*branches"):
        build("resnet32", 10, dropout=0.3)
    with pytest.raises(ValueError, match="unknown branches"):
        build("resnet32", 10, branches=("b3",))


def test_overrides_replace_spec_fields_without_mutating_the_registry():
    model = build("resnet32", 10, blocks_per_stage=1, branch_blocks=1, branches=("b1",))
    assert head_names(model) == ["b0", "b1"]
    assert "stage1_block1_conv1" not in {l.name for l in model.layers}
    assert not [l for l in model.layers if l.name.startswith("b2_")]
    assert "b1_stage3_block0_conv1" in {l.name for l in model.layers}
    assert "b1_stage3_block1_conv1" not in {l.name for l in model.layers}
    assert models.get_spec("resnet32").stages[0].blocks == 5  # registry untouched


def test_specs_are_immutable_data_and_the_builder_takes_any_spec():
    spec = models.get_spec("resnet32")
    assert hash(spec) == hash(models.get_spec("resnet32"))
    with pytest.raises(Exception):
        spec.stages = ()
    assert [(b.name, b.fork, [(s.name, s.filters, s.blocks, s.stride) for s in b.stages])
            for b in spec.branches] == [
        ("b1", "stage2", [("stage3", 128, 5, 2)]),
        ("b2", "stage1", [("stage2", 32, 5, 2), ("stage3", 64, 3, 2)]),
    ]
    # A new architecture is data: a one-stage net with a branch forking at the stem.
    tiny = models.ArchSpec(
        name="tiny", block="cifar_basic", stem="cifar", stem_filters=8,
        stages=(models.Stage("stage1", 16, 1, 2),),
        branches=(models.Branch("b1", "stem", (models.Stage("stage1", 32, 1, 2),)),),
        input_shape=(8, 8, 3), block_options={"unused": 1},
    )
    assert models.with_overrides(tiny, unused=2).options == {"unused": 2}
    model = models.build_from_spec(tiny, 5)
    assert model.name == "tiny_dhm" and head_names(model) == ["b0", "b1"]
    out = model(np.zeros((1, 8, 8, 3), "float32"))
    assert {h: tuple(v.shape) for h, v in out.items()} == {"b0": (1, 5), "b1": (1, 5)}
    with pytest.raises(ValueError, match="unknown point"):
        models.ArchSpec(
            name="bad", block="cifar_basic", stem="cifar", stem_filters=8,
            stages=tiny.stages, branches=(models.Branch("b1", "stage9", tiny.stages),))


# ----------------------------------------------------------------------------- numerics


def numpy_conv_pytorch(x, kernel, stride, pad):
    """Cross-correlation with `pad` zeros on EVERY side (PyTorch Conv2d semantics)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel)
    return out


def numpy_zero_pad_shortcut(x, out_channels):
    """Reference shortcut: AvgPool2d(2, 2) then zeros appended after the channels."""
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return np.concatenate([pooled, np.zeros((b, h // 2, w // 2, out_channels - c))], -1)


def test_stride2_conv_pads_symmetrically_like_pytorch():
    model = cached("resnet32")
    conv = submodel(model, "stage2_block0_conv1_pad", "stage2_block0_conv1")
    kernel = model.get_layer("stage2_block0_conv1").kernel.numpy()
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 16)).astype("float32")
    got = np.asarray(conv(x))
    assert got.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(got, numpy_conv_pytorch(x, kernel, 2, 1), atol=1e-4)
    explicit = tf.nn.conv2d(x, kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(got, explicit.numpy(), atol=1e-4)
    # The check has teeth: TF/Keras "SAME" (pad bottom/right only) gives other numbers.
    same = tf.nn.conv2d(x, kernel, 2, "SAME").numpy()
    assert np.max(np.abs(got - same)) > 1e-2


@pytest.mark.parametrize(
    "block, in_shape, out_channels",
    [("stage2_block0", (32, 32, 16), 32), ("b1_stage3_block0", (16, 16, 32), 128)],
)
def test_zero_pad_shortcut_matches_numpy(block, in_shape, out_channels):
    model = cached("resnet32")
    shortcut = submodel(model, f"{block}_shortcut_pool", f"{block}_shortcut_pad")
    x = np.random.default_rng(2).normal(size=(2, *in_shape)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(shortcut(x)), numpy_zero_pad_shortcut(x, out_channels), atol=1e-6
    )
    assert not model.get_layer(f"{block}_shortcut_pad").weights


@contextlib.contextmanager
def random_batchnorm_statistics(model, seed):
    """Give every BN layer random gamma/beta/moving stats (so that inference depends on
    all of them), restoring the originals afterwards: the models are shared by tests."""
    rng = np.random.default_rng(seed)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.get_weights() for l in bns]
    try:
        for layer in bns:
            c = layer.gamma.shape[0]
            layer.set_weights([v.astype("float32") for v in (
                rng.uniform(0.5, 1.5, c), rng.normal(size=c),  # gamma, beta
                rng.normal(size=c), rng.uniform(0.5, 2.0, c),  # moving mean, variance
            )])
        yield
    finally:
        for layer, weights in zip(bns, saved):
            layer.set_weights(weights)


def numpy_batchnorm(y, layer):
    gamma, beta, mean, var = (w.numpy() for w in layer.weights)
    return gamma * (y - mean) / np.sqrt(var + 1e-5) + beta


def test_downsampling_block_matches_numpy_forward():
    """Whole block at inference: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    model = cached("resnet32")
    name = "stage3_block0"
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 32)).astype("float32")
    with random_batchnorm_statistics(model, seed=3):
        got = np.asarray(submodel(model, f"{name}_conv1_pad", f"{name}_out")(x, training=False))
        layer = model.get_layer
        y = numpy_conv_pytorch(x, layer(f"{name}_conv1").kernel.numpy(), 2, 1)
        y = np.maximum(numpy_batchnorm(y, layer(f"{name}_bn1")), 0)
        y = numpy_conv_pytorch(y, layer(f"{name}_conv2").kernel.numpy(), 1, 1)
        y = numpy_batchnorm(y, layer(f"{name}_bn2"))
        want = np.maximum(y + numpy_zero_pad_shortcut(x, 64), 0)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


def test_batchnorm_and_initialisation_follow_the_reference():
    model = cached("resnet32")
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert len(convs) == len(bns) == 1 + 2 * (15 + 5 + 8) and len(dense) == 3
    assert all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bns)
    assert all(not l.use_bias for l in convs)
    # He normal over fan-out: std sqrt(2 / (3*3*128)) for a 128-channel branch conv.
    kernel = model.get_layer("b1_stage3_block1_conv1").kernel.numpy()
    assert abs(kernel.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.03
    assert abs(kernel.mean()) < 1e-3 and np.abs(kernel).max() > 3.5 * kernel.std()  # untruncated
    for layer in dense:  # U(+-1/sqrt(fan_in)) for kernel and bias, like torch.nn.Linear
        bound = 1 / np.sqrt(layer.kernel.shape[0])
        for w in (layer.kernel.numpy(), layer.bias.numpy()):
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
        assert layer.dtype_policy.name == "float32"
    # Stride-1 convs keep "same" (symmetric for 3x3); stride-2 ones are padded explicitly.
    for layer in convs:
        if layer.strides == (2, 2):
            assert layer.padding == "valid"
            assert isinstance(model.get_layer(f"{layer.name}_pad"), keras.layers.ZeroPadding2D)


# ----------------------------------------------------------------------------- precision, I/O


def test_logits_are_float32_under_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build("resnet32", NUM_CLASSES, mode="dhm")
        out = model(np.zeros((2, 32, 32, 3), "float32"))
        assert model.get_layer("stage1_block0_conv1").compute_dtype == "bfloat16"
        for head in ("b0", "b1", "b2"):
            assert model.get_layer(f"{head}_classifier").compute_dtype == "float32"
            assert out[head].dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_save_and_load_roundtrip(tmp_path):
    model = cached("resnet32")
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype("float32")
    path = tmp_path / "x.keras"
    with random_batchnorm_statistics(model, seed=4):
        model.save(path)
        want = model(x, training=False)
    loaded = keras.models.load_model(path)
    got = loaded(x, training=False)
    assert loaded.name == model.name and sorted(got) == ["b0", "b1", "b2"]
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    for head in want:
        np.testing.assert_allclose(np.asarray(got[head]), np.asarray(want[head]), atol=1e-6)


def test_channel_zero_pad_layer():
    layer = ChannelZeroPad(3, name="pad")
    x = np.arange(8, dtype="float32").reshape(1, 2, 2, 2)
    y = np.asarray(layer(x))
    np.testing.assert_array_equal(y[..., :2], x)
    np.testing.assert_array_equal(y[..., 2:], 0)
    assert layer.compute_output_shape((None, 2, 2, 2)) == (None, 2, 2, 5)
    clone = ChannelZeroPad.from_config(layer.get_config())
    assert clone.extra_channels == 3 and clone.name == "pad"
