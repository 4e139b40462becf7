"""Markdown table of B0 errors over seeds, next to the paper's numbers.

    python -m dhm_keras.analysis.report MODEL_DIR [MODEL_DIR ...] [--output=report.md]

Each MODEL_DIR is a run directory holding ``results.json`` (written by
`dhm_keras.callbacks.ResultsWriter`), or a ``results.json`` file, or a directory
searched recursively for run directories (``runs/sweep`` -> every run below it).

Grouping: runs with the same configuration apart from the seed form one row, the seed
being ``train.seed``. The configuration is ``results.json["config"]`` (dataset / model /
mimicking / train sections) flattened to ``section.key`` fields, plus the bindings of
``operative_config.gin`` of other configurables (e.g. ``build_sgd.learning_rate``), so
runs differing only in their optimizer recipe are not pooled. Not part of the
configuration (seed axis or execution details): train.seed, dataset.label_noise_seed,
dataset.data_dir, dataset.cache, train.verbose, train.jit_compile, train.deterministic,
train.keep_checkpoints (`dhm_keras.model_dir` owns both lists)
and the ``get_strategy`` and ``diagnostics`` bindings. A row is labelled ``dataset / model / mode`` (plus
``noise=r``) and every other field whose value differs between the rows.

Numbers: B0 top-1 and top-5 error in % (100 * (1 - accuracy)) at the run's best epoch
(highest validation top-1 of b0, ``results.json["best"]``) and at its last evaluated
epoch (``results.json["last"]``), as mean +- SAMPLE standard deviation over seeds
(ddof=1, '-' for a single seed). A run that has not been evaluated yet reports training
accuracy in results.json; such values are marked with a dagger.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from dhm_keras import model_dir as model_dir_lib

RESULTS_FILE = model_dir_lib.RESULTS_FILE
# Fields that are the seed axis or do not change the experiment.
IGNORED_FIELDS = model_dir_lib.EXECUTION_FIELDS | model_dir_lib.SEED_FIELDS
# Gin configurables whose bindings do not change the experiment (strategy, diagnostics)
# or are already in config.json.
IGNORED_GIN_SELECTORS = {"get_strategy", "diagnostics", "dataset", "model", "mimicking", "train"}
ALWAYS_SHOWN = ("dataset.name", "model.name", "model.mode", "dataset.label_noise")


# ----------------------------------------------------------------------------- references


@dataclasses.dataclass(frozen=True)
class Reference:
    """One number of the paper: B0 error (%) as (mean, std or None), and its source."""

    dataset: str
    model: str
    mode: str
    top1: Tuple[float, Optional[float]]
    top5: Optional[Tuple[float, Optional[float]]]
    source: str
    label_noise: float = 0.0
    overrides: Tuple[Tuple[str, object], ...] = ()  # model.overrides the run must have
    bernoulli_p: Optional[float] = None


# Reference numbers stated in docs/method.md (from the supplement, arXiv
# 2003.10739). Appendix E states top-1 ACCURACY; it is converted here to error
# (100 - accuracy, same std). The ImageNet rows are the authors' released models
# (no std given). A run matches a row when dataset, model, mode and label noise are
# equal, its model.overrides equal `overrides` (None = no overrides), and, for dsl/dhm,
# mimicking.bernoulli_p equals `bernoulli_p`; dhm also needs alpha = 1 and T = 1.
REFERENCES: Tuple[Reference, ...] = (
    # Appendix D: Bernoulli branch sampling, p = 0.5.
    Reference("cifar100", "resnet32", "dhm", (27.002, 0.316), None, "App. D", bernoulli_p=0.5),
    # Appendix E: corrupt labels, WRN-28-10, 5 runs (accuracy 71.122 / 74.528 / 61.268 / 64.226).
    Reference("cifar100", "wrn_28_10", "baseline", (100 - 71.122, 0.269), None, "App. E", 0.2),
    Reference("cifar100", "wrn_28_10", "dhm", (100 - 74.528, 0.433), None, "App. E", 0.2),
    Reference("cifar100", "wrn_28_10", "baseline", (100 - 61.268, 0.311), None, "App. E", 0.5),
    Reference("cifar100", "wrn_28_10", "dhm", (100 - 64.226, 0.300), None, "App. E", 0.5),
    # Appendix F: WRN-28-10 with dropout 0.3.
    Reference("cifar100", "wrn_28_10", "baseline", (18.698, 0.154), None, "App. F",
              overrides=(("dropout", 0.3),)),
    Reference("cifar100", "wrn_28_10", "dhm", (16.790, 0.110), None, "App. F",
              overrides=(("dropout", 0.3),)),
    # ImageNet, authors' released models: top-1 / top-5 error.
    Reference("imagenet2012", "resnet18", "dsl", (29.728, None), (10.450, None), "released models"),
    Reference("imagenet2012", "resnet18", "dhm", (28.714, None), (9.940, None), "released models"),
    Reference("imagenet2012", "resnet50", "dsl", (23.874, None), (7.074, None), "released models"),
    Reference("imagenet2012", "resnet50", "dhm", (23.430, None), (6.764, None), "released models"),
    Reference("imagenet2012", "resnet101", "dsl", (22.260, None), (6.128, None), "released models"),
    Reference("imagenet2012", "resnet101", "dhm", (21.348, None), (5.684, None), "released models"),
    Reference("imagenet2012", "resnet152", "dsl", (21.602, None), (5.824, None), "released models"),
    Reference("imagenet2012", "resnet152", "dhm", (20.810, None), (5.396, None), "released models"),
)


def find_reference(config: dict) -> Optional[Reference]:
    """The paper's number for a run configuration (results.json "config"), if any."""
    dataset, model = config.get("dataset", {}), config.get("model", {})
    mimic = config.get("mimicking", {})
    mode = model.get("mode")
    overrides = tuple(sorted((model.get("overrides") or {}).items()))
    for ref in REFERENCES:
        if (ref.dataset, ref.model, ref.mode) != (dataset.get("name"), model.get("name"), mode):
            continue
        if not math.isclose(float(dataset.get("label_noise") or 0.0), ref.label_noise):
            continue
        if overrides != tuple(sorted(ref.overrides)):
            continue
        if mode != "baseline" and mimic.get("bernoulli_p") != ref.bernoulli_p:
            continue
        if mode == "dhm" and (mimic.get("alpha", 1.0) != 1.0 or mimic.get("temperature", 1.0) != 1.0):
            continue
        return ref
    return None


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Run:
    path: str
    config: dict
    seed: object
    best: dict
    last: dict
    split: str
    completed: bool
    epochs_completed: int
    epochs: int
    gin: Dict[str, str]


def gin_bindings(path: str) -> Dict[str, str]:
    """``selector.param`` -> value text of an operative_config.gin (other configurables
    than those in config.json). Empty if the file is missing or unparsable."""
    if not os.path.exists(path):
        return {}
    try:
        import gin.config
        import gin.config_parser as config_parser

        with open(path) as f:
            parser = config_parser.ConfigParser(f, gin.config.ParserDelegate(skip_unknown=True))
            statements = list(parser)
    except Exception:  # pylint: disable=broad-except  # a report never fails on gin text
        return {}
    bindings = {}
    for statement in statements:
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        selector = statement.selector.split(".")[-1]
        if selector in IGNORED_GIN_SELECTORS:
            continue
        value = statement.value
        text = f"@{value.selector}" if hasattr(value, "selector") else repr(value)
        scope = f"{statement.scope}/" if statement.scope else ""
        bindings[f"{scope}{statement.selector}.{statement.arg_name}"] = text
    return bindings


def load_run(path: str) -> Run:
    """A run from its model directory (or its results.json)."""
    results_path = path if os.path.isfile(path) else os.path.join(path, RESULTS_FILE)
    model_dir = os.path.dirname(os.path.abspath(results_path))
    with open(results_path) as f:
        results = json.load(f)
    config = results.get("config") or {}
    if not config and os.path.exists(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    return Run(
        path=model_dir,
        config=config,
        seed=config.get("train", {}).get("seed"),
        best=results.get("best") or {},
        last=results.get("last") or {},
        split=results.get("split", "eval"),
        completed=bool(results.get("completed")),
        epochs_completed=int(results.get("epochs_completed", len(results.get("history", [])))),
        epochs=int(results.get("epochs", 0)),
        gin=gin_bindings(os.path.join(model_dir, "operative_config.gin")),
    )


def discover(paths: Sequence[str]) -> List[str]:
    """Run directories named by `paths` (a run dir, a results.json, or a tree of runs)."""
    found = []
    for path in paths:
        if os.path.isfile(path) or os.path.exists(os.path.join(path, RESULTS_FILE)):
            found.append(path)
        elif os.path.isdir(path):
            below = sorted(root for root, _, files in os.walk(path) if RESULTS_FILE in files)
            if not below:
                raise FileNotFoundError(f"no {RESULTS_FILE} in or below {path}")
            found.extend(below)
        else:
            raise FileNotFoundError(f"not found: {path}")
    unique, seen = [], set()
    for path in found:
        key = os.path.realpath(path if os.path.isdir(path) else os.path.dirname(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


# ----------------------------------------------------------------------------- statistics


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def config_fields(run: Run) -> Dict[str, str]:
    """The run's configuration as ``section.key`` -> canonical JSON text, seed excluded."""
    fields = {}
    for section, values in sorted(run.config.items()):
        if not isinstance(values, dict):
            continue
        for key, value in sorted(values.items()):
            name = f"{section}.{key}"
            if name not in IGNORED_FIELDS:
                fields[name] = _canonical(value)
    for name, text in sorted(run.gin.items()):
        fields[f"gin:{name}"] = text
    return fields


def group_runs(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs with equal configuration fields, in first-seen order, each sorted by seed."""
    groups: Dict[Tuple, List[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(sorted(config_fields(run).items())), []).append(run)
    return [sorted(g, key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else -1))
            for g in groups.values()]


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and SAMPLE standard deviation (ddof=1); std None for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def error_percent(accuracy: float) -> float:
    return 100.0 * (1.0 - float(accuracy))


def group_statistics(runs: Sequence[Run], head: str = "b0") -> dict:
    """{"best": {"top1": (mean, std), "top5": ...}, "last": {...}} of B0 errors in %;
    a metric missing from any run of the group (e.g. top-5 with <= 5 classes) is None."""
    stats = {}
    for point in ("best", "last"):
        stats[point] = {}
        for metric in ("top1", "top5"):
            key = f"{metric}/{head}"
            values = [getattr(r, point).get(key) for r in runs]
            if not values or any(v is None for v in values):
                stats[point][metric] = None
            else:
                stats[point][metric] = mean_std([error_percent(v) for v in values])
    return stats


# ----------------------------------------------------------------------------- markdown


def format_mean_std(value: Optional[Tuple[float, Optional[float]]], digits: int = 2) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.{digits}f} ± {'-' if std is None else f'{std:.{digits}f}'}"


def _label(fields: Dict[str, str], varying: Sequence[str]) -> str:
    value = lambda k: json.loads(fields[k]) if k in fields else None  # noqa: E731
    label = f"{value('dataset.name')} / {value('model.name')} / {value('model.mode')}"
    noise = value("dataset.label_noise")
    if noise:
        label += f", noise={noise}"
    extras = []
    for key in varying:
        if key in ALWAYS_SHOWN:
            continue
        text = fields.get(key, "unset")
        short = key[4:] if key.startswith("gin:") else key
        extras.append(f"{short}={text}")
    return label + (f" ({'; '.join(extras)})" if extras else "")


def markdown_report(runs: Sequence[Run], head: str = "b0") -> str:
    """The report: one table row per configuration, then notes."""
    groups = group_runs(runs)
    all_fields = [config_fields(g[0]) for g in groups]
    keys = sorted({k for f in all_fields for k in f})
    varying = [k for k in keys if len({f.get(k) for f in all_fields}) > 1]
    header = (
        "| configuration | seeds | epochs | best top-1 err (%) | best top-5 err (%) | "
        "last top-1 err (%) | last top-5 err (%) | paper top-1 err (%) | paper top-5 err (%) |"
    )
    lines = [
        f"# Results ({head.upper()}, error = 100 - accuracy)",
        "",
        header,
        "|" + "---|" * 9,
    ]
    notes = set()
    for group, fields in zip(groups, all_fields):
        stats = group_statistics(group, head)
        mark = ""
        if any(r.split != "eval" for r in group):
            mark = " †"
            notes.add("† at least one run has no evaluation yet: its numbers are TRAINING accuracy.")
        seeds = [r.seed for r in group]
        if len(set(map(str, seeds))) != len(seeds):
            notes.add(f"Repeated seeds in one row: {', '.join(r.path for r in group)}.")
        done = [r.epochs_completed for r in group]
        total = max((r.epochs for r in group), default=0)
        epochs = f"{min(done)}" if min(done) == max(done) else f"{min(done)}-{max(done)}"
        epochs += f"/{total}"
        if not all(r.completed for r in group):
            notes.add("A row whose epochs column is below the total holds unfinished runs.")
        ref = find_reference(group[0].config)
        paper1 = paper5 = "-"
        if ref is not None:
            paper1 = f"{format_mean_std(ref.top1, 3)} ({ref.source})".replace(" ± -", "")
            paper5 = format_mean_std(ref.top5, 3).replace(" ± -", "") if ref.top5 else "-"
        cells = [
            _label(fields, varying),
            str(len(group)),
            epochs,
            format_mean_std(stats["best"]["top1"]) + mark,
            format_mean_std(stats["best"]["top5"]) + mark,
            format_mean_std(stats["last"]["top1"]) + mark,
            format_mean_std(stats["last"]["top5"]) + mark,
            paper1,
            paper5,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "mean ± sample standard deviation over seeds (ddof=1; '-' = a single seed). "
        "'best': each run's epoch of highest validation top-1 of B0; 'last': its last "
        "evaluated epoch. Paper numbers: docs/method.md (supplement "
        "appendices; the ImageNet ones are the authors' released models).",
    ]
    if notes:
        lines += [""] + sorted(notes)
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dhm_keras.analysis.report",
        description="Markdown table of B0 top-1/top-5 error over seeds, with the paper's numbers.",
    )
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="run directories, results.json files, or trees of runs")
    parser.add_argument("--output", help="Markdown file to write (default: stdout only)")
    parser.add_argument("--head", default="b0", help="head to report (default b0)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in discover(args.model_dirs)]
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown_report(runs, args.head)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
