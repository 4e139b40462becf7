#!/usr/bin/env bash
# Reproduces the README's small CPU demonstration (issue 7): ResNet-32 baseline,
# DSL and DHM on a 5,000-image CIFAR-10 subset with 20% corrupt labels, one run
# after the other (each gets every core: faster in total than three at once on a
# small machine), then the curves figure and the results table.
# Usage: tools/run_noisy_demo.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
DATA_DIR=${1:-../shared/tensorflow_datasets}
OUT=${2:-runs/noisy5k}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
for mode in baseline dsl dhm; do
  "$PY" -m dhm_keras.main --gin_file="gin/demo/noisy5k_resnet32_${mode}.gin" \
    --data_dir="$DATA_DIR" --model_dir="$OUT/$mode" \
    --gin_param='train.verbose=2' > "$OUT/$mode.log" 2>&1
done
"$PY" -m dhm_keras.analysis.curves --output="$OUT/curves.png" \
  --run="baseline=$OUT/baseline" --run="DSL=$OUT/dsl" --run="DHM=$OUT/dhm"
"$PY" -m dhm_keras.analysis.report --output="$OUT/report.md" "$OUT/baseline" "$OUT/dsl" "$OUT/dhm"
