"""Every architecture as data: backbone stages, fork points and branch stages.

These are the tables of the architecture spec (supplement Tables 1-5) and nothing else:
CIFAR ResNet (Table 1), DenseNet (Table 2), Wide ResNet (Table 3), ImageNet ResNet with the
optional B3 (Table 4) and MobileNet for re-identification (Table 5);
the single builder (builder.py) turns any ArchSpec into a Keras model. A new family needs a
spec constructor here and a block function in blocks.py, never a new builder.

Conventions
* Stage names ("stage1".."stageN") follow the reference's `layer1..layerN`. A branch stage
  that mirrors a backbone stage (the primed stages of the tables, e.g. conv4_x') carries
  the same stage name; its layers differ only by the "bK_" prefix.
* A branch forks from the OUTPUT of the backbone stage named by `fork` ("stem" = stem
  output).
* Branch names are "b1", "b2", ...: B1 is closer to the top classifier, B2 farther.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Sequence

from dhm_keras import heads as heads_lib


def _is_branch(name: str) -> bool:
    return heads_lib.is_head(name) and name != heads_lib.MAIN



@dataclasses.dataclass(frozen=True)
class Stage:
    """`blocks` blocks of `filters` width; the stage down-samples by `stride`.

    What `filters` and `stride` mean is the block family's (blocks.STAGES): residual and
    depthwise-separable families stride in the first block and `filters` is its output
    width (planes for bottlenecks, whose output is 4 * planes); DenseNet stages take
    `filters` as the growth rate and down-sample in the transition that closes the stage.
    """

    name: str
    filters: int
    blocks: int
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class Branch:
    """An auxiliary head: its own stages after the backbone stage `fork`, then a head."""

    name: str
    fork: str
    stages: tuple[Stage, ...]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """A whole network: stem, backbone stages (B0), auxiliary branches, head style.

    `block` and `stem` are keys into blocks.STAGES / blocks.STEMS. `branches` are built
    by default in "dsl"/"dhm" mode; `optional_branches` (e.g. ImageNet ResNet-18's B3)
    only when selected with the `branches` override. `block_options` holds knobs of the
    block type (e.g. WRN dropout; given as a dict or pairs); each key doubles as an
    override key, so `build("wrn_28_10", 100, dropout=0.3)` needs no builder change.
    """

    name: str
    block: str
    stem: str
    stem_filters: int
    stages: tuple[Stage, ...]
    branches: tuple[Branch, ...] = ()
    optional_branches: tuple[Branch, ...] = ()
    head_preactivation: bool = False
    input_shape: tuple[int, ...] = (32, 32, 3)
    block_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        # Stored as sorted (key, value) pairs, so that a spec is immutable, hashable and
        # picklable: a registered spec can never be changed in place by a caller.
        items = self.block_options
        items = items.items() if isinstance(items, Mapping) else items
        object.__setattr__(self, "block_options", tuple(sorted((str(k), v) for k, v in items)))
        _validate(self)

    @property
    def options(self) -> dict[str, Any]:
        """Block options as keyword arguments for the stem and stage functions."""
        return dict(self.block_options)


def _validate(spec: ArchSpec) -> None:
    """Fail at spec time, not deep inside a thousand-layer build."""
    stage_names = [s.name for s in spec.stages]
    if len(set(stage_names)) != len(stage_names):
        raise ValueError(f"{spec.name}: duplicate backbone stage names {stage_names}")
    fork_points = {"stem", *stage_names}
    seen = set()
    for stage in spec.stages + tuple(
        s for b in spec.branches + spec.optional_branches for s in b.stages
    ):
        if _is_branch(stage.name.split("_")[0]):
            raise ValueError(f"{spec.name}: stage name {stage.name!r} looks like a branch")
        if stage.blocks < 1 or stage.filters < 1 or stage.stride < 1:
            raise ValueError(f"{spec.name}: invalid stage {stage}")
    for branch in spec.branches + spec.optional_branches:
        if not _is_branch(branch.name):
            raise ValueError(f"{spec.name}: branch name {branch.name!r} is not 'b<K>', K>=1")
        if branch.name in seen:
            raise ValueError(f"{spec.name}: duplicate branch {branch.name!r}")
        seen.add(branch.name)
        if branch.fork not in fork_points:
            raise ValueError(
                f"{spec.name}: branch {branch.name} forks at unknown point "
                f"{branch.fork!r}; valid: {sorted(fork_points)}"
            )
        if not branch.stages:
            raise ValueError(f"{spec.name}: branch {branch.name} has no stages")
    # Head numbering encodes fork depth (dhm_keras.heads): a higher-numbered
    # branch never forks deeper than a lower-numbered one.
    depth = {name: i for i, name in enumerate(["stem", *stage_names])}
    numbered = sorted(spec.branches + spec.optional_branches, key=lambda b: heads_lib.index(b.name))
    for upper, lower in zip(numbered, numbered[1:]):
        if depth[lower.fork] > depth[upper.fork]:
            raise ValueError(
                f"{spec.name}: branch {lower.name} forks at {lower.fork}, deeper than "
                f"{upper.name} at {upper.fork}; number branches from the deepest fork up"
            )


# ----------------------------------------------------------------------------- families


def cifar_resnet(name: str, n: int, b2_blocks: tuple[int, int], b1_blocks: int) -> ArchSpec:
    """CIFAR ResNet-(6n+2), Table 1: widths 16/32/64, B2 at conv2_x, B1 at conv3_x."""
    return ArchSpec(
        name=name,
        block="cifar_basic",
        stem="cifar",
        stem_filters=16,
        stages=(
            Stage("stage1", 16, n, 1),  # conv2_x, 32x32
            Stage("stage2", 32, n, 2),  # conv3_x, 16x16
            Stage("stage3", 64, n, 2),  # conv4_x, 8x8
        ),
        branches=(
            Branch("b1", fork="stage2", stages=(Stage("stage3", 128, b1_blocks, 2),)),
            Branch(
                "b2",
                fork="stage1",
                stages=(
                    Stage("stage2", 32, b2_blocks[0], 2),
                    Stage("stage3", 64, b2_blocks[1], 2),
                ),
            ),
        ),
    )


def wide_resnet(name: str, n: int, k: int, b2_blocks: tuple[int, int], b1_blocks: int,
                dropout: float = 0.0) -> ArchSpec:
    """WRN-(6n+4)-k, Table 3: bare conv3x3(16) stem, pre-activation blocks of widths
    16k/32k/64k, final BN-ReLU on every head; dropout between the convs (option)."""
    return ArchSpec(
        name=name,
        block="preact",
        stem="conv",
        stem_filters=16,
        stages=(
            Stage("stage1", 16 * k, n, 1),  # conv2_x, 32x32
            Stage("stage2", 32 * k, n, 2),  # conv3_x, 16x16
            Stage("stage3", 64 * k, n, 2),  # conv4_x, 8x8
        ),
        branches=(
            Branch("b1", fork="stage2", stages=(Stage("stage3", 128 * k, b1_blocks, 2),)),
            Branch(
                "b2",
                fork="stage1",
                stages=(
                    Stage("stage2", 32 * k, b2_blocks[0], 2),
                    Stage("stage3", 64 * k, b2_blocks[1], 2),
                ),
            ),
        ),
        head_preactivation=True,
        block_options={"dropout": dropout},
    )


def densenet(name: str, layers: int, k: int, b2_layers: tuple[int, int], b1_layers: int,
             bottleneck: bool = False, compression: float = 1.0,
             stem_filters: int = 16) -> ArchSpec:
    """CIFAR DenseNet, Table 2: three dense blocks of `layers` layers (growth k) with a
    transition closing the first two stages; B2 forks after transition 1 with its own
    block, transition and block; B1 forks after transition 2 with growth 3k."""
    return ArchSpec(
        name=name,
        block="dense",
        stem="conv",
        stem_filters=stem_filters,
        stages=(
            Stage("stage1", k, layers, 2),  # dense1 + trans1 -> 16x16
            Stage("stage2", k, layers, 2),  # dense2 + trans2 -> 8x8
            Stage("stage3", k, layers, 1),  # dense3
        ),
        branches=(
            Branch("b1", fork="stage2", stages=(Stage("stage3", 3 * k, b1_layers, 1),)),
            Branch(
                "b2",
                fork="stage1",
                stages=(
                    Stage("stage2", k, b2_layers[0], 2),
                    Stage("stage3", k, b2_layers[1], 1),
                ),
            ),
        ),
        head_preactivation=True,
        block_options={"bottleneck": bottleneck, "compression": compression},
    )


def imagenet_resnet(name: str, block: str, blocks: tuple[int, int, int, int],
                    b2_blocks: tuple[int, int], b1_blocks: int,
                    b3: bool = False) -> ArchSpec:
    """torchvision ResNet, Table 4: stages of 64/128/256/512 planes (conv2_x..conv5_x);
    B2 forks after conv3_x, B1 after conv4_x with 1024 planes; optional B3 (ResNet-18
    ablation) after conv2_x with one block per stage (our reconstruction)."""
    optional = ()
    if b3:
        optional = (
            Branch(
                "b3",
                fork="stage1",
                stages=(
                    Stage("stage2", 128, 1, 2),
                    Stage("stage3", 256, 1, 2),
                    Stage("stage4", 512, 1, 2),
                ),
            ),
        )
    return ArchSpec(
        name=name,
        block=block,
        stem="imagenet",
        stem_filters=64,
        stages=(
            Stage("stage1", 64, blocks[0], 1),  # conv2_x, 56x56 (after the max pool)
            Stage("stage2", 128, blocks[1], 2),  # conv3_x, 28x28
            Stage("stage3", 256, blocks[2], 2),  # conv4_x, 14x14
            Stage("stage4", 512, blocks[3], 2),  # conv5_x, 7x7
        ),
        branches=(
            Branch("b1", fork="stage3", stages=(Stage("stage4", 1024, b1_blocks, 2),)),
            Branch(
                "b2",
                fork="stage2",
                stages=(
                    Stage("stage3", 256, b2_blocks[0], 2),
                    Stage("stage4", 512, b2_blocks[1], 2),
                ),
            ),
        ),
        optional_branches=optional,
        input_shape=(224, 224, 3),
    )


def mobilenet_reid(name: str = "mobilenet_reid") -> ArchSpec:
    """MobileNet v1 for person re-identification, Table 5 (input 256x128).

    The table's common stem is our stem (conv3x3/2 32) plus stages 1-3 (dw32/1 pw64;
    dw64/2 pw128, dw128/1 pw128; dw128/2 pw256, dw256/1 pw256), so B2 forks at "stage3".
    B0: stage4 (dw256/2 pw512, 5x dw512/1 pw512), stage5 (dw512/2 pw1024), stage6
    (dw1024/2 pw1024, stride 2 as the table prints it). B1 forks after stage4.
    """
    return ArchSpec(
        name=name,
        block="separable",
        stem="mobilenet",
        stem_filters=32,
        stages=(
            Stage("stage1", 64, 1, 1),  # 128x64
            Stage("stage2", 128, 2, 2),  # 64x32
            Stage("stage3", 256, 2, 2),  # 32x16: end of the common stem
            Stage("stage4", 512, 6, 2),  # 16x8
            Stage("stage5", 1024, 1, 2),  # 8x4
            Stage("stage6", 1024, 1, 2),  # 4x2
        ),
        branches=(
            Branch(
                "b1",
                fork="stage4",
                stages=(Stage("stage5", 2048, 1, 2), Stage("stage6", 2048, 1, 2)),
            ),
            Branch(
                "b2",
                fork="stage3",
                stages=(
                    Stage("stage4", 512, 1, 2),
                    Stage("stage5", 1024, 1, 2),
                    Stage("stage6", 1024, 1, 2),
                ),
            ),
        ),
        input_shape=(256, 128, 3),
    )


def _with_all_branches(spec: ArchSpec, name: str) -> ArchSpec:
    """`spec` under another name with its optional branches built by default."""
    return dataclasses.replace(
        spec, name=name, branches=spec.branches + spec.optional_branches, optional_branches=()
    )


_RESNET18 = imagenet_resnet("resnet18", "basic", (2, 2, 2, 2), (1, 2), 2, b3=True)

SPECS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        cifar_resnet("resnet32", 5, (5, 3), 5),
        cifar_resnet("resnet110", 18, (9, 9), 18),
        cifar_resnet("resnet1202", 200, (100, 100), 200),
        wide_resnet("wrn_16_8", 2, 8, (2, 1), 2),
        wide_resnet("wrn_28_10", 4, 10, (4, 2), 4),
        densenet("densenet_40_12", 12, 12, (12, 6), 12),
        densenet("densenet_100_12", 32, 12, (16, 16), 32),
        densenet("densenet_bc_100_12", 16, 12, (16, 16), 32, bottleneck=True,
                 compression=0.5, stem_filters=24),
        _RESNET18,
        _with_all_branches(_RESNET18, "resnet18_b3"),
        imagenet_resnet("resnet34", "basic", (3, 4, 6, 3), (3, 2), 3),
        imagenet_resnet("resnet50", "bottleneck", (3, 4, 6, 3), (3, 2), 3),
        imagenet_resnet("resnet101", "bottleneck", (3, 4, 23, 3), (12, 2), 3),
        imagenet_resnet("resnet152", "bottleneck", (3, 8, 36, 3), (18, 2), 3),
        mobilenet_reid(),
    )
}


def available_models() -> list[str]:
    return sorted(SPECS)


def get_spec(name: str) -> ArchSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; known models: {', '.join(available_models())}"
        ) from None


def resolve(name: str, **overrides) -> ArchSpec:
    """The spec that `build(name, ..., **overrides)` builds: one owner for what a
    configuration's network is, for the builder and for code that must agree
    with it layer for layer (the checkpoint importer)."""
    return with_overrides(get_spec(name), **overrides)


# ----------------------------------------------------------------------------- overrides

# Override keys that are not ArchSpec fields, with their meaning.
DERIVED_OVERRIDES = {
    "blocks_per_stage": "int or one int per backbone stage: backbone block counts",
    "branch_blocks": "int (every branch stage) or {branch: int | one int per stage}",
}
_NOT_OVERRIDABLE = {"name"}


def override_keys(spec: ArchSpec) -> list[str]:
    fields = [f.name for f in dataclasses.fields(ArchSpec) if f.name not in _NOT_OVERRIDABLE]
    return sorted({*fields, *DERIVED_OVERRIDES, *spec.options})


def _counts(value, n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral):
        return (int(value),) * n
    counts = tuple(int(v) for v in value)
    if len(counts) != n:
        raise ValueError(f"{what}: expected {n} block counts, got {len(counts)}")
    return counts


def _with_blocks(stages: Sequence[Stage], value, what: str) -> tuple[Stage, ...]:
    counts = _counts(value, len(stages), what)
    return tuple(dataclasses.replace(s, blocks=c) for s, c in zip(stages, counts))


def _select_branches(spec: ArchSpec, value) -> tuple[Branch, ...]:
    """`branches` override: names select among defined branches; Branch objects replace."""
    value = (value,) if isinstance(value, (str, Branch)) else tuple(value)
    if all(isinstance(v, Branch) for v in value):
        return value
    pool = {b.name: b for b in spec.branches + spec.optional_branches}
    unknown = [v for v in value if v not in pool]
    if unknown:
        raise ValueError(
            f"{spec.name}: unknown branches {unknown}; defined: {sorted(pool)}"
        )
    return tuple(b for b in spec.branches + spec.optional_branches if b.name in value)


def with_overrides(spec: ArchSpec, **overrides) -> ArchSpec:
    """A copy of `spec` with overrides applied; unknown keys are an error, never ignored."""
    valid = override_keys(spec)
    for key in overrides:
        if key not in valid:
            raise ValueError(
                f"Unknown override {key!r} for {spec.name}; valid keys: {', '.join(valid)}"
            )
    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    changes: dict[str, Any] = {}
    block_options = spec.options
    if "block_options" in overrides:  # a whole new set first, single options on top
        value = overrides["block_options"]
        block_options = dict(value.items() if isinstance(value, Mapping) else value)
    for key, value in overrides.items():
        if key in ("block_options", "branch_blocks"):
            continue  # block_options: done above; branch_blocks: after `branches`
        if key == "branches":
            changes["branches"] = _select_branches(spec, value)
            changes["optional_branches"] = ()
        elif key == "blocks_per_stage":
            changes["stages"] = _with_blocks(spec.stages, value, key)
        elif key in fields:
            changes[key] = tuple(value) if key == "input_shape" else value
        else:
            block_options[key] = value
    changes["block_options"] = block_options
    spec = dataclasses.replace(spec, **changes)

    if "branch_blocks" in overrides:
        value = overrides["branch_blocks"]
        per_branch = value if isinstance(value, Mapping) else {b.name: value for b in spec.branches}
        names = {b.name for b in spec.branches}
        unknown = sorted(set(per_branch) - names)
        if unknown:
            raise ValueError(f"branch_blocks: unknown branches {unknown}; built: {sorted(names)}")
        spec = dataclasses.replace(
            spec,
            branches=tuple(
                dataclasses.replace(
                    b, stages=_with_blocks(b.stages, per_branch[b.name], f"branch_blocks[{b.name}]")
                )
                if b.name in per_branch
                else b
                for b in spec.branches
            ),
        )
    return spec
