"""The authors' PyTorch checkpoints, read into this project's networks.

Why: the authors released ImageNet ResNets trained with their PyTorch code
(d-li14/DHM), and anyone who trained with their CIFAR script holds CIFAR
checkpoints; without this, every model would have to be trained again here
before it could be evaluated or served with TensorFlow.

How the names are matched. Nothing here lists the tensors of a model: the
Keras layer names follow one contract (`dhm_keras.models.blocks`):
``[bK_]stage<s>_block<i>_<part>``, ``[bK_]stage<s>_transition_<part>``,
``stem_<part>``, ``<head>_classifier``, ``<head>_final_bn``; the reference's
modules follow another: ``layer<s>[_head<K>].<i>.<part>``,
``transition<s>[_head<K>].<part>``, ``fc[_head<K>]``, ``bn[_head<K>]``. One
translation between them serves every architecture; what differs between
the reference's model files (the stem's module names, a few renamed block
parts) is one entry per block family in `REFERENCE_NAMING`. Which tensors a
network needs is whatever its built layers hold, so the block counts and
branches of the architecture specs drive the mapping.

Tensor layouts: PyTorch convolutions are (out, in, kh, kw), Keras' are
(kh, kw, in, out); linear layers are (out, in) against Keras' (in, out);
BatchNorm weight/bias/running_mean/running_var are Keras' gamma/beta/
moving_mean/moving_variance (both use the reference's epsilon, 1e-5).

PyTorch is imported by `read_checkpoint` only, and only when it runs:
training and serving never need it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from dhm_keras import errors
from dhm_keras import heads as heads_lib

TORCH_MISSING = (
    "PyTorch is not installed, and it is needed to read a .pth checkpoint (and only for that): "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu (the CPU build is enough; "
    "or the project's [torch] extra, pip install -e '.[torch]' in the clone)"
)


CheckpointImportError = errors.CheckpointImportError


@dataclasses.dataclass(frozen=True)
class ReferenceCheckpoint:
    """What a reference checkpoint file holds, PyTorch stripped away.

    `tensors`: the state dict as float32 NumPy arrays, `DataParallel`'s
    ``module.`` prefixes removed and BatchNorm's ``num_batches_tracked``
    counters dropped (this trainer keeps no such counter). `metadata`: the
    plain values saved beside it by the reference's `save_checkpoint`
    (``epoch``, ``best_prec1``, ``arch``), where present.
    """

    path: str
    tensors: Mapping[str, np.ndarray]
    metadata: Mapping[str, object]

    @property
    def arch(self) -> Optional[str]:
        arch = self.metadata.get("arch")
        return arch if isinstance(arch, str) else None


@dataclasses.dataclass(frozen=True)
class ReferenceNaming:
    """How one block family of the reference names its modules.

    `stem`: this project's stem layer suffix -> the reference's module
    (``stem_conv`` -> ``conv1``). `parts`: a block part whose name differs
    (``shortcut_conv`` -> ``downsample.0``); parts not listed keep their
    name (``conv1``, ``bn2``).
    """

    stem: Mapping[str, str]
    parts: Mapping[str, str] = dataclasses.field(default_factory=dict)


# The reference's networks have two auxiliary heads (fc_head1, fc_head2).
REFERENCE_BRANCHES = 2

_TORCHVISION_PARTS = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}

# Block family (ArchSpec.block) -> the reference's names. The reference
# defines no MobileNet, so `mobilenet_reid` has no entry.
REFERENCE_NAMING: Dict[str, ReferenceNaming] = {
    # models/cifar/resnet.py: parameter-free shortcut.
    "cifar_basic": ReferenceNaming(stem={"conv": "conv1", "bn": "bn1"}),
    # models/cifar/wrn.py: a bare `conv` stem; the 1x1 projection is `shortcut`.
    "preact": ReferenceNaming(stem={"conv": "conv"}, parts={"shortcut_conv": "shortcut"}),
    # models/imagenet/resnet.py: torchvision's names.
    "basic": ReferenceNaming(stem={"conv": "conv1", "bn": "bn1"}, parts=_TORCHVISION_PARTS),
    "bottleneck": ReferenceNaming(stem={"conv": "conv1", "bn": "bn1"}, parts=_TORCHVISION_PARTS),
    # models/cifar/densenet.py: a basic dense layer is `bn` + `conv`; a
    # bottleneck (BC) layer keeps bn1/conv1/bn2/conv2 (`naming_for` picks).
    "dense": ReferenceNaming(stem={"conv": "conv1"}, parts={"bn1": "bn", "conv1": "conv"}),
    "dense_bc": ReferenceNaming(stem={"conv": "conv1"}),
}

# Keras variable name -> the reference's tensor name within the module.
_TENSOR_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}

_BLOCK_LAYER = re.compile(r"^stage(\d+)_block(\d+)_(.+)$")
_TRANSITION_LAYER = re.compile(r"^stage(\d+)_transition_(.+)$")
_HEAD_LAYER = re.compile(r"^(classifier|final_bn)$")


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str) -> ReferenceCheckpoint:
    """Reads a ``.pth`` / ``.pth.tar`` file as the reference scripts write it.

    Accepted: a bare state dict, or a dict holding one under ``state_dict``
    (the reference's `save_checkpoint`, with ``epoch``, ``best_prec1``,
    ``optimizer``, ``arch``). Only tensors and plain values are unpickled
    (``weights_only``): a checkpoint file can otherwise run arbitrary code.
    """
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise CheckpointImportError(TORCH_MISSING) from e
    try:
        with warnings.catch_warnings():  # torch's pickle warnings would add lines to a one-line error
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointImportError(f"--checkpoint={path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointImportError(
            f"--checkpoint={path} is a directory; --mode=import reads a PyTorch .pth/.pth.tar file"
        ) from None
    except Exception as e:  # pickle, zip and torch errors of every kind
        raise CheckpointImportError(f"{path} {_why_unreadable(e)}") from e
    state, metadata = _split(saved, path, torch)
    tensors = {}
    for key, value in state.items():
        name = _strip_parallel_prefix(key)
        if name.endswith("num_batches_tracked"):
            continue  # BatchNorm's step counter: nothing here uses it
        if name in tensors:
            raise CheckpointImportError(
                f"{path} holds {name!r} twice (once as {key!r}): with the DataParallel prefix "
                "'module.' removed, two tensors claim one place"
            )
        tensors[name] = _as_array(value, name, path, torch)
    return ReferenceCheckpoint(path, tensors, metadata)


def _as_array(value, key: str, path: str, torch) -> np.ndarray:
    """A dense, finite float32 copy of one tensor, or a `CheckpointImportError`."""
    if value.layout != torch.strided or value.is_quantized or not (
        value.is_floating_point() or value.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
    ):
        raise CheckpointImportError(
            f"{path}: {key} is a {value.dtype} tensor in {value.layout} layout{' (quantized)' if value.is_quantized else ''}; "
            "only dense real-valued tensors, as the reference code saves them, can be imported"
        )
    array = value.detach().to(torch.float32).cpu().numpy()
    if not np.all(np.isfinite(array)):
        raise CheckpointImportError(
            f"{path}: {key} holds NaN or infinite values ({int(np.sum(~np.isfinite(array)))} of "
            f"{array.size}): the network it came from is broken; import an earlier checkpoint"
        )
    return array


def _why_unreadable(error: BaseException) -> str:
    """Our words for why `torch.load(weights_only=True)` refused a file (its own
    message ends in advice to load unsafely, which we do not give)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(error).split()))
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return (
            f"holds Python objects besides tensors and plain values ({unsafe.group(1)}); such a file "
            "can run code when loaded, so it is not read. Save model.state_dict() (or the reference's "
            "save_checkpoint dict) and import that"
        )
    unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if unpickler:  # the reason, without torch's advice to load unsafely around it
        text = unpickler.group(1)
    else:
        text = text.split(". ")[0] or ("the file is empty" if isinstance(error, EOFError) else type(error).__name__)
    return (
        f"is not a PyTorch checkpoint, or a damaged one ({text[:160]}); --mode=import reads the "
        ".pth/.pth.tar files of the reference code (torch.save of a state_dict, or of a dict "
        "holding one under 'state_dict')"
    )


def _split(saved, path: str, torch) -> Tuple[Mapping, Dict[str, object]]:
    """(state dict, metadata) of what `torch.load` returned."""
    is_state = lambda d: isinstance(d, Mapping) and d and all(  # noqa: E731
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
    )
    if is_state(saved):
        return saved, {}
    if isinstance(saved, Mapping) and is_state(saved.get("state_dict")):
        metadata = {}
        for key in ("epoch", "best_prec1", "arch"):
            value = saved.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float, str)):
                metadata[key] = value
        return saved["state_dict"], metadata
    what = (
        f"a dict with keys {sorted(map(str, saved))[:8]}" if isinstance(saved, Mapping) else type(saved).__name__
    )
    raise CheckpointImportError(
        f"{path} holds {what}, not a state dict: --mode=import reads a torch.save of "
        "model.state_dict(), or of a dict holding it under 'state_dict' (the reference's save_checkpoint)"
    )


def _strip_parallel_prefix(key: str) -> str:
    while key.startswith("module."):  # DataParallel / DistributedDataParallel (possibly nested)
        key = key[len("module."):]
    return key


# ----------------------------------------------------------------------------- names


def naming_for(spec) -> ReferenceNaming:
    """The reference's naming for `spec`, or a `CheckpointImportError` for a
    network the reference does not define (MobileNet, ResNet-18's B3)."""
    bottleneck_dense = spec.block == "dense" and spec.options.get("bottleneck", False)
    naming = REFERENCE_NAMING.get("dense_bc" if bottleneck_dense else spec.block)
    extra = [b.name for b in spec.branches if heads_lib.index(b.name) > REFERENCE_BRANCHES]
    if naming is None or extra:
        what = f"block type {spec.block!r}" if naming is None else f"branch {', '.join(extra)}"
        raise CheckpointImportError(
            f"the reference code defines no {spec.name} with {what}, so it has no checkpoint to import; "
            f"--mode=import knows {', '.join(importable_models())} (B0, B1, B2)"
        )
    return naming


def reference_module(layer_name: str, spec) -> str:
    """The reference's module path for this project's layer `layer_name`."""
    naming = naming_for(spec)
    head = heads_lib.head_of_layer(layer_name)
    suffix = "" if head == heads_lib.MAIN else f"_head{heads_lib.index(head)}"
    rest = layer_name[len(heads_lib.layer_prefix(head)):] if head != heads_lib.MAIN else layer_name
    if rest.startswith(f"{heads_lib.MAIN}_"):  # b0's own head layers: b0_classifier, b0_final_bn
        rest = rest[len(heads_lib.MAIN) + 1:]
    match = _HEAD_LAYER.match(rest)
    if match:
        return ("fc" if match.group(1) == "classifier" else "bn") + suffix
    if rest.startswith("stem_") and rest[len("stem_"):] in naming.stem:
        return naming.stem[rest[len("stem_"):]]
    match = _BLOCK_LAYER.match(rest)
    if match:
        stage, block, part = match.groups()
        return f"layer{int(stage)}{suffix}.{int(block)}.{naming.parts.get(part, part)}"
    match = _TRANSITION_LAYER.match(rest)
    if match:
        stage, part = match.groups()
        return f"transition{int(stage)}{suffix}.{part}"
    raise CheckpointImportError(f"{spec.name}: layer {layer_name!r} has no counterpart in the reference code")


def reference_tensors(network, spec) -> Dict[str, Tuple[object, str]]:
    """{reference tensor key: (Keras variable, layer name)} for every weight of `network`."""
    wanted = {}
    for layer in network.layers:
        for variable in layer.weights:
            name = variable.name.split("/")[-1]
            if name not in _TENSOR_NAMES:
                raise CheckpointImportError(
                    f"{spec.name}: variable {variable.path} of layer {layer.name} has no reference counterpart"
                )
            wanted[f"{reference_module(layer.name, spec)}.{_TENSOR_NAMES[name]}"] = (variable, layer.name)
    return wanted


def to_keras_layout(value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Keras layout (conv OIHW -> HWIO; linear (out, in) -> (in, out))."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return value.T
    return value


def torch_shape(keras_shape: Iterable[int]) -> Tuple[int, ...]:
    """A Keras variable's shape as the reference lays the tensor out (for messages)."""
    shape = tuple(int(d) for d in keras_shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


# ----------------------------------------------------------------------------- assigning


def assign(network, spec, checkpoint: ReferenceCheckpoint, describe: str) -> List[str]:
    """Sets every weight of `network` from `checkpoint`; returns the heads it set.

    Every tensor the network needs must be there with its shape, and every
    tensor of the checkpoint must be used: a partial import would serve a
    network that is part random. `describe` names the configuration in the
    messages ("resnet50 (dhm) with 100 classes").
    """
    wanted = reference_tensors(network, spec)
    found = checkpoint.tensors
    missing = sorted(set(wanted) - set(found), key=_natural)
    unused = sorted(set(found) - set(wanted), key=_natural)
    if missing or unused:
        branched = any(heads_lib.head_of_layer(layer) != heads_lib.MAIN for _, layer in wanted.values())
        raise CheckpointImportError(
            f"{checkpoint.path} does not fit {describe}: {_listing(missing, 'missing')}"
            f"{' and ' if missing and unused else ''}{_listing(unused, 'left over')}; "
            f"{looks_like(checkpoint, (spec.name, branched))}"
        )
    values = []
    for key, (variable, layer_name) in wanted.items():
        value = to_keras_layout(found[key])
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointImportError(
                f"{checkpoint.path}: {key} has shape {tuple(found[key].shape)} but {describe} needs "
                f"{torch_shape(variable.shape)} for {layer_name} ({_shape_hint(key, found[key].shape, variable)})"
            )
        values.append((variable, value))
    for variable, value in values:  # only once everything fits
        variable.assign(value.astype(variable.dtype))
    return heads_lib.ordered({heads_lib.head_of_layer(name) for _, name in wanted.values()})


def _shape_hint(key: str, found_shape, variable) -> str:
    if key.startswith("fc") and key.endswith(".weight"):
        return (
            f"the checkpoint predicts {found_shape[0]} classes, this configuration "
            f"{int(variable.shape[-1])}: import it with a dataset of {found_shape[0]} classes (dataset.name)"
        )
    return "another architecture or width: check model.name and model.overrides"


def _listing(keys: List[str], what: str) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:4])
    more = f", ... ({len(keys) - 4} more)" if len(keys) > 4 else ""
    return f"{len(keys)} tensor{'s' if len(keys) > 1 else ''} {what} ({shown}{more})"


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------- recognising


def importable_models() -> List[str]:
    """Architectures the reference defines: a block family it names and no
    branch it lacks (ResNet-18's B3 is this project's reconstruction)."""
    from dhm_keras.models import specs as specs_lib  # pylint: disable=import-outside-toplevel

    return sorted(
        name
        for name, spec in specs_lib.SPECS.items()
        if spec.block in REFERENCE_NAMING and all(heads_lib.index(b.name) <= REFERENCE_BRANCHES for b in spec.branches)
    )


def block_counts(keys: Iterable[str]) -> Dict[str, int]:
    """{'layer1': 5, 'layer3_head1': 5, ...}: blocks per reference stage module."""
    counts: Dict[str, int] = {}
    for key in keys:
        match = re.match(r"^(layer\d+(?:_head\d+)?)\.(\d+)\.", key)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def spec_block_counts(spec, with_branches: bool) -> Dict[str, int]:
    """`block_counts` as a reference checkpoint of `spec` would show them."""
    counts = {f"layer{int(s.name[len('stage'):])}": s.blocks for s in spec.stages}
    if with_branches:
        for branch in spec.branches:
            suffix = f"_head{heads_lib.index(branch.name)}"
            counts.update({f"layer{int(s.name[len('stage'):])}{suffix}": s.blocks for s in branch.stages})
    return counts


def looks_like(checkpoint: ReferenceCheckpoint, configured: Optional[Tuple[str, bool]] = None) -> str:
    """One clause saying which architecture the checkpoint's block counts match.

    Block counts per stage tell the reference's architectures apart except
    ResNet-34 / ResNet-50, which differ in their blocks' parts (conv3).
    `configured`: (model name, whether it has branches) of the network the
    checkpoint was meant for; when the checkpoint matches exactly that, the
    clause says so instead of naming it back.
    """
    from dhm_keras.models import specs as specs_lib  # pylint: disable=import-outside-toplevel

    counts = block_counts(checkpoint.tensors)
    has_branches = any("_head" in k.split(".")[0] for k in checkpoint.tensors)
    bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.", k) for k in checkpoint.tensors)
    def fits(spec) -> bool:
        if spec_block_counts(spec, has_branches) != counts:
            return False
        return spec.block not in ("basic", "bottleneck") or (spec.block == "bottleneck") == bottleneck

    matches = [name for name in importable_models() if fits(specs_lib.SPECS[name])]
    heads = "every head (model.mode = 'dsl' or 'dhm')" if has_branches else "the main branch only (model.mode = 'baseline')"
    stated = f"; its 'arch' entry says {checkpoint.arch!r}" if checkpoint.arch else ""
    if configured is not None and matches == [configured[0]] and has_branches == configured[1]:
        return f"its architecture and heads are the configured ones, but the tensors named differ{stated}"
    if matches:
        names = " or ".join(f"model.name = '{m}'" for m in matches)
        return f"it looks like {names} with {heads}{stated}"
    layout = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: _natural(kv[0])))
    return (
        f"it matches none of the reference's architectures ({', '.join(importable_models())}); "
        f"its blocks per stage: {layout or 'none'}{stated}"
    )
