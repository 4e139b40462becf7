"""Accuracy check of the precision policies: one recipe, float32 vs 'auto', several seeds.

Issue #19: 'auto' picks mixed_bfloat16 where the CPU (or GPU/TPU) computes
bfloat16 natively. Before it may become the default, training with it must
reach float32's accuracy. This runs the command-line trainer once per
(policy, seed), each in its own process and model directory, and prints a
markdown table of the resolved policy, the best and last B0 top-1 from
results.json and the wall time of each run, then the means per policy:

    nice -n 10 .venv/bin/python benchmarks/precision_accuracy.py              # quick start, seeds 0 1
    .venv/bin/python benchmarks/precision_accuracy.py --seeds 0 1 2 --gin_param "train.epochs = 8"

The runs are interleaved (seed 0 float32, seed 0 auto, seed 1 float32, ...)
so that a change of load on a shared machine hits both policies alike. A run
that fails or times out is reported as such and the rest go on; `--summary`
(default <root>/summary.json) is rewritten after every run, and `--table`
prints the table of an earlier summary without training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

POLICY_LINE = re.compile(r"Precision policy (\w+) \((.*)\)\s*$", re.MULTILINE)


def run_name(policy: str, seed: int) -> str:
    return f"{policy}_seed{seed}"


def resolved_policy(policy: str, model_dir: str, log: str) -> tuple:
    """(resolved policy, where it was read): the trainer's log line, else config.json's
    precision.resolved, else the explicit policy itself."""
    found = POLICY_LINE.findall(log)
    if found:
        return found[-1][0], f"log: {found[-1][1]}"
    config_path = os.path.join(model_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            precision = json.load(f).get("precision", {})
        if precision.get("resolved"):
            return precision["resolved"], "config.json"
    if policy != "auto":
        return policy, "explicit"
    return "unknown", "neither the log nor config.json says"


def b0_top1(model_dir: str) -> dict:
    """{"best": top-1, "best_epoch": n, "last": top-1, "epochs": n} of B0 from results.json."""
    path = os.path.join(model_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        results = json.load(f)
    best, last = results.get("best", {}), results.get("last", {})
    return {
        "best": best.get("top1/b0"),
        "best_epoch": best.get("epoch"),
        "last": last.get("top1/b0"),
        "epochs": results.get("epochs_completed"),
        "completed": results.get("completed", False),
        "split": results.get("split"),
    }


def train_once(policy: str, seed: int, args) -> dict:
    model_dir = os.path.join(args.root, run_name(policy, seed))
    if os.path.exists(os.path.join(model_dir, "results.json")) and not args.resume:
        raise SystemExit(f"{model_dir} holds an earlier run: pass another --root, or --resume to reuse it")
    command = [
        sys.executable, "-m", "dhm_keras.main",
        f"--gin_file={args.gin_file}",
        f"--model_dir={model_dir}",
        f"--gin_param=set_precision_policy.policy = '{policy}'",
        f"--gin_param=train.seed = {seed}",
        *(f"--gin_param={p}" for p in args.gin_param),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        returncode = "timeout"
        output = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                         for b in (e.stdout, e.stderr))
    wall = time.perf_counter() - start
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, run_name(policy, seed) + ".log"), "w") as f:
        f.write(" ".join(command) + "\n" + output)
    resolved, source = resolved_policy(policy, model_dir, output)
    return {
        "policy": policy, "resolved": resolved, "resolved_from": source, "seed": seed,
        "returncode": returncode, "wall_s": round(wall, 1), **b0_top1(model_dir),
    }


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(runs: list, header: dict) -> str:
    lines = [
        f"CPU: {header['cpu']}; recipe: {header['recipe']}",
        "",
        "| policy | resolved | seed | best B0 top-1 (epoch) | last B0 top-1 | wall time | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        status = "ok" if r["returncode"] == 0 and r.get("completed") else f"failed ({r['returncode']})"
        best = f"{pct(r.get('best'))} ({r.get('best_epoch', '-')})"
        lines.append(f"| {r['policy']} | {r['resolved']} | {r['seed']} | {best} | {pct(r.get('last'))} | "
                     f"{r['wall_s'] / 60:.1f} min | {status} |")
    lines.append("")
    means = {}
    for policy in dict.fromkeys(r["policy"] for r in runs):
        ok = [r for r in runs if r["policy"] == policy and r["returncode"] == 0 and r.get("best") is not None]
        if not ok:
            continue
        means[policy] = (statistics.mean(r["best"] for r in ok), statistics.mean(r["wall_s"] for r in ok))
        spread = f", range {pct(min(r['best'] for r in ok))}-{pct(max(r['best'] for r in ok))}" if len(ok) > 1 else ""
        lines.append(f"- {policy}: mean best B0 top-1 {pct(means[policy][0])} over {len(ok)} seed(s){spread}; "
                     f"mean wall time {means[policy][1] / 60:.1f} min")
    if len(means) == 2:
        (a, (acc_a, t_a)), (b, (acc_b, t_b)) = means.items()
        lines.append(f"- {b} - {a}: {100 * (acc_b - acc_a):+.1f} points of B0 top-1; "
                     f"wall time x{t_b / t_a:.2f} ({a} / {b} speed-up x{t_a / t_b:.2f})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", default="gin/quickstart.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra binding for every run (repeatable), e.g. \"train.epochs = 8\"")
    parser.add_argument("--policies", nargs="+", default=["float32", "auto"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--root", default=None, help="parent of the model directories (default: a new temp dir)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse model directories under --root (a finished run is not retrained; "
                             "its wall time is then that of the check, not of training)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--summary", default=None, help="JSON of every run (default <root>/summary.json)")
    parser.add_argument("--table", default=None, help="print the table of this summary.json and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            summary = json.load(f)
        print(table(summary["runs"], summary["header"]))
        return

    from official.modeling import performance

    args.root = args.root or tempfile.mkdtemp(prefix="dhm_precision_accuracy_")
    args.summary = args.summary or os.path.join(args.root, "summary.json")
    auto, reason = performance.resolve_precision_policy("auto")
    header = {
        "cpu": performance.cpu_description(),
        "auto_here": f"{auto} ({reason})",
        "recipe": " ".join([args.gin_file, *args.gin_param]),
    }
    print(f"CPU: {header['cpu']}\n'auto' here: {header['auto_here']}\nmodel dirs: {args.root}", flush=True)
    runs = []
    for seed in args.seeds:
        for policy in args.policies:
            print(f"training {run_name(policy, seed)} ...", flush=True)
            run = train_once(policy, seed, args)
            runs.append(run)
            print(f"  -> {run['resolved']}, best B0 top-1 {pct(run.get('best'))}, {run['wall_s']:.0f} s, "
                  f"exit {run['returncode']}", flush=True)
            with open(args.summary, "w") as f:
                json.dump({"header": header, "runs": runs}, f, indent=1)
    print()
    print(table(runs, header))


if __name__ == "__main__":
    main()
