#!/usr/bin/env bash
# Reproduces the README's CPU demonstration: ResNet-32 baseline, DSL and DHM on a
# 5,000-image CIFAR-10 subset with 20% corrupt labels (gin/demo/noisy5k_recipe.gin),
# for each seed, one run after the other (each gets every core: faster in total
# than several at once on a small machine; seed 0 of every mode comes first, so an
# interrupted invocation still has complete seeds), then the curves figure and the
# results table over all seeds, and the README's table (summary.md,
# tools/noisy_demo_summary.py). Re-running resumes unfinished runs and skips
# finished ones (the trainer's own resume).
# Usage: tools/run_noisy_demo.sh [DATA_DIR] [OUT_DIR] [SEEDS]   (SEEDS: "0 1 2")
set -euo pipefail
DATA_DIR=${1:-../shared/tensorflow_datasets}
OUT=${2:-runs/noisy5k}
SEEDS=${3:-0 1 2}
PY=${PYTHON:-.venv/bin/python}
MODES="baseline dsl dhm"
mkdir -p "$OUT"
for seed in $SEEDS; do
  for mode in $MODES; do
    "$PY" -m dhm_keras.main --gin_file="gin/demo/noisy5k_resnet32_${mode}.gin" \
      --data_dir="$DATA_DIR" --model_dir="$OUT/${mode}_s${seed}" \
      --gin_param="train.seed = ${seed}" --gin_param='train.verbose = 2' \
      >> "$OUT/${mode}_s${seed}.log" 2>&1
  done
done
runs_of() { local mode=$1 list=""; for seed in $SEEDS; do list="${list:+$list,}$OUT/${mode}_s${seed}"; done; echo "$list"; }
"$PY" -m dhm_keras.analysis.curves --output="$OUT/curves.png" \
  --run="baseline=$(runs_of baseline)" --run="DSL=$(runs_of dsl)" --run="DHM=$(runs_of dhm)"
all_runs=()
for mode in $MODES; do for seed in $SEEDS; do all_runs+=("$OUT/${mode}_s${seed}"); done; done
"$PY" -m dhm_keras.analysis.report --output="$OUT/report.md" "${all_runs[@]}"
"$PY" tools/noisy_demo_summary.py "$OUT" > "$OUT/summary.md"
