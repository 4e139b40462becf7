"""tools/noisy_demo_summary.py: the README's demonstration table from results.json files."""

import json
import subprocess
import sys

from conftest import REPO_ROOT


def write_run(out_dir, name, test_top1, train_top1, completed=True):
    """A results.json with B0 test top-1 at the given epochs and train top-1 every epoch."""
    history = [
        {"epoch": e, "train": {"top1/b0": train_top1[e - 1]},
         "eval": {"top1/b0": test_top1[e]} if e in test_top1 else {}}
        for e in range(1, len(train_top1) + 1)
    ]
    run = out_dir / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"completed": completed, "history": history}))


def test_table_gives_mean_and_range_over_seeds(tmp_path):
    train = [0.1 * e for e in range(1, 9)]
    write_run(tmp_path, "dhm_s0", {4: 0.30, 8: 0.50}, train)
    write_run(tmp_path, "dhm_s1", {4: 0.40, 8: 0.45}, [t / 2 for t in train])
    write_run(tmp_path, "dhm_s2", {4: 0.9, 8: 0.9}, train, completed=False)  # unfinished: left out
    write_run(tmp_path, "baseline_s0", {4: 0.20, 8: 0.10}, train)
    out = subprocess.run([sys.executable, "tools/noisy_demo_summary.py", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()[2:]}
    assert set(rows) == {"baseline", "DHM"}
    # best: 50 (epoch 8) and 45 (epoch 8) -> mean 47.5, range 45.0-50.0; last = epoch 8;
    # epoch 4: 30 and 40; train top-1 at the last epoch: 80 and 40.
    assert rows["DHM"] == "| DHM | 2 | 47.5 (45.0-50.0) (epochs 8, 8) | 47.5 (45.0-50.0) | 35.0 (30.0-40.0) | 47.5 (45.0-50.0) | 60.0 (40.0-80.0) |"
    assert rows["baseline"] == "| baseline | 1 | 20.0 (epoch 4) | 10.0 | 20.0 | 10.0 | 80.0 |"


def test_seeds_evaluated_at_other_epochs_give_a_dash_not_a_crash(tmp_path):
    write_run(tmp_path, "dsl_s0", {4: 0.30, 8: 0.50}, [0.5] * 8)
    write_run(tmp_path, "dsl_s1", {6: 0.40}, [0.5] * 6)
    write_run(tmp_path, "dhm_s0", {}, [0.5] * 2)  # never evaluated
    out = subprocess.run([sys.executable, "tools/noisy_demo_summary.py", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()[2:]}
    assert rows["DSL"] == "| DSL | 2 | 45.0 (40.0-50.0) (epochs 8, 6) | 45.0 (40.0-50.0) | - | - | 50.0 (50.0-50.0) |"
    assert rows["DHM"].startswith("| DHM | 1 | - ")
