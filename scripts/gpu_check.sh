#!/bin/bash
# The GPU checks for an NVIDIA machine with no network (docs/benchmarks.md, "GPU"): the
# integration suite on CUDA, then training-step times side by side with PyTorch + PEFT on the same
# card (MiniLM, single layers at LLM widths, a whole SmolLM2-shaped decoder), the fused CubeCL
# kernel against Burn's two products, Burn's kernel fusion with autotuning, and wgpu on the
# card's Vulkan driver. Each part has its own time limit and log, so a slow or
# failing part leaves the others' figures.
#
# Prepared on the build machine (x86-64 Linux; the GPU machine needs no Rust toolchain):
#
#   scripts/gpu_check.sh --prepare     # builds the binaries below into the ignored folder .dev/
#
# then, on the GPU machine, from the repository root (with .dev/ copied along; PyTorch, PEFT and
# transformers installed there; for the wgpu part, a Vulkan loader, libvulkan.so.1):
#
#   OUT=logs scripts/gpu_check.sh
#
# `CUDARC_CUDA_VERSION` names the CUDA version the binaries are built for (default 13000, CUDA
# 13.0, what the project's lent machines run): without `nvcc` on the build machine, cudarc
# would pick the newest it knows. The suite runs without the CLI tests (they start the
# `kron-adapters` binary of the build machine's path) and skips the tests whose assets (MiniLM,
# SmolLM2) are not in the cache. The MiniLM timings use random weights on both sides.
set -u
cd "$(dirname "$0")/.."
D=.dev
if [ "${1:-}" = "--prepare" ]; then
    set -eo pipefail
    export CARGO_INCREMENTAL=0 CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
    mkdir -p $D
    pwd >$D/manifest_dir # where the suite looks for tests/fixtures
    release=target/release/examples
    cargo build --release --features full,cuda --example step_time --example llm_compare
    cp $release/step_time $D/step_time_cuda
    cp $release/llm_compare $D/llm_compare_cuda
    it=$(cargo test --release --features full,cuda --test it --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("reason") == "compiler-artifact" and j.get("executable") and j["target"]["name"] == "it"][-1])')
    cp "$it" $D/it_cuda
    cargo build --release --features full,cuda,fusion,autotune --example step_time
    cp $release/step_time $D/step_time_cuda_fusion
    cargo build --release --features full,wgpu --example step_time
    cp $release/step_time $D/step_time_wgpu
    bins="$D/step_time_cuda $D/llm_compare_cuda $D/step_time_cuda_fusion $D/step_time_wgpu $D/it_cuda"
    strip $bins
    xz -T2 -f -6 $bins
    ls -la $D
    exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" /tmp/gpu-bin
for f in $D/*.xz; do # (Python's lzma: the machine may have no xz)
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$f" /tmp/gpu-bin/"$(basename "$f" .xz)"
done
chmod +x /tmp/gpu-bin/*
B=/tmp/gpu-bin
# The suite finds its fixtures under the build machine's checkout path: link it here.
built_in=$(cat $D/manifest_dir)
if [ ! -e "$built_in/tests/fixtures" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"
fi
part() { # part NAME SECONDS COMMAND...: runs COMMAND with a limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? (at ${SECONDS} s)"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, peft, transformers; print("torch", torch.__version__, "peft", peft.__version__, "transformers", transformers.__version__)'
} >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
part suite "${SUITE_S:-120}" $B/it_cuda --skip cli:: --test-threads 16
grep -E "^test result|FAILED|panicked" "$OUT/suite.log" | head -20
part side_by_side "${SIDE_S:-130}" env PYTHONUNBUFFERED=1 python3 scripts/side_by_side.py random --device cuda \
    --budget 0.5 --crate-once --layers 576,1536 4096,14336 --step-time $B/step_time_cuda
grep -E "^\|" "$OUT/side_by_side.log"
part decoder "${DECODER_S:-90}" env PYTHONUNBUFFERED=1 python3 scripts/side_by_side.py --skip-minilm --skip-layers \
    --decoder --device cuda --budget 1 --decoder-steps 8 --llm-compare $B/llm_compare_cuda
grep -E "^\|" "$OUT/decoder.log"
# The fused kernel (kron::cube) against Burn's two products: KronA on MiniLM and at 4096 widths.
part fused "${FUSED_S:-40}" bash -c "for f in '' --fused-kernel; do
    $B/step_time_cuda --budget 0.5 --methods krona,kron_lora_r12 \$f
    $B/step_time_cuda --budget 0.5 --layer 4096,14336 --methods lora_r8,krona,kron_lora_r8 \$f
done"
grep '^{' "$OUT/fused.log"
part fusion "${FUSION_S:-50}" bash -c "$B/step_time_cuda_fusion --budget 0.5 && \
    $B/step_time_cuda_fusion --budget 0.5 --layer 4096,14336"
grep '^{' "$OUT/fusion.log"
if ldconfig -p | grep -q libvulkan; then
    part wgpu "${WGPU_S:-50}" bash -c "$B/step_time_wgpu --budget 0.5 && \
        $B/step_time_wgpu --budget 0.5 --layer 4096,14336"
    grep '^{' "$OUT/wgpu.log"
else
    echo "== wgpu: no Vulkan loader (libvulkan.so.1) on this machine"
fi
