"""Every backbone of docs/architectures.md beyond the CIFAR ResNets: WRN, DenseNet, ImageNet
ResNet (with the optional B3) and MobileNet for re-identification.

Each model is built ONCE, at its real input size and with the reference number of classes,
by a module-scoped parametrized fixture: pytest runs all tests of one model together and
drops it before building the next, so only one big model is alive at a time. The training
step runs on a weight-sharing view of the same layers at a small spatial size where the
architecture allows it (parameter counts do not depend on spatial size).

Reference counts are those of docs/models.md (100 classes CIFAR, 1000 ImageNet);
B3 and MobileNet have no reference count and are derived by hand below, in plain Python
written independently of the builder.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from typing import Optional

import keras
import numpy as np
import pytest

from dhm_keras import models
from dhm_keras.model import DHMModel
from official.modeling import optimization

BRANCH_LAYER = re.compile(r"^(b[1-9][0-9]*)_")


# ----------------------------------------------------------------------------- hand counts
# Trainable parameters of the pieces, PyTorch style: bias-free convs, BN gamma + beta,
# Linear weight + bias. Used for the counts the reference table does not list.


def conv(k, cin, cout):
    return k * k * cin * cout


def bn(c):
    return 2 * c


def dense(cin, cout):
    return cin * cout + cout


def basic(cin, planes, stride=1):
    """torchvision BasicBlock (+ conv1x1/BN projection when the shape changes)."""
    n = conv(3, cin, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
    if stride != 1 or cin != planes:
        n += conv(1, cin, planes) + bn(planes)
    return n


def separable(cin, cout):
    """Depthwise 3x3 (9 weights per channel) - BN - pointwise 1x1 - BN."""
    return 9 * cin + bn(cin) + conv(1, cin, cout) + bn(cout)


def resnet18_heads(classes=1000):
    stem = conv(7, 3, 64) + bn(64)
    stage1 = basic(64, 64) + basic(64, 64)
    stage2 = basic(64, 128, 2) + basic(128, 128)
    stage3 = basic(128, 256, 2) + basic(256, 256)
    stage4 = basic(256, 512, 2) + basic(512, 512)
    return {
        "b0": stem + stage1 + stage2 + stage3 + stage4 + dense(512, classes),
        "b1": basic(256, 1024, 2) + basic(1024, 1024) + dense(1024, classes),
        "b2": basic(128, 256, 2) + basic(256, 512, 2) + basic(512, 512) + dense(512, classes),
        # B3 (our reconstruction): after conv2_x, one block each of conv3_x'..conv5_x'.
        "b3": basic(64, 128, 2) + basic(128, 256, 2) + basic(256, 512, 2) + dense(512, classes),
    }


def mobilenet_reid_heads(classes):
    common = (
        conv(3, 3, 32) + bn(32)  # conv3x3/2 32
        + separable(32, 64) + separable(64, 128) + separable(128, 128)
        + separable(128, 256) + separable(256, 256)
    )
    return {
        "b0": common + separable(256, 512) + 5 * separable(512, 512)
        + separable(512, 1024) + separable(1024, 1024) + dense(1024, classes),
        "b1": separable(512, 2048) + separable(2048, 2048) + dense(2048, classes),
        "b2": separable(256, 512) + separable(512, 1024) + separable(1024, 1024)
        + dense(1024, classes),
    }


REID_IDENTITIES = 751  # Market-1501 training identities


def with_total(counts):
    return {**counts, "total": sum(counts.values())}


def test_hand_arithmetic_reproduces_the_reference_and_known_counts():
    """The hand formulas above agree with numbers they were not fitted to: the reference
    table for ResNet-18's B0/B1/B2, and MobileNet v1's well-known 4,231,976 trainable
    parameters (1000 classes) for our B0."""
    r18 = resnet18_heads()
    assert (r18["b0"], r18["b1"], r18["b2"]) == (11_689_512, 31_968_232, 9_825_768)
    assert r18["b3"] == 5_335_272
    assert mobilenet_reid_heads(1000)["b0"] == 4_231_976
    assert mobilenet_reid_heads(REID_IDENTITIES) == {
        "b0": 3_976_751, "b1": 6_818_031, "b2": 2_498_543
    }


# ----------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    classes: int
    input_shape: tuple  # the real input size (the spec's default)
    counts: dict  # trainable parameters per head + total
    forks: dict  # branch -> (backbone layer whose output it forks from, its shape)
    final: dict  # head -> shape of the feature map entering its global pooling
    train_shape: Optional[tuple] = None  # smaller input for the training step


CIFAR = (32, 32, 3)
SMALL_CIFAR = (16, 16, 3)  # still 2x2 after the two down-samplings: enough for BN at batch 2
IMAGENET = (224, 224, 3)
SMALL_IMAGENET = (64, 64, 3)


def _ref(b0, b1, b2, total):
    counts = {"b0": b0, "b1": b1, "b2": b2, "total": total}
    assert sum(v for k, v in counts.items() if k != "total") == total
    return counts


def _imagenet(counts, b2_fork, b1_fork, width, b1_width, b2_width=None):
    return Case(
        1000, IMAGENET, counts,
        forks={"b2": b2_fork, "b1": b1_fork},
        final={"b0": (7, 7, width), "b1": (7, 7, b1_width), "b2": (7, 7, b2_width or width)},
        train_shape=SMALL_IMAGENET,
    )


CASES = {
    # Table 3 (WRN): B2 after conv2_x, B1 after conv3_x.
    "wrn_16_8": Case(
        100, CIFAR, _ref(11_007_540, 31_044_196, 5_822_820, 47_874_556),
        forks={"b2": ("stage1_block1_out", (32, 32, 128)),
               "b1": ("stage2_block1_out", (16, 16, 256))},
        final={"b0": (8, 8, 512), "b1": (8, 8, 1024), "b2": (8, 8, 512)},
        train_shape=SMALL_CIFAR,
    ),
    "wrn_28_10": Case(
        100, CIFAR, _ref(36_536_884, 107_464_420, 20_145_060, 164_146_364),
        forks={"b2": ("stage1_block3_out", (32, 32, 160)),
               "b1": ("stage2_block3_out", (16, 16, 320))},
        final={"b0": (8, 8, 640), "b1": (8, 8, 1280), "b2": (8, 8, 640)},
        train_shape=SMALL_CIFAR,
    ),
    # Table 2 (DenseNet): B2 after transition 1, B1 after transition 2 (growth 3k).
    "densenet_40_12": Case(
        100, CIFAR, _ref(1_060_132, 2_038_996, 650_236, 3_749_364),
        forks={"b2": ("stage1_transition_pool", (16, 16, 160)),
               "b1": ("stage2_transition_pool", (8, 8, 304))},
        final={"b0": (8, 8, 448), "b1": (8, 8, 304 + 12 * 36), "b2": (8, 8, 304 + 6 * 12)},
        train_shape=SMALL_CIFAR,
    ),
    "densenet_100_12": Case(
        100, CIFAR, _ref(7_084_852, 14_197_316, 2_494_436, 23_776_604),
        forks={"b2": ("stage1_transition_pool", (16, 16, 400)),
               "b1": ("stage2_transition_pool", (8, 8, 784))},
        final={"b0": (8, 8, 1168), "b1": (8, 8, 784 + 32 * 36),
               "b2": (8, 8, 400 + 16 * 12 + 16 * 12)},
        train_shape=SMALL_CIFAR,
    ),
    "densenet_bc_100_12": Case(
        100, CIFAR, _ref(800_032, 4_942_888, 599_944, 6_342_864),
        forks={"b2": ("stage1_transition_pool", (16, 16, 108)),
               "b1": ("stage2_transition_pool", (8, 8, 150))},
        final={"b0": (8, 8, 342), "b1": (8, 8, 150 + 32 * 36), "b2": (8, 8, 342)},
        train_shape=SMALL_CIFAR,
    ),
    # Table 4 (ImageNet ResNet): B2 after conv3_x, B1 after conv4_x with 1024 planes.
    "resnet18": _imagenet(
        _ref(11_689_512, 31_968_232, 9_825_768, 53_483_512),
        ("stage2_block1_out", (28, 28, 128)), ("stage3_block1_out", (14, 14, 256)), 512, 1024,
    ),
    "resnet34": _imagenet(
        _ref(21_797_672, 50_846_696, 12_187_112, 84_831_480),
        ("stage2_block3_out", (28, 28, 128)), ("stage3_block5_out", (14, 14, 256)), 512, 1024,
    ),
    "resnet50": _imagenet(
        _ref(25_557_032, 58_668_008, 16_297_960, 100_523_000),
        ("stage2_block3_out", (28, 28, 512)), ("stage3_block5_out", (14, 14, 1024)),
        2048, 4096,
    ),
    "resnet101": _imagenet(
        _ref(44_549_160, 58_668_008, 26_352_616, 129_569_784),
        ("stage2_block3_out", (28, 28, 512)), ("stage3_block22_out", (14, 14, 1024)),
        2048, 4096,
    ),
    "resnet152": _imagenet(
        _ref(60_192_808, 58_668_008, 33_055_720, 151_916_536),
        ("stage2_block7_out", (28, 28, 512)), ("stage3_block35_out", (14, 14, 1024)),
        2048, 4096,
    ),
    # ResNet-18 with the optional B3 (after conv2_x): hand-derived B3 count.
    "resnet18_b3": Case(
        1000, IMAGENET, with_total(resnet18_heads()),
        forks={"b3": ("stage1_block1_out", (56, 56, 64)),
               "b2": ("stage2_block1_out", (28, 28, 128)),
               "b1": ("stage3_block1_out", (14, 14, 256))},
        final={"b0": (7, 7, 512), "b1": (7, 7, 1024), "b2": (7, 7, 512), "b3": (7, 7, 512)},
        train_shape=SMALL_IMAGENET,
    ),
    # Table 5 (MobileNet re-ID, 256x128): B2 at the common stem's output, B1 after B0's
    # 512-channel stage; every head down-samples three more times.
    "mobilenet_reid": Case(
        REID_IDENTITIES, (256, 128, 3), with_total(mobilenet_reid_heads(REID_IDENTITIES)),
        forks={"b2": ("stage3_block1_pw_relu", (32, 16, 256)),
               "b1": ("stage4_block5_pw_relu", (16, 8, 512))},
        final={"b0": (4, 2, 1024), "b1": (4, 2, 2048), "b2": (4, 2, 1024)},
        train_shape=(128, 64, 3),
    ),
}


def test_registry_lists_every_architecture():
    assert models.available_models() == sorted(
        ["resnet32", "resnet110", "resnet1202", *CASES]
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    """(name, case, model): one dhm build per architecture at its real input size."""
    name = request.param
    model = models.build(name, CASES[name].classes, mode="dhm")
    yield name, CASES[name], model
    del model
    gc.collect()


def count_params(model):
    """Trainable parameters per head by layer-name prefix ("bK_" -> bK, else b0)."""
    counts = {}
    for layer in model.layers:
        match = BRANCH_LAYER.match(layer.name)
        head = match.group(1) if match else "b0"
        counts[head] = counts.get(head, 0) + sum(
            int(np.prod(w.shape)) for w in layer.trainable_weights
        )
    counts["total"] = sum(counts.values())
    return counts


def producer(tensor):
    """The layer that produced a symbolic tensor of the functional graph."""
    return tensor._keras_history.operation


def inbound(tensor):
    """(layer, its input tensors) for the node that produced `tensor` in THIS graph."""
    op, node_index, _ = tensor._keras_history
    return op, op._inbound_nodes[node_index].input_tensors


def walk(tensor):
    """Names of the layers on every path from the model input to `tensor`, and for each
    the names of the layers feeding it."""
    feeds, stack = {}, [tensor]
    while stack:
        op, inputs = inbound(stack.pop())
        if op.name in feeds:
            continue
        feeds[op.name] = {producer(t).name for t in inputs}
        stack.extend(inputs)
    return feeds


# ----------------------------------------------------------------------------- tests
# Definition order matters only for the last test, which trains the shared model.


def test_parameter_counts_per_head(built):
    name, case, model = built
    assert count_params(model) == case.counts, name
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == case.counts["total"]


def test_builds_at_real_input_size_with_float32_logits(built):
    name, case, model = built
    assert model.name == f"{name}_dhm"
    assert model.input.name == "images" and tuple(model.input.shape) == (None, *case.input_shape)
    heads = sorted(case.final)
    assert models.head_names(model) == heads
    for head in heads:
        assert tuple(model.output[head].shape) == (None, case.classes)
        assert model.output[head].dtype == "float32"
        assert producer(model.output[head]) is model.get_layer(f"{head}_classifier")


def test_branches_fork_where_the_table_says_and_downsample_alike(built):
    """Each branch is fed by exactly one backbone layer, the one of the table; every head
    ends at the same spatial size (equal number of down-samplings from any fork)."""
    name, case, model = built
    paths = {h: walk(t) for h, t in model.output.items()}
    backbone = set(paths["b0"])
    assert not [n for n in backbone if BRANCH_LAYER.match(n)]
    for head, (fork_layer, fork_shape) in case.forks.items():
        own = set(paths[head]) - backbone
        assert own and all(n.startswith(f"{head}_") for n in own), sorted(own)[:5]
        feeders = {f for n in own for f in paths[head][n]} - own
        assert feeders == {fork_layer}, (head, feeders)
        assert tuple(model.get_layer(fork_layer).output.shape[1:]) == fork_shape
    assert set().union(*map(set, paths.values())) == {l.name for l in model.layers}
    for head, shape in case.final.items():
        assert tuple(model.get_layer(f"{head}_gap").input.shape[1:]) == shape, head


def test_reference_numerics(built):
    """BN eps/momentum, bias-free He-normal(fan-out) convs, PyTorch Linear init, symmetric
    padding for every strided conv, -inf-padded max pool for the ImageNet stem."""
    name, case, model = built
    layers = model.layers
    bns = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.epsilon == 1e-5 and l.momentum == 0.9 for l in bns)
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]  # incl. depthwise
    for layer in convs:
        assert not layer.use_bias, layer.name
        k = layer.kernel_size[0]
        if layer.strides == (2, 2) and k > 1:
            assert layer.padding == "valid", layer.name
            pad = model.get_layer(f"{layer.name}_pad")
            assert isinstance(pad, keras.layers.ZeroPadding2D)
            assert pad.padding == ((k // 2, k // 2), (k // 2, k // 2))
            assert producer(layer.input) is pad
        elif k > 1:
            assert layer.padding == "same", layer.name  # symmetric for odd k, stride 1
        else:
            assert layer.padding == "valid", layer.name
    # He normal over fan-out (untruncated) on the biggest kernel of each kind.
    plain = [l for l in convs if not isinstance(l, keras.layers.DepthwiseConv2D)]
    big = max(plain, key=lambda l: int(np.prod(l.kernel.shape)))
    kernel = big.kernel.numpy()
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
    assert abs(kernel.std() / np.sqrt(2 / fan_out) - 1) < 0.03, big.name
    assert np.abs(kernel).max() > 4 * kernel.std()  # untruncated: tails beyond 2 sigma
    depthwise = [l for l in convs if isinstance(l, keras.layers.DepthwiseConv2D)]
    if depthwise:  # PyTorch's Conv2d(c, c, 3, groups=c): fan-out 9 * c
        dw = max(depthwise, key=lambda l: int(l.kernel.shape[2]))
        kernel = dw.kernel.numpy()
        assert abs(kernel.std() / np.sqrt(2 / (9 * kernel.shape[2])) - 1) < 0.05, dw.name
    dense_layers = [l for l in layers if isinstance(l, keras.layers.Dense)]
    assert sorted(l.name for l in dense_layers) == [f"{h}_classifier" for h in sorted(case.final)]
    for layer in dense_layers:
        bound = 1 / np.sqrt(layer.kernel.shape[0])
        for w in (layer.kernel.numpy(), layer.bias.numpy()):
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
        assert layer.dtype_policy.name == "float32"
    pools = [l for l in layers if isinstance(l, models.PaddedMaxPooling2D)]
    if name.startswith("resnet"):
        assert [(l.name, l.pool_size, l.strides, l.padding) for l in pools] == [
            ("stem_pool", 3, 2, 1)
        ]
        assert tuple(model.get_layer("stem_pool").output.shape[1:]) == (56, 56, 64)
    assert not [l for l in layers if isinstance(l, keras.layers.MaxPooling2D)]


def test_one_dhm_training_step_moves_every_head(built):
    """One L2SGD step on a batch of 2 through DHMModel (all heads + mimicking).

    Runs eagerly: tracing the training graph of the deepest models costs minutes on CPU
    (ResNet-152: ~150 s) against seconds for one eager step. ImageNet/MobileNet models
    train through a view of the SAME layers at a smaller input (clone_model with the
    identity clone function shares every weight), so the real model's weights move.
    """
    name, case, model = built
    network = model
    if case.train_shape:
        network = keras.models.clone_model(
            model, input_tensors=keras.Input(case.train_shape, name="images"),
            clone_function=lambda layer: layer,
        )
        assert network.get_layer("b0_classifier") is model.get_layer("b0_classifier")
    watched = {"stem_conv": model.get_layer("stem_conv").kernel}
    for head in case.final:
        watched[f"{head}_classifier"] = model.get_layer(f"{head}_classifier").kernel
        if head != "b0":  # the first convolution of the branch
            first = next(l for l in model.layers
                         if l.name.startswith(f"{head}_") and isinstance(l, keras.layers.Conv2D))
            watched[first.name] = first.kernel
    before = {k: v.numpy().copy() for k, v in watched.items()}

    dhm = DHMModel(network, mode="dhm")
    dhm.compile(optimizer=optimization.L2SGD(0.01), run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, *(case.train_shape or case.input_shape))).astype("float32")
    labels = rng.integers(0, case.classes, size=2).astype("int32")
    logs = dhm.train_on_batch(images, labels, return_dict=True)

    assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    heads = sorted(case.final)
    for head in heads:
        assert np.isfinite(logs[f"ce/{head}"])
    assert len([k for k in logs if k.startswith("mimic/")]) == len(heads) * (len(heads) - 1)
    for key, value in watched.items():
        moved = np.max(np.abs(value.numpy() - before[key]))
        assert np.isfinite(moved) and moved > 0, key


# ----------------------------------------------------------------------------- overrides


def test_override_keys_of_the_new_families():
    """Block options double as override keys; no build needed to see them applied."""
    wrn = models.with_overrides(models.get_spec("wrn_28_10"), dropout=0.3)
    assert wrn.options == {"dropout": 0.3} and models.get_spec("wrn_28_10").options == {
        "dropout": 0.0
    }
    assert models.get_spec("densenet_bc_100_12").options == {
        "bottleneck": True, "compression": 0.5
    }
    assert models.get_spec("densenet_40_12").options == {"bottleneck": False, "compression": 1.0}
    r18 = models.get_spec("resnet18")
    assert [b.name for b in r18.branches] == ["b1", "b2"]
    assert [b.name for b in r18.optional_branches] == ["b3"]
    chosen = models.with_overrides(r18, branches=("b1", "b2", "b3"))
    assert [b.name for b in chosen.branches] == ["b1", "b2", "b3"]
    assert chosen.branches == models.get_spec("resnet18_b3").branches
    assert [b.name for b in models.with_overrides(r18, branches="b3").branches] == ["b3"]
    for name in ("resnet34", "resnet50", "wrn_16_8", "mobilenet_reid"):
        with pytest.raises(ValueError, match="unknown branches"):
            models.with_overrides(models.get_spec(name), branches=("b3",))
    with pytest.raises(ValueError, match=r"'dropout'.*valid keys"):
        models.build("densenet_40_12", 10, dropout=0.3)


def test_optional_b3_is_selected_by_the_branches_override():
    """build("resnet18", ..., branches=(b1, b2, b3)) builds heads b0..b3 (one block per
    stage, 32x32 input; the full models are covered by "resnet18" and "resnet18_b3")."""
    model = models.build(
        "resnet18", 10, branches=("b1", "b2", "b3"), blocks_per_stage=1,
        input_shape=(32, 32, 3),
    )
    assert models.head_names(model) == ["b0", "b1", "b2", "b3"]
    assert producer(model.get_layer("b3_stage2_block0_conv1_pad").input).name == (
        "stage1_block0_out"
    )
    out = model(np.zeros((1, 32, 32, 3), "float32"))
    assert {h: tuple(v.shape) for h, v in out.items()} == {h: (1, 10) for h in out}


def test_mobilenet_baseline_is_the_bare_backbone():
    model = models.build("mobilenet_reid", REID_IDENTITIES, mode="baseline")
    assert models.head_names(model) == ["b0"]
    assert not [l.name for l in model.layers if BRANCH_LAYER.match(l.name)]
    assert count_params(model) == {"b0": CASES["mobilenet_reid"].counts["b0"],
                                   "total": CASES["mobilenet_reid"].counts["b0"]}
