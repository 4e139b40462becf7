"""PyTorch definitions of the authors' DHM reference networks, for tests only.

This module is the independent yardstick against which importing the authors' PyTorch
checkpoints is tested: a checkpoint importer must map every tensor of these models'
`state_dict()` onto the Keras model, and the Keras logits must then equal the logits
computed here. It is therefore written after the public reference implementation,
https://github.com/d-li14/DHM, and keeps its module names (hence its `state_dict()` keys,
in the same order) and its computation:

* `models/cifar/resnet.py`: `resnet32`, `resnet110`, `resnet1202` (post-activation basic
  blocks, shortcut = 2x2 average pooling + zero channels; B2 = `layer2_head2`,
  `layer3_head2`, `fc_head2` forks after `layer1`; B1 = `layer3_head1` (128 planes),
  `fc_head1` forks after `layer2`; every head pools with the backbone's `avgpool`);
* `models/cifar/wrn.py`: `wrn_16_8`, `wrn_28_10` (pre-activation blocks `bn1, conv1,
  bn2, conv2` plus a 1x1 `shortcut` conv when the width changes; in that case the block
  pre-activates its input itself and the shortcut sees the *pre-activated* input; final
  `bn`/`bn_head2`/`bn_head1` + ReLU before pooling);
* `models/cifar/densenet.py`: `densenet_40_12`, `densenet_100_12` (layers `bn, conv`) and
  `densenet_bc_100_12` (layers `bn1, conv1, bn2, conv2`, 4k bottleneck, stem width 2k,
  compression 0.5); transitions `bn, conv` + 2x2 average pooling; B2 has its own
  `transition2_head2`; B1 grows at 3k;
* `models/imagenet/resnet.py`: `resnet18` ... `resnet152` (torchvision v1.5 blocks,
  projection shortcut `downsample = Sequential(conv1x1, BN)`; B2 = `layer3_head2`,
  `layer4_head2`, `fc_head2` forks after `layer2`; B1 = `layer4_head1` (1024 planes),
  `fc_head1` forks after `layer3`; every head pools with the backbone's `avgpool`).

`forward(x)` returns `(x0, x1, x2)` = (`fc`, `fc_head1`, `fc_head2`) logits like the
reference. The modules are re-expressed here, not copied; freshly built models carry the
reference's initialisation (He-normal fan-out convs, BN 1/0, PyTorch's default Linear).

Two deliberate departures from the reference, neither of which changes the math:

1. The CIFAR ResNet's zero-channel shortcut is created on the input's device and dtype;
   the reference allocates it with `.cuda()` and so only runs on a GPU.
2. `build(..., native_pooling=False)` replaces the reference's final
   `AvgPool2d(8, stride=1)` (CIFAR) / `AvgPool2d(7, stride=1)` (ImageNet), which equals
   global average pooling only at the native input size (32x32 / 224x224), by
   `nn.AdaptiveAvgPool2d(1)`, so tests can run e.g. ImageNet networks on 64x64 inputs.
   At the native size both give the same logits. The default (`True`) is the reference.

Helpers for importer tests: `randomize_(model, seed)` gives every parameter and every
BatchNorm statistic non-trivial, seeded values that keep activations O(1) even through
ResNet-1202 / ResNet-152, and `main_branch_state_dict(model)` is what a baseline
(backbone + `fc` only) checkpoint holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["ARCHITECTURES", "build", "randomize_", "main_branch_state_dict"]

ARCHITECTURES = (
    "resnet32",
    "resnet110",
    "resnet1202",
    "wrn_16_8",
    "wrn_28_10",
    "densenet_40_12",
    "densenet_100_12",
    "densenet_bc_100_12",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _final_pool(native_size: int, native_pooling: bool) -> nn.Module:
    """The reference's `AvgPool2d(native_size, stride=1)`, or global average pooling."""
    if native_pooling:
        return nn.AvgPool2d(native_size, stride=1)
    return nn.AdaptiveAvgPool2d(1)


def _pool_flatten(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = pool(x)
    return x.view(x.size(0), -1)


def _reference_init(model: nn.Module) -> None:
    """Conv N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0, as every reference file does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ResNet basic block, CIFAR ResNet


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU: the basic block of both reference
    ResNets, which differ only in the shortcut (`shortcut`). As torchvision's (ImageNet),
    the shortcut is `downsample(x)` (conv1x1 + BN) where the shape changes, else x."""

    expansion = 1
    branch_end = "conv2"  # last conv of the residual branch (see randomize_)

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def shortcut(self, x, out):
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x, out))


class CifarBasicBlock(BasicBlock):
    """The CIFAR reference's basic block. With `downsample` (2x2 average pooling) the
    shortcut is the pooled input followed by zero channels up to the width."""

    def shortcut(self, x, out):
        if self.downsample is None:
            return x
        batch, c_out, h, w = out.shape
        # Departure 1: zeros on x's device/dtype (the reference calls .cuda()).
        zeros = x.new_zeros(batch, c_out - x.shape[1], h, w)
        return torch.cat([self.downsample(x), zeros], dim=1)


class CifarResNet(nn.Module):
    """Reference CIFAR ResNet (depth 6n+2) with B2 after layer1 and B1 after layer2."""

    def __init__(self, depth, branch_layers, num_classes=10, native_pooling=True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth should be 6n+2")
        n = (depth - 2) // 6
        block = CifarBasicBlock
        self.inplanes = 16

        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 16, n)
        fork_head2 = self.inplanes
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        fork_head1 = self.inplanes
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.avgpool = _final_pool(8, native_pooling)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        self.inplanes = fork_head2
        self.layer2_head2 = self._make_layer(block, 32, branch_layers[0][0], stride=2)
        self.layer3_head2 = self._make_layer(block, 64, branch_layers[0][1], stride=2)
        # Registered by the reference but unused by its forward (heads use self.avgpool).
        self.avgpool_head2 = _final_pool(8, native_pooling)
        self.fc_head2 = nn.Linear(64 * block.expansion, num_classes)

        self.inplanes = fork_head1
        self.layer3_head1 = self._make_layer(block, 128, branch_layers[1][0], stride=2)
        self.avgpool_head1 = _final_pool(8, native_pooling)
        self.fc_head1 = nn.Linear(128 * block.expansion, num_classes)

        # Longest chain of residual blocks from input to any head (see randomize_).
        self.residual_depth = max(3 * n, n + sum(branch_layers[0]), 2 * n + branch_layers[1][0])
        _reference_init(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.AvgPool2d(kernel_size=2, stride=2)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        node2 = self.layer1(x)
        node1 = self.layer2(node2)
        x0 = self.fc(_pool_flatten(self.avgpool, self.layer3(node1)))
        x2 = self.fc_head2(_pool_flatten(self.avgpool, self.layer3_head2(self.layer2_head2(node2))))
        x1 = self.fc_head1(_pool_flatten(self.avgpool, self.layer3_head1(node1)))
        return x0, x1, x2


# --------------------------------------------------------------------------- Wide ResNet


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, + shortcut.

    Reference quirk kept: if the width stays, the residual is the raw input; if it
    changes, the input is pre-activated first and the 1x1 `shortcut` conv takes the
    pre-activated input. Only a width change creates `shortcut` (never a stride alone).
    """

    expansion = 1
    branch_end = "conv2"

    def __init__(self, inplanes: int, planes: int, dropout_rate: float = 0.0, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.relu = nn.ReLU()
        self.dropout_rate = dropout_rate
        self.dropout = nn.Dropout(dropout_rate)
        self.equal_in_out = inplanes == planes
        if self.equal_in_out:
            self.shortcut = None
        else:
            self.shortcut = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x):
        preact = self.relu(self.bn1(x))
        if not self.equal_in_out:
            x = preact
        out = self.relu(self.bn2(self.conv1(preact)))
        if self.dropout_rate > 0:
            out = self.dropout(out)
        out = self.conv2(out)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return out + x


class WideResNet(nn.Module):
    """Reference WRN (depth 6n+4) with B2 after layer1 and B1 after layer2."""

    def __init__(self, depth, branch_layers, widening_factor=1, dropout_rate=0.0,
                 num_classes=10, native_pooling=True):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("depth should be 6n+4")
        n = (depth - 4) // 6
        block = WideBasicBlock
        k = widening_factor
        self.inplanes = 16

        self.conv = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16 * k, n, dropout_rate)
        fork_head2 = self.inplanes
        self.layer2 = self._make_layer(block, 32 * k, n, dropout_rate, stride=2)
        fork_head1 = self.inplanes
        self.layer3 = self._make_layer(block, 64 * k, n, dropout_rate, stride=2)
        self.bn = nn.BatchNorm2d(64 * k * block.expansion)
        self.relu = nn.ReLU()
        self.avgpool = _final_pool(8, native_pooling)
        self.fc = nn.Linear(64 * k * block.expansion, num_classes)

        self.inplanes = fork_head2
        self.layer2_head2 = self._make_layer(block, 32 * k, branch_layers[0][0], dropout_rate, stride=2)
        self.layer3_head2 = self._make_layer(block, 64 * k, branch_layers[0][1], dropout_rate, stride=2)
        self.bn_head2 = nn.BatchNorm2d(64 * k * block.expansion)
        self.fc_head2 = nn.Linear(64 * k * block.expansion, num_classes)

        self.inplanes = fork_head1
        self.layer3_head1 = self._make_layer(block, 128 * k, branch_layers[1][0], dropout_rate, stride=2)
        self.bn_head1 = nn.BatchNorm2d(128 * k * block.expansion)
        self.fc_head1 = nn.Linear(128 * k * block.expansion, num_classes)

        self.residual_depth = max(3 * n, n + sum(branch_layers[0]), 2 * n + branch_layers[1][0])
        _reference_init(self)

    def _make_layer(self, block, planes, blocks, dropout_rate=0.0, stride=1):
        layers = [block(self.inplanes, planes, dropout_rate, stride)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes, dropout_rate) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def _classify(self, x, bn, fc):
        return fc(_pool_flatten(self.avgpool, self.relu(bn(x))))

    def forward(self, x):
        x = self.conv(x)
        node2 = self.layer1(x)
        node1 = self.layer2(node2)
        x0 = self._classify(self.layer3(node1), self.bn, self.fc)
        x2 = self._classify(self.layer3_head2(self.layer2_head2(node2)), self.bn_head2, self.fc_head2)
        x1 = self._classify(self.layer3_head1(node1), self.bn_head1, self.fc_head1)
        return x0, x1, x2


# --------------------------------------------------------------------------- DenseNet


class DenseBasicLayer(nn.Module):
    """BN-ReLU-conv3x3(k)-[dropout], concatenated after the input."""

    expansion = 1

    def __init__(self, inplanes: int, growth_rate: int = 12, dropout_rate: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(inplanes, self.expansion * growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout_rate = dropout_rate
        if dropout_rate > 0:
            self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        out = self.conv(self.relu(self.bn(x)))
        if self.dropout_rate > 0:
            out = self.dropout(out)
        return torch.cat((x, out), 1)


class DenseBottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-[dropout]-BN-ReLU-conv3x3(k)-[dropout], concatenated after the input."""

    expansion = 4

    def __init__(self, inplanes: int, growth_rate: int = 12, dropout_rate: float = 0.0):
        super().__init__()
        width = self.expansion * growth_rate
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout_rate = dropout_rate
        if dropout_rate > 0:
            self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        if self.dropout_rate > 0:
            out = self.dropout(out)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.dropout_rate > 0:
            out = self.dropout(out)
        return torch.cat((x, out), 1)


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1-[dropout]-avgpool 2x2."""

    def __init__(self, inplanes: int, outplanes: int, dropout_rate: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(inplanes, outplanes, kernel_size=1, bias=False)
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.dropout_rate = dropout_rate
        if dropout_rate > 0:
            self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        out = self.conv(self.relu(self.bn(x)))
        if self.dropout_rate > 0:
            out = self.dropout(out)
        return self.avgpool(out)


class DenseNet(nn.Module):
    """Reference DenseNet (depth 3n+4) with B2 after transition1 and B1 after transition2."""

    def __init__(self, block, depth, branch_layers, growth_rate=12, compression_factor=1.0,
                 dropout_rate=0.0, num_classes=10, native_pooling=True):
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError("depth should be 3n+4")
        bottleneck = block is DenseBottleneckLayer
        n = (depth - 4) // 6 if bottleneck else (depth - 4) // 3
        self.inplanes = 2 * growth_rate if bottleneck else 16

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, n, growth_rate, dropout_rate)
        self.transition1 = self._make_transition(compression_factor, dropout_rate)
        fork_head2 = self.inplanes
        self.layer2 = self._make_layer(block, n, growth_rate, dropout_rate)
        self.transition2 = self._make_transition(compression_factor, dropout_rate)
        fork_head1 = self.inplanes
        self.layer3 = self._make_layer(block, n, growth_rate, dropout_rate)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        self.avgpool = _final_pool(8, native_pooling)
        self.fc = nn.Linear(self.inplanes, num_classes)

        self.inplanes = fork_head2
        self.layer2_head2 = self._make_layer(block, branch_layers[0][0], growth_rate, dropout_rate)
        self.transition2_head2 = self._make_transition(compression_factor, dropout_rate)
        self.layer3_head2 = self._make_layer(block, branch_layers[0][1], growth_rate, dropout_rate)
        self.bn_head2 = nn.BatchNorm2d(self.inplanes)
        self.fc_head2 = nn.Linear(self.inplanes, num_classes)

        self.inplanes = fork_head1
        self.layer3_head1 = self._make_layer(block, branch_layers[1][0], 3 * growth_rate, dropout_rate)
        self.bn_head1 = nn.BatchNorm2d(self.inplanes)
        self.fc_head1 = nn.Linear(self.inplanes, num_classes)

        self.residual_depth = 0  # concatenation, no residual sums
        _reference_init(self)

    def _make_layer(self, block, layers, growth_rate=12, dropout_rate=0.0):
        modules = []
        for _ in range(layers):
            modules.append(block(self.inplanes, growth_rate, dropout_rate))
            self.inplanes += growth_rate
        return nn.Sequential(*modules)

    def _make_transition(self, compression_factor=1.0, dropout_rate=0.0):
        inplanes = self.inplanes
        self.inplanes = int(math.floor(inplanes * compression_factor))
        return DenseTransition(inplanes, self.inplanes, dropout_rate)

    def _classify(self, x, bn, fc):
        return fc(_pool_flatten(self.avgpool, self.relu(bn(x))))

    def forward(self, x):
        x = self.conv1(x)
        node2 = self.transition1(self.layer1(x))
        node1 = self.transition2(self.layer2(node2))
        x0 = self._classify(self.layer3(node1), self.bn, self.fc)
        x = self.layer3_head2(self.transition2_head2(self.layer2_head2(node2)))
        x2 = self._classify(x, self.bn_head2, self.fc_head2)
        x1 = self._classify(self.layer3_head1(node1), self.bn_head1, self.fc_head1)
        return x0, x1, x2


# --------------------------------------------------------------------------- ImageNet ResNet


class ImageNetBottleneck(nn.Module):
    """torchvision v1.5 Bottleneck: 1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(4x)-BN, + shortcut, ReLU."""

    expansion = 4
    branch_end = "conv3"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ImageNetResNet(nn.Module):
    """Reference ImageNet ResNet with B2 after layer2 and B1 after layer3."""

    def __init__(self, block, layers, branch_layers, num_classes=1000, native_pooling=True):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        fork_head2 = self.inplanes
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        fork_head1 = self.inplanes
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = _final_pool(7, native_pooling)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        self.inplanes = fork_head2
        self.layer3_head2 = self._make_layer(block, 256, branch_layers[0][0], stride=2)
        self.layer4_head2 = self._make_layer(block, 512, branch_layers[0][1], stride=2)
        self.fc_head2 = nn.Linear(512 * block.expansion, num_classes)

        self.inplanes = fork_head1
        self.layer4_head1 = self._make_layer(block, 1024, branch_layers[1][0], stride=2)
        self.fc_head1 = nn.Linear(1024 * block.expansion, num_classes)

        stem = layers[0] + layers[1]
        self.residual_depth = max(
            sum(layers), stem + sum(branch_layers[0]), stem + layers[2] + branch_layers[1][0]
        )
        _reference_init(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        node2 = self.layer2(self.layer1(x))
        node1 = self.layer3(node2)
        x0 = self.fc(_pool_flatten(self.avgpool, self.layer4(node1)))
        x2 = self.fc_head2(_pool_flatten(self.avgpool, self.layer4_head2(self.layer3_head2(node2))))
        x1 = self.fc_head1(_pool_flatten(self.avgpool, self.layer4_head1(node1)))
        return x0, x1, x2


# --------------------------------------------------------------------------- public API

_CONSTRUCTORS = {
    "resnet32": lambda **kw: CifarResNet(32, [[5, 3], [5]], **kw),
    "resnet110": lambda **kw: CifarResNet(110, [[9, 9], [18]], **kw),
    "resnet1202": lambda **kw: CifarResNet(1202, [[100, 100], [200]], **kw),
    "wrn_16_8": lambda **kw: WideResNet(16, [[2, 1], [2]], 8, **kw),
    "wrn_28_10": lambda **kw: WideResNet(28, [[4, 2], [4]], 10, **kw),
    "densenet_40_12": lambda **kw: DenseNet(DenseBasicLayer, 40, [[12, 6], [12]], 12, 1.0, **kw),
    "densenet_100_12": lambda **kw: DenseNet(DenseBasicLayer, 100, [[16, 16], [32]], 12, 1.0, **kw),
    "densenet_bc_100_12": lambda **kw: DenseNet(DenseBottleneckLayer, 100, [[16, 16], [32]], 12, 0.5, **kw),
    "resnet18": lambda **kw: ImageNetResNet(BasicBlock, [2, 2, 2, 2], [[1, 2], [2]], **kw),
    "resnet34": lambda **kw: ImageNetResNet(BasicBlock, [3, 4, 6, 3], [[3, 2], [3]], **kw),
    "resnet50": lambda **kw: ImageNetResNet(ImageNetBottleneck, [3, 4, 6, 3], [[3, 2], [3]], **kw),
    "resnet101": lambda **kw: ImageNetResNet(ImageNetBottleneck, [3, 4, 23, 3], [[12, 2], [3]], **kw),
    "resnet152": lambda **kw: ImageNetResNet(ImageNetBottleneck, [3, 8, 36, 3], [[18, 2], [3]], **kw),
}
assert tuple(_CONSTRUCTORS) == ARCHITECTURES


def build(name: str, num_classes: int, native_pooling: bool = True) -> nn.Module:
    """The reference network `name` (one of ARCHITECTURES) with all three heads.

    `native_pooling=True` pools like the reference (`AvgPool2d(8)` / `AvgPool2d(7)`,
    stride 1), so inputs must be 32x32 (CIFAR) / 224x224 (ImageNet); `False` pools
    globally (`AdaptiveAvgPool2d(1)`) and accepts smaller inputs, e.g. 64x64 ImageNet.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHITECTURES}")
    return _CONSTRUCTORS[name](num_classes=num_classes, native_pooling=native_pooling)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrites every parameter and BatchNorm statistic with seeded random values, in place.

    * conv kernels ~ N(0, sqrt(2 / fan_in)); the last conv of each residual branch
      (`branch_end` of the block) is further scaled by 1/sqrt(L), L = the model's longest
      chain of residual blocks, so the residual sum grows by ~e overall instead of
      exponentially (ResNet-1202 and ResNet-152 neither overflow nor go flat);
    * Linear weight ~ N(0, 1/sqrt(fan_in)), bias ~ N(0, 0.1);
    * BatchNorm weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1),
      running_var ~ U(0.5, 2.0), num_batches_tracked a positive integer.

    Values are drawn on the CPU from a `torch.Generator` seeded with `seed`, in module
    order, so the result depends only on the architecture and the seed. Raises if a
    parameter is left untouched (an unexpected module type). Returns `model`.
    """
    gen = torch.Generator().manual_seed(int(seed))
    depth = max(int(getattr(model, "residual_depth", 0)), 1)
    branch_ends = set()
    for m in model.modules():
        end = getattr(m, "branch_end", None)
        if end is not None:
            branch_ends.add(id(getattr(m, end)))

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    done = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                std = math.sqrt(2.0 / fan_in)
                if id(m) in branch_ends:
                    std /= math.sqrt(depth)
                normal(m.weight, std)
                if m.bias is not None:
                    normal(m.bias, 0.1)
            elif isinstance(m, nn.Linear):
                normal(m.weight, 1.0 / math.sqrt(m.in_features))
                if m.bias is not None:
                    normal(m.bias, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                uniform(m.weight, 0.5, 1.5)
                normal(m.bias, 0.1)
                normal(m.running_mean, 0.1)
                uniform(m.running_var, 0.5, 2.0)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100_000, (1,), generator=gen)))
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise TypeError(f"randomize_ does not know how to fill {missed[:5]}")
    return model


def main_branch_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` without the auxiliary heads (every key whose first component
    contains `_head`): what a baseline, backbone-plus-`fc` checkpoint holds."""
    return {k: v for k, v in model.state_dict().items() if "_head" not in k.split(".", 1)[0]}
