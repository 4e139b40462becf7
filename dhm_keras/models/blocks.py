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
from typing import Callable

import keras

from dhm_keras.models import layers as L


# ----------------------------------------------------------------------------- stems


def cifar_stem(x, filters: int, *, name: str = "stem", **_options):
    """conv3x3(filters) - BN - ReLU at full resolution (CIFAR ResNet/WRN/DenseNet stem)."""
    x = L.conv2d(x, filters, 3, 1, name=f"{name}_conv")
    x = L.batch_norm(x, name=f"{name}_bn")
    return L.relu(x, name=f"{name}_relu")


# ----------------------------------------------------------------------------- blocks


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

    y = L.conv2d(x, filters, 3, stride, name=f"{name}_conv1")
    y = L.batch_norm(y, name=f"{name}_bn1")
    y = L.relu(y, name=f"{name}_relu1")
    y = L.conv2d(y, filters, 3, 1, name=f"{name}_conv2")
    y = L.batch_norm(y, name=f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return L.relu(y, name=f"{name}_out")


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
}

# Block type -> stage fn(x, filters, blocks, stride, *, name, **options). Residual
# families reuse `stack`; a family whose stage is more than repeated blocks (DenseNet's
# dense block + transition) registers its own stage function.
STAGES: dict[str, Callable] = {
    "cifar_basic": functools.partial(stack, cifar_basic_block),
}
