#!/usr/bin/env bash
# Peak memory and step time of training with and without gradient accumulation and Burn's
# activation checkpointing (and once with Burn's backward of the Kronecker apply instead of the
# crate's), each setup in its own process (peak RSS is per process); prints the
# markdown table of docs/training.md. Needs a release build:
#   cargo build --release --features full --example train_memory
set -euo pipefail
bin=${BIN:-target/release/examples/train_memory}
echo "| model | setup | median step (ms) | peak memory above the model (MB) |"
echo "|---|---|---:|---:|"
for model in minilm smollm2; do
  for setup in "plain --burn-backward" plain accum checkpointing; do
    # shellcheck disable=SC2086 # the setup is a mode and an optional flag
    line=$("$bin" --model "$model" --mode $setup "$@")
    python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
setup = {"plain": "one batch", "accum": f"{r['micro']} micro-batches", "checkpointing": "BalancedCheckpointing"}[r["mode"]]
if r["burn_backward"]:
    setup += ", Burn's backward of the Kronecker apply"
print(f"| {r['model']} | {setup} | {r['median_step_ms']:.0f} | {r['peak_above_model_mb']:.0f} |")
PY
  done
done
