"""Kernel-correlation heatmaps between a side branch and the main branch (Appendix H).

Supplement, Appendix H: "take the maximum from each 3 x 3 kernel of the middle layer in
the residual blocks and normalize them across channels and filters. Then the correlation
matrices are calculated between the corresponding convolutional layers from these two
branches" (Fig. 3: x = input channel, y = output channel; DHM should correlate more
than DSL). The seed gives no formula; this module's exact definition:

1. Max: for a Keras conv kernel W of shape [kh, kw, C_in, C_out],
   ``M[i, o] = max_{u, v} W[u, v, i, o]`` (the signed maximum, not of |W|), a
   [C_in, C_out] matrix.
2. Normalise across channels and filters: one z-score over ALL C_in * C_out entries,
   ``Z = (M - mean(M)) / std(M)`` with the population std (ddof=0). A constant M
   (std 0) gives Z = 0.
3. Correlation map of a pair (main layer A, branch layer B):
   ``R[i, o] = Z_A[i, o] * Z_B[i, o]`` -- each kernel's contribution to the Pearson
   correlation: ``mean(R)`` IS the Pearson correlation coefficient r between the
   flattened max matrices M_A and M_B, in [-1, 1]. The heatmap shows R (x: input
   channel i, y: output channel o); the summary JSON gives r ("pearson", the number
   to compare DSL against DHM) and mean(|R|) per pair.

Pairing rule (from the builder's naming, `dhm_keras.models.builder`): a branch stage
that mirrors a backbone stage carries the backbone stage's name behind the branch
prefix, so branch layer ``bK_<name>`` corresponds to main-branch layer ``<name>`` (the
same stage, block index and position in the block: ``b2_stage3_block9_conv2`` <->
``stage3_block9_conv2``, i.e. conv4_10 of ResNet-152 in the paper's numbering). A pair
is kept when both layers are `keras.layers.Conv2D` (depthwise convolutions excluded) with
a ``kernel_size`` x ``kernel_size`` kernel (3 by default) and identical kernel shapes.
Layers of a wider branch stage (CIFAR ResNet B1's 128-wide conv4_x, DenseNet B1's 3k
growth) or with different input widths have no counterpart of the same shape and are
listed as skipped. For bottleneck ResNets the only 3x3 conv of a block is its middle
layer ``conv2``, which is exactly the paper's choice; basic blocks contribute both.

Usage:

    python -m dhm_keras.analysis.correlation --model_dir=MODEL_DIR \
        [--checkpoint=epoch_164.weights.h5] [--output_dir=DIR] [--branch=b2] \
        [--layers=REGEX] [--kernel_size=3] [--vmax=4] [--no_heatmaps]
    python -m dhm_keras.analysis.correlation --gin_file=gin/cifar100/resnet32_dhm.gin \
        --checkpoint=/path/epoch_164.weights.h5 --output_dir=DIR

``--model_dir`` reads ``MODEL_DIR/operative_config.gin`` (the bindings the run used) and,
by default, its latest checkpoint; ``--gin_file``/``--gin_param`` replace or extend the
configuration. Writes ``<branch layer>.png`` per pair and ``summary.json`` to
``--output_dir`` (default ``MODEL_DIR/analysis/correlation_<checkpoint name>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Iterable, List, Optional, Sequence

import numpy as np

from dhm_keras import heads as heads_lib

DEFINITION = (
    "M = max over the kh x kw positions of each kernel W[:, :, i, o] -> [in, out]; "
    "Z = (M - mean(M)) / std(M) over all in*out entries (population std); "
    "map R = Z_main * Z_branch elementwise (x: input channel, y: output channel); "
    "pearson = mean(R) = Pearson r of the two max matrices; mean_abs = mean(|R|)"
)


# ----------------------------------------------------------------------------- the math


def kernel_max(kernel: np.ndarray) -> np.ndarray:
    """[kh, kw, in, out] conv kernel -> [in, out] maximum over the spatial positions."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"expected a [kh, kw, in, out] kernel, got shape {kernel.shape}")
    return kernel.max(axis=(0, 1))


def normalise(matrix: np.ndarray) -> np.ndarray:
    """Z-score over all entries (across channels and filters); population std."""
    matrix = np.asarray(matrix, dtype=np.float64)
    centred = matrix - matrix.mean()
    std = centred.std()
    return np.zeros_like(centred) if std == 0.0 else centred / std


def kernel_correlation(main_kernel: np.ndarray, branch_kernel: np.ndarray) -> np.ndarray:
    """Correlation map R [in, out] of two conv kernels of the same shape.

    ``R = normalise(kernel_max(main)) * normalise(kernel_max(branch))``; its mean is
    the Pearson correlation between the two [in, out] max matrices. See the module
    docstring for the definition.
    """
    main_kernel = np.asarray(main_kernel)
    branch_kernel = np.asarray(branch_kernel)
    if main_kernel.shape != branch_kernel.shape:
        raise ValueError(
            f"kernel shapes differ: main {main_kernel.shape} vs branch {branch_kernel.shape}"
        )
    return normalise(kernel_max(main_kernel)) * normalise(kernel_max(branch_kernel))


def summarise(correlation_map: np.ndarray) -> dict:
    """The pair's numbers: Pearson r (= mean of the map) and mean |map|."""
    return {
        "pearson": float(np.mean(correlation_map)),
        "mean_abs": float(np.mean(np.abs(correlation_map))),
    }


# ----------------------------------------------------------------------------- pairing


def _is_square_conv(layer, kernel_size: int) -> bool:
    import keras

    return isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel_size) == (
        kernel_size,
        kernel_size,
    )


def conv_pairs(network, branches: Optional[Iterable[str]] = None,
               layers: Optional[str] = None, kernel_size: int = 3):
    """Corresponding (branch, main) conv layers of a built multi-head network.

    Args:
      network: functional model built by `dhm_keras.models.build` (dsl/dhm mode).
      branches: auxiliary heads to pair with b0 (default: every one present).
      layers: optional regex searched in the MAIN layer name (``stage3_block(0|9)_``).
      kernel_size: spatial size of the kernels to pair (3 = the paper's 3x3 layers).

    Returns:
      (pairs, skipped): pairs as dicts {branch, branch_layer, main_layer}, in layer
      order; skipped as dicts {branch, branch_layer, main_layer, reason}.
    """
    wanted = set(branches) if branches else None
    pattern = re.compile(layers) if layers else None
    by_name = {layer.name: layer for layer in network.layers}
    pairs, skipped = [], []
    for layer in network.layers:
        head = heads_lib.head_of_layer(layer.name)
        if head == heads_lib.MAIN or (wanted is not None and head not in wanted):
            continue
        if not _is_square_conv(layer, kernel_size):
            continue
        main_name = layer.name[len(heads_lib.layer_prefix(head)):]
        if pattern is not None and not pattern.search(main_name):
            continue
        entry = {"branch": head, "branch_layer": layer.name, "main_layer": main_name}
        main = by_name.get(main_name)
        if main is None:
            skipped.append({**entry, "reason": "no main-branch layer of that name"})
        elif not _is_square_conv(main, kernel_size):
            skipped.append({**entry, "reason": f"main layer is not a {kernel_size}x{kernel_size} Conv2D"})
        elif tuple(main.kernel.shape) != tuple(layer.kernel.shape):
            skipped.append({
                **entry,
                "reason": f"kernel shapes differ: main {tuple(main.kernel.shape)} "
                f"vs branch {tuple(layer.kernel.shape)}",
            })
        else:
            pairs.append(entry)
    if wanted is not None:
        present = {heads_lib.head_of_layer(layer.name) for layer in network.layers}
        missing = sorted(wanted - present)
        if missing:
            raise ValueError(f"network has no branch {missing}")
    return pairs, skipped


def correlate_network(network, branches=None, layers=None, kernel_size: int = 3):
    """Every pair's map and numbers: (results, skipped); results carry a "map" array."""
    pairs, skipped = conv_pairs(network, branches, layers, kernel_size)
    results = []
    for pair in pairs:
        main_kernel = np.asarray(network.get_layer(pair["main_layer"]).kernel.numpy())
        branch_kernel = np.asarray(network.get_layer(pair["branch_layer"]).kernel.numpy())
        corr = kernel_correlation(main_kernel, branch_kernel)
        results.append({**pair, "shape": list(main_kernel.shape), **summarise(corr), "map": corr})
    return results, skipped


# ----------------------------------------------------------------------------- model loading


def _num_classes_from_checkpoint(path: str) -> Optional[int]:
    """Class count from a ``.weights.h5`` file: the bias length of its Dense layers.

    In Keras 3 weight files layers are keyed by class-derived names (``dense``,
    ``dense_1``, ...); every Dense layer the builder makes is a head classifier, and
    all heads share the class count. Returns None if that cannot be established.
    """
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py ships with Keras
        return None
    sizes = set()

    def visit(name, obj):
        parts = name.split("/")
        if (isinstance(obj, h5py.Dataset) and len(parts) >= 3 and parts[-2] == "vars"
                and parts[-1] == "1" and re.fullmatch(r"dense(_\d+)?", parts[-3])):
            sizes.add(int(obj.shape[0]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return sizes.pop() if len(sizes) == 1 else None


def resolve_checkpoint(model_dir: Optional[str], checkpoint: Optional[str]) -> str:
    """An existing checkpoint path: as given, else under MODEL_DIR/checkpoints, else
    the latest one of the model directory."""
    if checkpoint:
        candidates = [checkpoint]
        if model_dir:
            candidates.append(os.path.join(model_dir, "checkpoints", checkpoint))
        for path in candidates:
            if os.path.exists(path):
                return path
        raise FileNotFoundError(f"checkpoint not found: {' or '.join(candidates)}")
    if not model_dir:
        raise ValueError("give --checkpoint (or --model_dir to use its latest checkpoint)")
    from dhm_keras import model_dir as model_dir_lib

    latest = model_dir_lib.latest_checkpoint(model_dir)
    if not latest:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(model_dir, 'checkpoints')}")
    return latest


def load_network(model_dir: Optional[str] = None, gin_files: Sequence[str] = (),
                 gin_params: Sequence[str] = (), checkpoint: Optional[str] = None,
                 num_classes: Optional[int] = None, data_dir: Optional[str] = None):
    """Builds a run's network from its Gin configuration and loads a checkpoint.

    The configuration is ``MODEL_DIR/operative_config.gin`` unless `gin_files` are
    given; `gin_params` are applied on top. This CLEARS the global Gin configuration
    first. The class count comes from `num_classes`, else ``model.num_classes``, else
    the checkpoint's classifiers, else the dataset's TFDS metadata. Returns (network, checkpoint_path, info dict).
    """
    import dataclasses

    import gin

    from dhm_keras import experiment, tasks
    from dhm_keras.gin_utils import parse_gin
    from dhm_keras.model import DHMModel

    files = list(gin_files)
    if not files:
        if not model_dir:
            raise ValueError("give --model_dir (its operative_config.gin) or --gin_file")
        files = [os.path.join(model_dir, "operative_config.gin")]
    gin.clear_config()
    parse_gin(files, list(gin_params))
    config = experiment.from_gin(data_dir)

    checkpoint = resolve_checkpoint(model_dir, checkpoint)
    model_cfg = config.model
    if model_cfg.mode == "baseline":
        raise ValueError("a baseline run has no side branches to correlate (use dsl or dhm)")
    if num_classes is None:
        num_classes = model_cfg.num_classes  # model.num_classes, if bound
    if num_classes is None:
        num_classes = _num_classes_from_checkpoint(checkpoint)
    # The run's own task builds the network (every model.* knob applies). The
    # class count given or read from the checkpoint spares reading the dataset;
    # conv kernels do not depend on the image size, so without
    # dataset.image_size the architecture's default input shape serves.
    task = tasks.get_task(dataclasses.replace(config, model=dataclasses.replace(model_cfg, num_classes=None)))
    image_shape = (*config.dataset.image_size, 3) if config.dataset.image_size else None
    network = task.build_network(image_shape, num_classes=num_classes)
    model = DHMModel(network, mode=model_cfg.mode, bernoulli_p=config.mimicking.bernoulli_p)
    model.load_weights(checkpoint)
    info = {"model": model_cfg.name, "mode": model_cfg.mode, "dataset": config.dataset.name,
            "num_classes": int(network.output[heads_lib.MAIN].shape[-1])}
    return network, checkpoint, info


# ----------------------------------------------------------------------------- output


def save_heatmap(correlation_map: np.ndarray, path: str, title: str, vmax: float = 4.0) -> None:
    """PNG heatmap of R: x = input channel, y = output channel, fixed colour range
    [-vmax, vmax] so that heatmaps of different runs are comparable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    in_channels, out_channels = correlation_map.shape
    width = min(10.0, max(4.0, 2.0 + in_channels / 16.0))
    height = min(10.0, max(3.5, 1.5 + out_channels / 16.0))
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        image = ax.imshow(
            correlation_map.T, origin="lower", aspect="auto", cmap="RdBu_r",
            vmin=-vmax, vmax=vmax, interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, label="z_main * z_branch")
        ax.set_xlabel("input channel")
        ax.set_ylabel("output channel")
        ax.set_title(title, fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def write_outputs(results: List[dict], skipped: List[dict], output_dir: str, info: dict,
                  heatmaps: bool = True, vmax: float = 4.0) -> dict:
    """Heatmap PNGs (one per pair) and summary.json; returns the summary."""
    os.makedirs(output_dir, exist_ok=True)
    pairs = []
    for result in results:
        entry = {k: v for k, v in result.items() if k != "map"}
        if heatmaps:
            name = f"{result['branch_layer']}.png"
            save_heatmap(
                result["map"],
                os.path.join(output_dir, name),
                f"{result['branch_layer']} vs {result['main_layer']}: r = {result['pearson']:.3f}",
                vmax,
            )
            entry["heatmap"] = name
        pairs.append(entry)
    per_branch = {}
    for branch in sorted({p["branch"] for p in pairs}):
        values = [p["pearson"] for p in pairs if p["branch"] == branch]
        per_branch[branch] = float(np.mean(values))
    summary = {
        **info,
        "definition": DEFINITION,
        "num_pairs": len(pairs),
        "mean_pearson": per_branch,
        "mean_pearson_all": float(np.mean([p["pearson"] for p in pairs])) if pairs else None,
        "pairs": pairs,
        "skipped": skipped,
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(_finite(summary), f, indent=2)
    return summary


def _finite(value):
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(args) -> dict:
    network, checkpoint, info = load_network(
        args.model_dir, args.gin_file or (), args.gin_param or (), args.checkpoint,
        args.num_classes, args.data_dir,
    )
    output_dir = args.output_dir
    if not output_dir:
        if not args.model_dir:
            raise ValueError("give --output_dir")
        stem = os.path.basename(checkpoint).split(".")[0]
        output_dir = os.path.join(args.model_dir, "analysis", f"correlation_{stem}")
    results, skipped = correlate_network(network, args.branch, args.layers, args.kernel_size)
    if not results:
        raise ValueError(
            f"no corresponding {args.kernel_size}x{args.kernel_size} conv layers between a "
            f"branch and the main branch ({len(skipped)} skipped); see the pairing rule"
        )
    return write_outputs(results, skipped, output_dir, {**info, "checkpoint": checkpoint},
                         heatmaps=not args.no_heatmaps, vmax=args.vmax) | {"output_dir": output_dir}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dhm_keras.analysis.correlation",
        description="Appendix H kernel-correlation heatmaps between side and main branch.",
    )
    parser.add_argument("--model_dir", help="run directory (operative_config.gin, checkpoints/)")
    parser.add_argument("--gin_file", action="append", help="Gin file(s) instead of the run's")
    parser.add_argument("--gin_param", action="append", help="extra Gin binding(s)")
    parser.add_argument("--checkpoint", help="weights file (a path, or a name in MODEL_DIR/checkpoints)")
    parser.add_argument("--output_dir", help="default MODEL_DIR/analysis/correlation_<checkpoint>")
    parser.add_argument("--branch", action="append", help="branch(es) to pair with b0; default all")
    parser.add_argument("--layers", help="regex searched in main-branch layer names")
    parser.add_argument("--kernel_size", type=int, default=3)
    parser.add_argument("--num_classes", type=int, help="default: from the checkpoint")
    parser.add_argument("--data_dir", help="TFDS data_dir (only if the class count is unknown)")
    parser.add_argument("--vmax", type=float, default=4.0, help="heatmap colour range +-vmax")
    parser.add_argument("--no_heatmaps", action="store_true", help="write summary.json only")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    for pair in summary["pairs"]:
        print(f"{pair['branch_layer']:>32s} vs {pair['main_layer']:<30s} r = {pair['pearson']:+.4f}")
    print(f"mean r per branch: {json.dumps(summary['mean_pearson'])}; "
          f"{len(summary['skipped'])} layer(s) without a counterpart")
    print(f"wrote {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
