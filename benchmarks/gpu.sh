#!/usr/bin/env bash
# The GPU run of the speed benchmark, as one prepared script for a lent GPU machine (no network
# there: torch/transformers/peft/accelerate are installed; datasets, tabulate, rouge_score and
# pyyaml may need wheels carried along). Prints the table and writes benchmarks/gpu-results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/speed.py --config flan-t5-base-config --dialogues 256 --new-tokens 64 \
  --eval-batch-size 64 --train-steps 30 --batch-size 16 --json "${OUT:-benchmarks}/gpu-results.json"
