"""The README's demonstration table, from the runs of tools/run_noisy_demo.sh.

Per mode, over its seeds (mean and the min-max range): B0's best clean test
top-1 and its epoch, the test top-1 at the last epoch, early in training
(epoch 4 and 8: how fast each mode learns after the warm-up), and B0's top-1
on the corrupted training labels at the last epoch (how much of the noise it
memorised). Reads only results.json files.

    python tools/noisy_demo_summary.py runs/noisy5k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict, List, Optional

MODES = (("baseline", "baseline"), ("dsl", "DSL"), ("dhm", "DHM"))
EARLY_EPOCHS = (4, 8)


def load_runs(out_dir: str, mode: str) -> List[dict]:
    """results.json of every finished `<mode>_s<seed>` run under `out_dir`, by seed."""
    runs = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name, "results.json")
        if name.startswith(f"{mode}_s") and os.path.isfile(path):
            with open(path) as f:
                results = json.load(f)
            if results.get("completed"):
                runs.append(results)
    return runs


def per_epoch(results: dict, section: str) -> Dict[int, float]:
    """{epoch: B0 top-1 in percent} of the 'train' or 'eval' section of each epoch."""
    return {
        entry["epoch"]: 100.0 * entry[section]["top1/b0"]
        for entry in results["history"]
        if "top1/b0" in entry.get(section, {})
    }


def spread(values: List[Optional[float]], digits: int = 1) -> str:
    """'mean (min-max)', the value alone for one seed, '-' where a seed lacks it."""
    if not values or any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def row(label: str, runs: List[dict]) -> str:
    tests = [per_epoch(r, "eval") or {0: None} for r in runs]  # {0: None}: never evaluated
    trains = [per_epoch(r, "train") or {0: None} for r in runs]
    best = [max((v for v in t.values() if v is not None), default=None) for t in tests]
    best_epochs = ", ".join(str(max(t, key=lambda e: t[e] or 0)) for t in tests)
    cells = [
        label,
        str(len(runs)),
        f"{spread(best)} (epoch{'s' if len(runs) > 1 else ''} {best_epochs})",
        spread([t[max(t)] for t in tests]),  # each seed's last evaluated epoch
        *(spread([t.get(e) for t in tests]) for e in EARLY_EPOCHS),
        spread([t[max(t)] for t in trains]),
    ]
    return "| " + " | ".join(cells) + " |"


def table(out_dir: str) -> str:
    header = (
        "| run | seeds | B0 test top-1, best (epoch) | B0 test top-1, last epoch | "
        + " | ".join(f"test top-1, epoch {e}" for e in EARLY_EPOCHS)
        + " | B0 train top-1 on the noisy labels, last epoch |"
    )
    lines = [header, "|" + "---|" * (5 + len(EARLY_EPOCHS))]
    for mode, label in MODES:
        runs = load_runs(out_dir, mode)
        if runs:
            lines.append(row(label, runs))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the OUT_DIR of tools/run_noisy_demo.sh (e.g. runs/noisy5k)")
    print(table(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
