"""CPU settings for the DHM training step, side by side: oneDNN, threads, graph options, XLA, BN.

TensorFlow reads its thread-pool sizes and `TF_ENABLE_ONEDNN_OPTS` once, when it
starts, so every setting runs in a fresh child process. Rounds are interleaved
(setting A, B, C, ... then again) and each setting reports the median of its
rounds, so a burst of load from another job hits every setting alike:

    .venv/bin/python benchmarks/cpu_settings.py --rounds 3 --steps 4

A child builds ResNet-32 DHM (the `DHMModel` train step, synthetic input),
compiles it, runs 2 untimed warm-up steps, then times `--steps` steps; its
wall-clock images/s AND its images per CPU-second are printed (the second is
less sensitive to other jobs on a shared machine; it hides nothing when the
machine is idle). The first setting is the shipped default; ratios are over it.

The PyTorch re-implementation of the reference step (`torch_reference.py`) runs
as one more "setting", also in fresh processes: the cleanest side-by-side of
the two libraries (neither shares a process, its allocator or caches with the
other). `--only "default (oneDNN on, TF threads, fused BN)" "PyTorch reference
(torch_reference.py)"` runs just that comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (environment overrides, child options). The first one is the default.
SETTINGS = {
    "default (oneDNN on, TF threads, fused BN)": ({}, {}),
    "oneDNN off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "Keras' unfused BN": ({}, {"fused_bn": False}),
    "inter_op=1": ({}, {"inter_op": 1}),
    "intra_op=1, inter_op=2": ({}, {"intra_op": 1, "inter_op": 2}),
    "intra_op=1, inter_op=3": ({}, {"intra_op": 1, "inter_op": 3}),
    "intra_op=1, inter_op=4": ({}, {"intra_op": 1, "inter_op": 4}),
    "grappler remapping off": ({}, {"grappler": {"remapping": False}}),
    "XLA (jit_compile=True)": ({}, {"jit_compile": True}),
    # Not a TensorFlow setting: the yardstick of issue #4, in a process of its own
    # like every setting above, so neither library shares a process with the other.
    "PyTorch reference (torch_reference.py)": ({}, {"torch": True}),
}

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
options = json.loads({options!r})
import official  # noqa: F401  (oneDNN default unless the environment says otherwise)
import tensorflow as tf
if "intra_op" in options:
    tf.config.threading.set_intra_op_parallelism_threads(options["intra_op"])
if "inter_op" in options:
    tf.config.threading.set_inter_op_parallelism_threads(options["inter_op"])
if "grappler" in options:
    tf.config.optimizer.set_experimental_options(options["grappler"])
sys.path.insert(0, {benchmarks!r})
from train_throughput import compiled_model, synthetic_batches  # same model, optimizer, data

model = compiled_model("resnet32", "dhm", 100, jit_compile=options.get("jit_compile", False),
                       fused_bn=options.get("fused_bn", True))
batch, steps = {batch}, {steps}
model.fit(synthetic_batches(batch, 100, 2), verbose=0)
data = synthetic_batches(batch, 100, steps)
wall, cpu = time.perf_counter(), time.process_time()
model.fit(data, verbose=0)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print("RESULT " + json.dumps({{"wall": steps * batch / wall, "cpu": steps * batch / cpu}}))
"""


# The same timing for the PyTorch re-implementation of the reference DHM step:
# same batch, classes, loss and SGD, 2 threads (the cores TensorFlow uses here).
TORCH_CHILD = r"""
import json, sys, time
sys.path.insert(0, {benchmarks!r})
import torch_reference
step = torch_reference.step_closure({batch}, 100, threads=2)
batch, steps = {batch}, {steps}
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(steps):
    step()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print("RESULT " + json.dumps({{"wall": steps * batch / wall, "cpu": steps * batch / cpu}}))
"""


def run_child(env_overrides: dict, options: dict, batch: int, steps: int) -> dict:
    env = {**os.environ, **env_overrides, "TF_CPP_MIN_LOG_LEVEL": "2"}
    template = TORCH_CHILD if options.get("torch") else CHILD
    code = template.format(repo=str(REPO_ROOT), benchmarks=str(REPO_ROOT / "benchmarks"),
                           options=json.dumps(options), batch=batch, steps=steps)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"setting failed (rc {done.returncode}):\n{done.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    args = parser.parse_args()
    names = [n for n in SETTINGS if not args.only or n in args.only]

    results = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(run_child(*SETTINGS[name], args.batch, args.steps))

    print(f"ResNet-32 DHM training step, batch {args.batch}, {args.rounds} interleaved rounds "
          f"of {args.steps} steps, one fresh process per setting and round, {os.cpu_count()} CPUs")
    base = None
    for name in names:
        wall = statistics.median(r["wall"] for r in results[name])
        cpu = statistics.median(r["cpu"] for r in results[name])
        base = base or (wall, cpu)
        rounds = ", ".join(f"{r['wall']:.1f}" for r in results[name])
        print(f"  {name:44s} {wall:7.1f} images/s (x{wall / base[0]:.2f})  "
              f"{cpu:6.1f} images/CPU-s (x{cpu / base[1]:.2f})  rounds: {rounds}")
    reference = "PyTorch reference (torch_reference.py)"
    if reference in names and names[0] != reference:
        # Rounds are interleaved, so round k of both ran minutes apart at most.
        paired = [ours["wall"] / theirs["wall"]
                  for ours, theirs in zip(results[names[0]], results[reference])]
        print(f"  {names[0]} / PyTorch reference, per round: "
              f"{', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f} "
              f"(issue #4 target >= 1.2)")


if __name__ == "__main__":
    main()
