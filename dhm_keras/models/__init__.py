"""DHM backbones with auxiliary branches: architecture specs (data) and one builder."""

from dhm_keras.models.builder import (
    MAIN_HEAD,
    MODES,
    branch_layers,
    branch_prefix,
    build,
    build_from_spec,
    ensure_recursion_limit,
    head_names,
    head_of_layer,
)
from dhm_keras.models.layers import ChannelZeroPad, PaddedMaxPooling2D
from dhm_keras.models.specs import (
    ArchSpec,
    Branch,
    Stage,
    available_models,
    get_spec,
    with_overrides,
)

__all__ = [
    "ArchSpec",
    "Branch",
    "ChannelZeroPad",
    "MAIN_HEAD",
    "MODES",
    "PaddedMaxPooling2D",
    "Stage",
    "available_models",
    "branch_layers",
    "branch_prefix",
    "build",
    "build_from_spec",
    "ensure_recursion_limit",
    "get_spec",
    "head_names",
    "head_of_layer",
    "with_overrides",
]
