#!/usr/bin/env bash
# The crate's backward of the Kronecker apply against Burn's (`step_time --burn-backward`),
# alternating in separate processes, three rounds (docs/benchmarks.md, "The Kronecker apply's own
# backward"). Needs `cargo build --release --features full --example step_time`; prints one JSON
# line per run:
# MiniLM step (32 x 64) for LoRA r=1, KronA, Kron-LoRA r=12; one 4096 -> 14336 layer step for
# LoRA r=8, KronA, Kron-LoRA r=8.
BIN=${BIN:-target/release/examples/step_time}
for rep in 1 2 3; do
  for m in lora_r1 krona kron_lora_r12; do
    echo "rep=$rep minilm $m crate $($BIN --budget 6 --methods $m 2>/dev/null)"
    if [ "$m" != lora_r1 ]; then
      echo "rep=$rep minilm $m burn $($BIN --budget 6 --methods $m --burn-backward 2>/dev/null)"
    fi
  done
  for m in lora_r8 krona kron_lora_r8; do
    echo "rep=$rep layer $m crate $($BIN --layer 4096,14336 --budget 6 --methods $m 2>/dev/null)"
    if [ "$m" != lora_r8 ]; then
      echo "rep=$rep layer $m burn $($BIN --layer 4096,14336 --budget 6 --methods $m --burn-backward 2>/dev/null)"
    fi
  done
done
