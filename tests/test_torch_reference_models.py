"""tests/torch_reference_models.py, the PyTorch yardstick for importing the authors'
checkpoints: parameter counts per head equal docs/models.md, state_dict keys carry the
reference's names in its order, forward returns three finite, distinct logits, and
randomize_ is seeded and non-degenerate."""

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is optional (the [torch] extra): the reference definitions need it"
)

import torch_reference_models as ref  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 shared, busy cores PyTorch's 2 OpenMP threads made these
    small forward passes 10-100x slower (measured 3.6 s vs 0.03 s for ResNet-110)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CIFAR = ("resnet32", "resnet110", "resnet1202", "wrn_16_8", "wrn_28_10",
         "densenet_40_12", "densenet_100_12", "densenet_bc_100_12")

# docs/models.md, columns "B0 (backbone)", "B1", "B2": 100 classes (CIFAR), 1000 (ImageNet).
EXPECTED_PARAMS = {
    "resnet32": (470_004, 1_379_428, 298_212),
    "resnet110": (1_733_812, 5_219_940, 816_356),
    "resnet1202": (19_427_124, 58_987_108, 9_237_860),
    "densenet_40_12": (1_060_132, 2_038_996, 650_236),
    "densenet_100_12": (7_084_852, 14_197_316, 2_494_436),
    "densenet_bc_100_12": (800_032, 4_942_888, 599_944),
    "wrn_16_8": (11_007_540, 31_044_196, 5_822_820),
    "wrn_28_10": (36_536_884, 107_464_420, 20_145_060),
    "resnet18": (11_689_512, 31_968_232, 9_825_768),
    "resnet34": (21_797_672, 50_846_696, 12_187_112),
    "resnet50": (25_557_032, 58_668_008, 16_297_960),
    "resnet101": (44_549_160, 58_668_008, 26_352_616),
    "resnet152": (60_192_808, 58_668_008, 33_055_720),
}

# Top-level modules holding state, in the reference's registration (= state_dict) order.
TOP_LEVEL = {
    "resnet": ("conv1", "bn1", "layer1", "layer2", "layer3", "fc", "layer2_head2",
               "layer3_head2", "fc_head2", "layer3_head1", "fc_head1"),
    "wrn": ("conv", "layer1", "layer2", "layer3", "bn", "fc", "layer2_head2", "layer3_head2",
            "bn_head2", "fc_head2", "layer3_head1", "bn_head1", "fc_head1"),
    "densenet": ("conv1", "layer1", "transition1", "layer2", "transition2", "layer3", "bn", "fc",
                 "layer2_head2", "transition2_head2", "layer3_head2", "bn_head2", "fc_head2",
                 "layer3_head1", "bn_head1", "fc_head1"),
    "imagenet": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc", "layer3_head2",
                 "layer4_head2", "fc_head2", "layer4_head1", "fc_head1"),
}


def classes(name):
    return 100 if name in CIFAR else 1000


def family(name):
    if name in ("resnet32", "resnet110", "resnet1202"):
        return "resnet"
    if name.startswith("wrn"):
        return "wrn"
    if name.startswith("densenet"):
        return "densenet"
    return "imagenet"


def build_on_meta(name, **kwargs):
    """The real constructor, with tensors on the meta device: shapes and names without
    allocating or initialising ~150M parameters (ResNet-152 / WRN-28-10 / ResNet-1202)."""
    with torch.device("meta"):
        return ref.build(name, classes(name), **kwargs)


def head_param_counts(model):
    counts = [0, 0, 0]
    for child, module in model.named_children():
        index = 1 if child.endswith("_head1") else 2 if child.endswith("_head2") else 0
        counts[index] += sum(p.numel() for p in module.parameters())
    return tuple(counts)


def images(n, size, seed=0):
    """Noise plus a per-image colour: i.i.d. noise alone averages out under global pooling."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen) + torch.randn(n, 3, 1, 1, generator=gen)


@pytest.mark.parametrize("name", ref.ARCHITECTURES)
def test_parameter_counts_per_head_match_docs(name):
    assert head_param_counts(build_on_meta(name)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ref.ARCHITECTURES)
def test_state_dict_top_level_names_and_order(name):
    tops = []
    for key in build_on_meta(name).state_dict():
        top = key.split(".", 1)[0]
        if top not in tops:
            tops.append(top)
    assert tuple(tops) == TOP_LEVEL[family(name)]


SHAPES = {
    "resnet32": {"layer1.0.conv1.weight": (16, 16, 3, 3), "layer3_head1.0.conv1.weight": (128, 32, 3, 3),
                 "layer3_head1.4.bn2.running_var": (128,), "fc_head1.weight": (100, 128),
                 "layer2_head2.0.bn1.num_batches_tracked": ()},
    "wrn_16_8": {"layer1.0.shortcut.weight": (128, 16, 1, 1), "layer1.0.bn1.weight": (16,),
                 "layer2_head2.0.shortcut.weight": (256, 128, 1, 1),
                 "layer3_head1.0.shortcut.weight": (1024, 256, 1, 1), "bn_head1.weight": (1024,),
                 "fc_head1.weight": (100, 1024), "fc.weight": (100, 512)},
    "densenet_40_12": {"conv1.weight": (16, 3, 3, 3), "layer1.0.conv.weight": (12, 16, 3, 3),
                       "transition1.conv.weight": (160, 160, 1, 1),
                       "layer3_head1.0.conv.weight": (36, 304, 3, 3), "fc_head1.weight": (100, 736)},
    "densenet_bc_100_12": {"conv1.weight": (24, 3, 3, 3), "layer1.0.conv1.weight": (48, 24, 1, 1),
                           "layer1.0.conv2.weight": (12, 48, 3, 3),
                           "transition1.conv.weight": (108, 216, 1, 1),
                           "transition2_head2.conv.weight": (150, 300, 1, 1),
                           "layer3_head1.0.conv1.weight": (144, 150, 1, 1),
                           "layer3_head1.0.conv2.weight": (36, 144, 3, 3)},
    "resnet18": {"layer2.0.downsample.0.weight": (128, 64, 1, 1),
                 "layer2.0.downsample.1.running_mean": (128,),
                 "layer4_head1.0.conv1.weight": (1024, 256, 3, 3), "fc_head1.weight": (1000, 1024)},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.weight": (256,),
                 "layer4_head1.0.conv3.weight": (4096, 1024, 1, 1), "fc_head1.weight": (1000, 4096),
                 "layer3_head2.0.downsample.0.weight": (1024, 512, 1, 1)},
}
ABSENT = {
    "resnet32": ("downsample", "shortcut"),  # the CIFAR ResNet shortcut has no parameters
    "wrn_16_8": ("layer1.1.shortcut", "layer2.1.shortcut", "downsample"),
    "densenet_40_12": ("bn1", "conv2", "dropout"),  # basic layers hold bn, conv only
    "densenet_bc_100_12": ("layer1.0.bn.", "layer1.0.conv."),  # bottleneck layers: bn1, conv1, bn2, conv2
    "resnet18": ("layer1.0.downsample", "layer1.1.downsample"),
    "resnet50": ("layer1.1.downsample", "layer2.1.downsample"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reference_keys_and_shapes(name):
    state = build_on_meta(name).state_dict()
    for key, shape in SHAPES[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for fragment in ABSENT[name]:
        assert not [k for k in state if fragment in k], fragment


FORWARD_CASES = [  # (name, input size, native pooling)
    ("resnet32", 32, True), ("wrn_16_8", 32, True), ("densenet_40_12", 32, True),
    ("densenet_bc_100_12", 32, True), ("resnet18", 64, False), ("resnet50", 64, False),
    ("resnet18", 224, True),
]


@pytest.mark.parametrize("name,size,native", FORWARD_CASES)
def test_eval_forward_gives_three_finite_distinct_logits(name, size, native):
    model = ref.randomize_(ref.build(name, classes(name), native_pooling=native), seed=3).eval()
    with torch.no_grad():
        outputs = model(images(2, size))
    assert isinstance(outputs, tuple) and len(outputs) == 3
    for logits in outputs:
        assert logits.shape == (2, classes(name))
        assert torch.isfinite(logits).all()
    x0, x1, x2 = outputs
    assert not torch.allclose(x0, x1) and not torch.allclose(x0, x2) and not torch.allclose(x1, x2)


def test_adaptive_pooling_equals_reference_pooling_at_native_size():
    native = ref.randomize_(ref.build("resnet32", 10, native_pooling=True), seed=5).eval()
    adaptive = ref.randomize_(ref.build("resnet32", 10, native_pooling=False), seed=5).eval()
    x = images(2, 32)
    with torch.no_grad():
        for a, b in zip(native(x), adaptive(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,size,native", [("resnet110", 32, True), ("resnet50", 64, False)])
def test_randomize_is_seeded_and_non_degenerate(name, size, native):
    model = ref.build(name, 10, native_pooling=native).eval()
    x = images(3, size)
    assert ref.randomize_(model, seed=7) is model
    first = state_snapshot(model)
    with torch.no_grad():
        logits = model(x)
    for out in logits:
        assert torch.isfinite(out).all()
        assert out.std(dim=0).mean() > 1e-3  # neither overflowing nor collapsed to a constant
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) > 0 for m in bn)
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bn)
    assert all(m.running_mean.abs().max() > 0 and m.bias.abs().max() > 0 for m in bn)

    ref.randomize_(model, seed=7)  # the same seed again: the same values, to the bit
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), logits))


def test_randomize_depends_on_the_seed():
    a = ref.randomize_(ref.build("resnet32", 10), seed=7).state_dict()
    b = ref.randomize_(ref.build("resnet32", 10), seed=8).state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.running_var", "layer3_head1.4.conv2.weight", "fc.bias"):
        assert not torch.equal(a[key], b[key]), key


def test_main_branch_state_dict_is_backbone_and_fc():
    model = ref.randomize_(ref.build("resnet32", 100), seed=0)
    main = ref.main_branch_state_dict(model)
    full = model.state_dict()
    assert "fc.weight" in main and "fc.bias" in main and "layer3.4.bn2.running_var" in main
    assert not [k for k in main if "_head" in k]
    assert set(main) == {k for k in full if "_head" not in k}
    assert list(main) == [k for k in full if k in main]  # state_dict order kept
    assert sum(v.numel() for k, v in main.items() if k in dict(model.named_parameters())) == 470_004


def test_cifar_resnet_shortcut_is_pooled_input_then_zero_channels():
    block = ref.randomize_(ref.build("resnet32", 10), seed=1).layer2[0].eval()
    with torch.no_grad():  # silence the residual branch: conv2 = 0, bn2 maps 0 to 0
        block.conv2.weight.zero_()
        block.bn2.bias.zero_()
        block.bn2.running_mean.zero_()
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)).relu()
        out = block(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], torch.nn.functional.avg_pool2d(x, 2))
    assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))


def test_wrn_widening_block_shortcut_takes_the_preactivated_input():
    model = ref.randomize_(ref.build("wrn_16_8", 10), seed=2).eval()
    x = torch.randn(2, 128, 8, 8, generator=torch.Generator().manual_seed(0))
    widening, same = model.layer2[0], model.layer2[1]
    with torch.no_grad():
        pre = torch.relu(widening.bn1(x))
        branch = widening.conv2(torch.relu(widening.bn2(widening.conv1(pre))))
        torch.testing.assert_close(widening(x), branch + widening.shortcut(pre))
        y = widening(x)
        pre = torch.relu(same.bn1(y))
        torch.testing.assert_close(same(y), same.conv2(torch.relu(same.bn2(same.conv1(pre)))) + y)
