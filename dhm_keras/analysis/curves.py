"""Training (solid) and validation (dashed) top-1 curves from TensorBoard logs.

The supplement's Fig. 1-2 as a command:

    python -m dhm_keras.analysis.curves \
        --run=DSL=runs/dsl_s0,runs/dsl_s1 --run=DHM=runs/dhm_s0,runs/dhm_s1 \
        --output=curves.png [--metric=top1/b0] [--band=minmax|std]

Each ``--run`` is ``LABEL=MODEL_DIR[,MODEL_DIR...]``; the model directories of one
label are seeds of one configuration. A label with several directories is drawn as
the mean over seeds with a shaded band (min-max by default, as the supplement's
"bounded by the range of 5 successive runs"; ``--band=std`` for mean +- sample std).
One colour per label; training solid, validation dashed.

What is read: the event files that ``keras.callbacks.TensorBoard`` writes under
``MODEL_DIR/logs/train`` and ``MODEL_DIR/logs/validation``. Keras 3 logs each epoch's
metric under the tag ``epoch_<metric>`` (``epoch_top1/b0``) as a TF2 tensor summary
at step = epoch index counted from 0; the curves use 1-based epochs (step + 1), as
results.json does. Validation exists only for evaluated epochs (``train.eval_every``):
the points that exist are drawn, and a seed contributes to the mean only at epochs it
logged. A resumed run writes some epochs twice; the value written last (largest
wall time) wins. A truncated final record (a killed run) is ignored.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SPLITS = ("train", "validation")
LINESTYLES = {"train": "-", "validation": "--"}


# ----------------------------------------------------------------------------- reading


def _event_files(log_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))


def _summary_value(value) -> Optional[float]:
    """The scalar of one Summary.Value: TF2 tensor summaries or TF1 simple values."""
    import tensorflow as tf

    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        array = tf.make_ndarray(value.tensor)
        if array.size == 1 and np.issubdtype(array.dtype, np.number):
            return float(array.reshape(()))
    return None


def _read_events(log_dir: str, tags: Sequence[str]) -> Dict[str, Dict[int, Tuple[float, float]]]:
    """{tag: {step: (wall_time, value)}} for the wanted tags of every event file."""
    import tensorflow as tf

    found: Dict[str, Dict[int, Tuple[float, float]]] = {}
    for path in _event_files(log_dir):
        records = iter(tf.data.TFRecordDataset(path))
        while True:
            try:
                event = tf.compat.v1.Event.FromString(next(records).numpy())
            except StopIteration:
                break
            except tf.errors.DataLossError:  # truncated last record of a killed run
                break
            for value in event.summary.value:
                if value.tag not in tags:
                    continue
                number = _summary_value(value)
                if number is None:
                    continue
                steps = found.setdefault(value.tag, {})
                previous = steps.get(event.step)
                if previous is None or event.wall_time >= previous[0]:
                    steps[event.step] = (event.wall_time, number)
    return found


def _candidate_tags(tag: str) -> List[str]:
    """``top1/b0`` -> [``epoch_top1/b0``, ``top1/b0``]; an ``epoch_`` tag is taken as is."""
    return [tag] if tag.startswith("epoch_") else [f"epoch_{tag}", tag]


def load_scalars(model_dir: str, tag: str = "top1/b0",
                 splits: Iterable[str] = SPLITS) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per-epoch values of one metric from a model directory's TensorBoard logs.

    Args:
      model_dir: a run's model directory (holding ``logs/train``, ``logs/validation``).
      tag: the metric (``top1/b0``) or the full tag (``epoch_top1/b0``).
      splits: sub-directories of ``logs`` to read.

    Returns:
      ``{split: (epochs, values)}``, epochs 1-based int arrays in increasing order and
      values float64 as logged (accuracies in [0, 1]); splits without the tag are
      left out.
    """
    result = {}
    candidates = _candidate_tags(tag)
    for split in splits:
        log_dir = os.path.join(model_dir, "logs", split)
        if not os.path.isdir(log_dir):
            continue
        found = _read_events(log_dir, candidates)
        for name in candidates:  # the first candidate present wins
            if found.get(name):
                steps = sorted(found[name])
                epochs = np.asarray(steps, dtype=np.int64) + 1
                values = np.asarray([found[name][s][1] for s in steps], dtype=np.float64)
                result[split] = (epochs, values)
                break
    return result


def aggregate(series: Sequence[Tuple[np.ndarray, np.ndarray]], band: str = "minmax"):
    """Mean over seeds per epoch with a band.

    Every epoch logged by at least one seed appears; its mean, low and high use the
    seeds that logged it. ``band="minmax"``: low/high = min/max over seeds;
    ``band="std"``: mean -/+ sample standard deviation (ddof=1; zero width for one seed).

    Returns (epochs, mean, low, high, count) as arrays.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    per_epoch: Dict[int, List[float]] = {}
    for epochs, values in series:
        for e, v in zip(epochs, values):
            per_epoch.setdefault(int(e), []).append(float(v))
    epochs = np.asarray(sorted(per_epoch), dtype=np.int64)
    mean, low, high, count = [], [], [], []
    for e in epochs:
        v = np.asarray(per_epoch[int(e)])
        m = v.mean()
        if band == "minmax":
            lo, hi = v.min(), v.max()
        else:
            s = v.std(ddof=1) if v.size > 1 else 0.0
            lo, hi = m - s, m + s
        mean.append(m), low.append(lo), high.append(hi), count.append(v.size)
    return epochs, np.asarray(mean), np.asarray(low), np.asarray(high), np.asarray(count)


# ----------------------------------------------------------------------------- plotting


def parse_run(text: str) -> Tuple[str, List[str]]:
    """``LABEL=DIR[,DIR...]`` -> (label, [dirs])."""
    label, sep, dirs = text.partition("=")
    paths = [d for d in dirs.split(",") if d]
    if not sep or not label or not paths:
        raise ValueError(f"--run must look like LABEL=MODEL_DIR[,MODEL_DIR...], got {text!r}")
    return label, paths


def _is_accuracy(metric: str) -> bool:
    name = metric[len("epoch_"):] if metric.startswith("epoch_") else metric
    return name.startswith(("top1/", "top5/", "accuracy", "top"))


def plot_curves(runs: Sequence[Tuple[str, Sequence[str]]], output: str,
                metric: str = "top1/b0", band: str = "minmax",
                title: Optional[str] = None, figsize=(8.0, 5.0), dpi: int = 100) -> dict:
    """Draws every run's train/validation curve of `metric` into the PNG `output`.

    Returns a summary ``{label: {split: {"epochs": [...], "mean": [...], "seeds": n}}}``
    of what was drawn (values in % for accuracies). Raises ValueError if no run has
    any value of the metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scale = 100.0 if _is_accuracy(metric) else 1.0
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    drawn: dict = {}
    try:
        for index, (label, model_dirs) in enumerate(runs):
            colour = colours[index % len(colours)]
            loaded = [load_scalars(d, metric) for d in model_dirs]
            for split in SPLITS:
                series = [run[split] for run in loaded if split in run]
                if not series:
                    continue
                epochs, mean, low, high, count = aggregate(series, band)
                mean, low, high = mean * scale, low * scale, high * scale
                n = len(series)
                name = f"{label} {split}" + (f" ({n} seeds)" if n > 1 else "")
                marker = "o" if (split == "validation" or len(epochs) == 1) else None
                ax.plot(epochs, mean, LINESTYLES[split], color=colour, label=name,
                        marker=marker, markersize=3)
                if n > 1:
                    ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
                drawn.setdefault(label, {})[split] = {
                    "epochs": epochs.tolist(),
                    "mean": mean.tolist(),
                    "seeds": n,
                }
        if not drawn:
            raise ValueError(
                f"no run has any value of {metric!r} under logs/train or logs/validation"
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ylabel = metric[len("epoch_"):] if metric.startswith("epoch_") else metric
        ax.set_ylabel(f"{ylabel} (%)" if scale == 100.0 else ylabel)
        ax.set_title(title or f"{ylabel}: training (solid) and validation (dashed)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        fig.savefig(output, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return drawn


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dhm_keras.analysis.curves",
        description="Training (solid) / validation (dashed) curves from TensorBoard logs.",
    )
    parser.add_argument("--run", action="append", required=True,
                        help="LABEL=MODEL_DIR[,MODEL_DIR...] (several dirs = seeds); repeatable")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--metric", default="top1/b0",
                        help="metric (top1/b0) or full tag (epoch_top1/b0); default top1/b0")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax",
                        help="band over seeds: min-max range or mean +- sample std")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        runs = [parse_run(r) for r in args.run]
        for _, dirs in runs:
            for d in dirs:
                if not os.path.isdir(d):
                    raise ValueError(f"model directory not found: {d}")
        drawn = plot_curves(runs, args.output, args.metric, args.band, args.title)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for label, splits in drawn.items():
        for split, info in splits.items():
            print(f"{label} {split}: {len(info['epochs'])} epochs, {info['seeds']} seed(s), "
                  f"last {info['mean'][-1]:.3f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
