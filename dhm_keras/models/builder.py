"""The one builder: ArchSpec -> Keras functional model with a dict of logits per head.

Outputs are {"b0": logits, "b1": logits, ...}. In "baseline" mode only B0 exists: no branch
layer or variable is created at all, so a baseline checkpoint is a plain backbone. "dsl" and
"dhm" build the same network (they differ only in the loss).

Naming: layers of branch bK (K >= 1) start with "bK_"; backbone layers start with "stem_"
or "stage<i>_"; head layers with "<head>_" ("b0_gap", "b0_classifier", ...). This is what
lets the training loop, parameter counts and weight porting tell heads apart without
walking the graph.
"""

from __future__ import annotations

from typing import Optional
import sys

import keras

from dhm_keras import heads as heads_lib
from dhm_keras.models import blocks
from dhm_keras.models import layers as layers_lib
from dhm_keras.models import specs as specs_lib

MODES = ("baseline", "dsl", "dhm")
# The head conventions are `dhm_keras.heads`'; re-exported for `dhm_keras.models` users.
MAIN_HEAD = heads_lib.MAIN
branch_prefix = heads_lib.layer_prefix
head_of_layer = heads_lib.head_of_layer


def build_from_spec(
    spec: specs_lib.ArchSpec,
    num_classes: int,
    mode: str = "dhm",
    input_shape=None,
) -> keras.Model:
    """Build `spec` as a functional model (Keras applications style: data in, graph out)."""
    _check_mode(mode)
    stage_fn = _lookup(blocks.STAGES, spec.block, "block")
    stem_fn = _lookup(blocks.STEMS, spec.stem, "stem")
    options = spec.options

    inputs = keras.Input(shape=tuple(input_shape or spec.input_shape), name="images")
    x = stem_fn(inputs, spec.stem_filters, name="stem", **options)
    taps = {"stem": x}  # fork points: output of the stem and of every backbone stage
    for stage in spec.stages:
        x = stage_fn(x, stage.filters, stage.blocks, stage.stride, name=stage.name, **options)
        taps[stage.name] = x

    outputs = {MAIN_HEAD: _head(x, num_classes, MAIN_HEAD, spec)}
    if mode != "baseline":
        for branch in spec.branches:
            y = taps[branch.fork]
            prefix = branch_prefix(branch.name)
            for stage in branch.stages:
                y = stage_fn(
                    y, stage.filters, stage.blocks, stage.stride,
                    name=f"{prefix}{stage.name}", **options,
                )
            outputs[branch.name] = _head(y, num_classes, branch.name, spec)

    ensure_recursion_limit(_max_layers(spec))
    return keras.Model(inputs=inputs, outputs=outputs, name=f"{spec.name}_{mode}")


def ensure_recursion_limit(num_layers: int) -> int:
    """Raise (never lower) Python's recursion limit so Keras can map a deep graph.

    Keras walks a functional graph recursively, one Python frame per layer on the path
    (`keras/src/ops/function.py::_build_map_helper`), both when a Model is constructed and
    when one is deserialized by `keras.models.load_model`: ResNet-1202 (~7,000 layers)
    overflows the default limit of 1000 (keras-team/keras#15596). Python >= 3.11 runs
    these pure-Python frames without growing the C stack, so a higher limit is safe.
    Call this yourself before `load_model` of a deep model in a fresh process.
    """
    needed = 2 * int(num_layers) + 1000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)
    return sys.getrecursionlimit()


def _max_layers(spec: specs_lib.ArchSpec) -> int:
    """Generous upper bound on the layer count: every block (or dense layer, or
    depthwise-separable unit) makes at most 12 layers."""
    stages = spec.stages + tuple(s for b in spec.branches for s in b.stages)
    return 12 * sum(s.blocks for s in stages) + 50


def build(
    name: str,
    num_classes: int,
    mode: str = "dhm",
    input_shape=None,
    sync_batchnorm: Optional[bool] = None,
    **overrides,
):
    """Build a registered architecture by name.

    Args:
      name: one of `available_models()`.
      num_classes: logits per head.
      mode: "baseline" (B0 only), "dsl" or "dhm" (all heads; same network).
      input_shape: (H, W, C) without batch; default from the spec ((32, 32, 3) for CIFAR).
      **overrides: replace spec fields, e.g. `blocks_per_stage=1`, `branch_blocks=1`,
        `branches=("b1",)` (names select among the spec's branches, optional ones
        included: `build("resnet18", 1000, branches=("b1", "b2", "b3"))` adds B3);
        block options by name where the family has them: `dropout` (WRN, default 0.0),
        `bottleneck` / `compression` (DenseNet). Unknown keys raise ValueError listing
        the valid ones.
      sync_batchnorm: batch statistics over the global batch under several
        replicas (`layers.synchronized_batch_norm`); None keeps the
        surrounding `synchronized_batch_norm()` context (default: off, as in
        the reference).
    """
    _check_mode(mode)
    spec = specs_lib.resolve(name, **overrides)
    if sync_batchnorm is None:
        return build_from_spec(spec, num_classes, mode=mode, input_shape=input_shape)
    with layers_lib.synchronized_batch_norm(sync_batchnorm):
        return build_from_spec(spec, num_classes, mode=mode, input_shape=input_shape)


def head_names(model: keras.Model) -> list[str]:
    """Output keys of a built model, B0 first, then b1, b2, ... in numeric order."""
    return heads_lib.ordered(heads_lib.check_outputs(model.output, model.name))


def branch_layers(model: keras.Model, head: str) -> list[keras.layers.Layer]:
    """Layers owned by `head`: "bK" -> layers named "bK_*"; "b0" -> everything else
    (the shared backbone plus the B0 head), i.e. what a baseline model contains."""
    return [layer for layer in model.layers if head_of_layer(layer.name) == head]


def _head(x, num_classes, head, spec):
    return blocks.classification_head(
        x, num_classes, name=head, preactivation=spec.head_preactivation
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid modes: {', '.join(MODES)}")


def _lookup(registry: dict, key: str, what: str):
    try:
        return registry[key]
    except KeyError:
        raise ValueError(f"Unknown {what} type {key!r}; known: {sorted(registry)}") from None
