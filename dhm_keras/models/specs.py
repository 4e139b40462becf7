"""Every architecture as data: backbone stages, fork points and branch stages.

These are the tables of the architecture spec (supplement Tables 1-5) and nothing else;
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
import re
from typing import Any, Mapping, Sequence

BRANCH_NAME = re.compile(r"^b[1-9][0-9]*$")


@dataclasses.dataclass(frozen=True)
class Stage:
    """`blocks` blocks of `filters` output width; the first block strides by `stride`."""

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
        if BRANCH_NAME.match(stage.name.split("_")[0]):
            raise ValueError(f"{spec.name}: stage name {stage.name!r} looks like a branch")
        if stage.blocks < 1 or stage.filters < 1 or stage.stride < 1:
            raise ValueError(f"{spec.name}: invalid stage {stage}")
    for branch in spec.branches + spec.optional_branches:
        if not BRANCH_NAME.match(branch.name):
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


SPECS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        cifar_resnet("resnet32", 5, (5, 3), 5),
        cifar_resnet("resnet110", 18, (9, 9), 18),
        cifar_resnet("resnet1202", 200, (100, 100), 200),
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
