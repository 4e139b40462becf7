"""Stems, blocks, stages and heads: one function per type, looked up by name from a spec.

A spec (specs.py) names its stem and block type by string; the builder resolves the names
through STEMS and STAGES below. Adding an architecture family is one block (or stage)
function plus one registry entry here, and data in specs.py.

Layer-naming contract (the training loop and tests rely on it): every function takes the
full name prefix of the layers it creates, e.g. "stage3_block0" for the backbone or
"b1_stage3_block0" for branch B1; the builder puts the "bK_" in front for branch layers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import keras

from dhm_keras.models import layers as L


# ----------------------------------------------------------------------------- stems


def conv_stem(x, filters: int, *, name: str = "stem", kernel_size: int = 3, strides: int = 1,
              bn_relu: bool = True, max_pool: bool = False, **_options):
    """conv(kernel_size/strides, padding kernel_size//2) [- BN - ReLU] [- maxpool3x3/2 pad 1].

    Registered variants (STEMS): "cifar" conv3x3-BN-ReLU (CIFAR ResNet); "conv" the bare
    conv3x3 of pre-activation backbones (WRN, DenseNet: the first block/layer starts with
    BN-ReLU); "imagenet" torchvision's conv7x7/2-BN-ReLU-maxpool3x3/2; "mobilenet"
    conv3x3/2-BN-ReLU (MobileNet v1).
    """
    x = L.conv2d(x, filters, kernel_size, strides, name=f"{name}_conv")
    if bn_relu:
        x = L.batch_norm(x, name=f"{name}_bn")
        x = L.relu(x, name=f"{name}_relu")
    if max_pool:
        x = L.max_pool2d(x, 3, 2, 1, name=f"{name}_pool")
    return x


def cifar_stem(x, filters: int, *, name: str = "stem", **_options):
    """conv3x3(filters) - BN - ReLU at full resolution (CIFAR ResNet stem)."""
    return conv_stem(x, filters, name=name)


# ----------------------------------------------------------------------------- blocks


def _basic_residual(x, shortcut, filters: int, stride: int, *, name: str):
    """The basic block's body shared by the CIFAR and ImageNet ResNets (they differ
    only in the shortcut): conv3x3(stride)-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""
    y = L.conv2d(x, filters, 3, stride, name=f"{name}_conv1")
    y = L.batch_norm(y, name=f"{name}_bn1")
    y = L.relu(y, name=f"{name}_relu1")
    y = L.conv2d(y, filters, 3, 1, name=f"{name}_conv2")
    y = L.batch_norm(y, name=f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return L.relu(y, name=f"{name}_out")


def cifar_basic_block(x, filters: int, stride: int, *, name: str, **_options):
    """Reference CIFAR ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, add, ReLU.

    Shortcut when the shape changes is parameter-free, as in the reference: average pool
    (kernel = stride = `stride`, i.e. 2x2/2) then zero channels appended after the input
    channels. This keeps the parameter counts of Table 1 exact (no projection weights).
    """
    in_channels = int(x.shape[-1])
    if filters < in_channels:
        raise ValueError(
            f"{name}: zero-pad shortcut cannot reduce channels ({in_channels} -> {filters})"
        )
    shortcut = x
    if stride != 1:
        shortcut = keras.layers.AveragePooling2D(
            stride, strides=stride, name=f"{name}_shortcut_pool"
        )(shortcut)
    if filters != in_channels:
        shortcut = L.ChannelZeroPad(filters - in_channels, name=f"{name}_shortcut_pad")(
            shortcut
        )

    return _basic_residual(x, shortcut, filters, stride, name=name)


def preact_block(x, filters: int, stride: int, *, name: str, dropout: float = 0.0,
                 **_options):
    """Wide-ResNet pre-activation block (the reference's BasicBlock):
    BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, added to the shortcut; no ReLU after.

    When the shape changes, the shortcut is a 1x1 conv (stride `stride`) of the
    PRE-ACTIVATED input (BN-ReLU(x)), as in the reference; otherwise it is x itself.
    Dropout (Appendix F) sits between the two convolutions and is live only in training.
    """
    in_channels = int(x.shape[-1])
    project = in_channels != filters or stride != 1
    y = L.batch_norm(x, name=f"{name}_bn1")
    y = L.relu(y, name=f"{name}_relu1")
    shortcut = L.conv2d(y, filters, 1, stride, name=f"{name}_shortcut_conv") if project else x
    y = L.conv2d(y, filters, 3, stride, name=f"{name}_conv1")
    y = L.batch_norm(y, name=f"{name}_bn2")
    y = L.relu(y, name=f"{name}_relu2")
    y = L.dropout(y, dropout, name=f"{name}_dropout")
    y = L.conv2d(y, filters, 3, 1, name=f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_out")([shortcut, y])


def _projection_shortcut(x, channels: int, stride: int, *, name: str):
    """torchvision's `downsample`: conv1x1(stride) + BN when the shape changes, else x."""
    if int(x.shape[-1]) == channels and stride == 1:
        return x
    y = L.conv2d(x, channels, 1, stride, name=f"{name}_shortcut_conv")
    return L.batch_norm(y, name=f"{name}_shortcut_bn")


def basic_block(x, filters: int, stride: int, *, name: str, **_options):
    """torchvision BasicBlock (expansion 1): conv3x3(stride)-BN-ReLU-conv3x3-BN, add, ReLU."""
    shortcut = _projection_shortcut(x, filters, stride, name=name)
    return _basic_residual(x, shortcut, filters, stride, name=name)


BOTTLENECK_EXPANSION = 4


def bottleneck_block(x, filters: int, stride: int, *, name: str, **_options):
    """torchvision Bottleneck (ResNet v1.5: the stride sits in the 3x3 conv).

    conv1x1(planes)-BN-ReLU-conv3x3(planes, stride)-BN-ReLU-conv1x1(4*planes)-BN, add,
    ReLU. `filters` is the number of planes; the block outputs 4 * planes channels.
    """
    out_channels = BOTTLENECK_EXPANSION * filters
    shortcut = _projection_shortcut(x, out_channels, stride, name=name)
    y = L.conv2d(x, filters, 1, 1, name=f"{name}_conv1")
    y = L.batch_norm(y, name=f"{name}_bn1")
    y = L.relu(y, name=f"{name}_relu1")
    y = L.conv2d(y, filters, 3, stride, name=f"{name}_conv2")
    y = L.batch_norm(y, name=f"{name}_bn2")
    y = L.relu(y, name=f"{name}_relu2")
    y = L.conv2d(y, out_channels, 1, 1, name=f"{name}_conv3")
    y = L.batch_norm(y, name=f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return L.relu(y, name=f"{name}_out")


def separable_unit(x, filters: int, stride: int, *, name: str, **_options):
    """MobileNet v1 depthwise-separable unit: dw3x3(stride)-BN-ReLU-pw1x1(filters)-BN-ReLU."""
    y = L.depthwise_conv2d(x, 3, stride, name=f"{name}_dw")
    y = L.batch_norm(y, name=f"{name}_dw_bn")
    y = L.relu(y, name=f"{name}_dw_relu")
    y = L.conv2d(y, filters, 1, 1, name=f"{name}_pw")
    y = L.batch_norm(y, name=f"{name}_pw_bn")
    return L.relu(y, name=f"{name}_pw_relu")


def dense_layer(x, growth: int, *, name: str, bottleneck: bool = False):
    """One DenseNet layer, its `growth` new channels concatenated AFTER the input's.

    Basic: BN-ReLU-conv3x3(growth). Bottleneck (DenseNet-BC): BN-ReLU-conv1x1(4*growth)-
    BN-ReLU-conv3x3(growth).
    """
    y = L.batch_norm(x, name=f"{name}_bn1")
    y = L.relu(y, name=f"{name}_relu1")
    if bottleneck:
        y = L.conv2d(y, 4 * growth, 1, 1, name=f"{name}_conv1")
        y = L.batch_norm(y, name=f"{name}_bn2")
        y = L.relu(y, name=f"{name}_relu2")
        y = L.conv2d(y, growth, 3, 1, name=f"{name}_conv2")
    else:
        y = L.conv2d(y, growth, 3, 1, name=f"{name}_conv1")
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, y])


def transition(x, compression: float, stride: int, *, name: str):
    """DenseNet transition: BN-ReLU-conv1x1(floor(c * compression))-avgpool(stride)."""
    channels = int(math.floor(int(x.shape[-1]) * compression))
    y = L.batch_norm(x, name=f"{name}_bn")
    y = L.relu(y, name=f"{name}_relu")
    y = L.conv2d(y, channels, 1, 1, name=f"{name}_conv")
    return keras.layers.AveragePooling2D(stride, strides=stride, name=f"{name}_pool")(y)


# ----------------------------------------------------------------------------- stages


def dense_stage(x, filters: int, blocks: int, stride: int, *, name: str,
                bottleneck: bool = False, compression: float = 1.0, **_options):
    """A DenseNet stage: a dense block of `blocks` layers of growth rate `filters`, closed
    by a transition when `stride` > 1 (`<name>_transition_*`).

    The transition ENDS the stage, so that a branch forking from a stage's output forks
    after the transition, as in Table 2 (B2 after transition 1, B1 after transition 2),
    and a branch stage with stride 2 has its own transition (B2's second stage).
    """
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"{name}: compression must lie in (0, 1], got {compression}")
    for i in range(blocks):
        x = dense_layer(x, filters, name=f"{name}_block{i}", bottleneck=bottleneck)
    if stride > 1:
        x = transition(x, compression, stride, name=f"{name}_transition")
    return x


# ----------------------------------------------------------------------------- stages


def stack(block_fn: Callable, x, filters: int, blocks: int, stride: int, *, name: str,
          **options):
    """`blocks` blocks of one type; only the first one strides (and changes width).

    Blocks are named `<name>_block<i>` with i from 0, mirroring the reference's
    `layerN[i]` so that weights can be mapped one-to-one.
    """
    for i in range(blocks):
        x = block_fn(x, filters, stride if i == 0 else 1, name=f"{name}_block{i}", **options)
    return x


# ----------------------------------------------------------------------------- heads


def classification_head(x, num_classes: int, *, name: str, preactivation: bool = False):
    """[BN - ReLU] - global average pool - Dense -> logits, named `<name>_...`.

    `preactivation` adds the final BN+ReLU of pre-activation backbones (WRN, DenseNet).
    Under a mixed policy the pooling runs in float32 like the classifier (the cast is
    free next to the convolutions), so pooled features keep float32 precision instead of
    bfloat16's 8-bit mantissa.
    """
    if preactivation:
        x = L.batch_norm(x, name=f"{name}_final_bn")
        x = L.relu(x, name=f"{name}_final_relu")
    x = keras.layers.GlobalAveragePooling2D(dtype="float32", name=f"{name}_gap")(x)
    return L.classifier(x, num_classes, name=f"{name}_classifier")


# ----------------------------------------------------------------------------- registries

# Stem type -> fn(x, filters, *, name, **options).
STEMS: dict[str, Callable] = {
    "cifar": cifar_stem,
    "conv": functools.partial(conv_stem, bn_relu=False),
    "imagenet": functools.partial(conv_stem, kernel_size=7, strides=2, max_pool=True),
    "mobilenet": functools.partial(conv_stem, strides=2),
}

# Block type -> stage fn(x, filters, blocks, stride, *, name, **options). Residual
# families reuse `stack`; a family whose stage is more than repeated blocks (DenseNet's
# dense block + transition) registers its own stage function.
STAGES: dict[str, Callable] = {
    "cifar_basic": functools.partial(stack, cifar_basic_block),
    "preact": functools.partial(stack, preact_block),
    "basic": functools.partial(stack, basic_block),
    "bottleneck": functools.partial(stack, bottleneck_block),
    "separable": functools.partial(stack, separable_unit),
    "dense": dense_stage,
}
