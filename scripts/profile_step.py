"""Where a MiniLM training step's time goes, in this crate and in PyTorch, by kind of work.

This crate's side: `perf record` on `examples/step_time.rs` timing one method, its samples
grouped by symbol (GEMM kernels, copies and layout changes, element-wise passes, transcendental
functions, the kernel's page faults and scheduling, ...). PyTorch's side: `torch.profiler` on the
same step of all-MiniLM-L6-v2 (batch 32 × 64, dropout off), its operators' self CPU time grouped
the same way. Also prints how many of the cores each side kept busy (CPU time / wall time; this crate's
figure covers the whole `step_time` run, model building included).
Optional, not part of CI; needs Linux `perf` and the venv of `scripts/side_by_side.py`.

    venv/bin/python scripts/profile_step.py MODEL_DIR [--method lora_r1] [--step-time BIN]

Methods: `full`, `lora_r1`, `krona` (this crate's keys of `step_time`; PyTorch's side uses the
same names, `krona` there is PyTorch's factorized KronA). This crate's own host kernels (the
Kronecker node, GELU, softmax, AdamW) get rows of their own; `perf` samples by `cpu-clock`, which
works where hardware counters are not exposed (virtual machines).
"""
import argparse
import collections
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side  # noqa: E402

# (category, regex on a perf symbol), first match wins.
PERF_GROUPS = [
    # This crate's own host kernels (flex only) before the generic patterns: their symbols
    # name the crate's modules, and their inner loops would otherwise land in "other".
    ("this crate's Kronecker node (kron::host, kron::autodiff)", r"kron_adapters::kron::"),
    ("this crate's GELU, softmax and AdamW kernels (act, quirks, optim)", r"kron_adapters::(act|quirks|optim)::"),
    ("GEMM kernels", r"gemm|matmul"),
    ("copies and layout (strided iteration, contiguous copies, memmove/memset)",
     r"StridedIter|to_contiguous|memmove|memcpy|memset|copy_|slice|cat::|permute|transpose|expand"),
    ("transcendental functions (erf, exp, log, tanh, sqrt)", r"erf|exp|log|tanh|sqrt|pow"),
    ("element-wise and broadcast passes", r"binary|unary|scalar_op|macerator|broadcast|vectorize|mask|clamp"),
    ("reductions (sum, mean, max, softmax)", r"reduce|sum|mean|max|softmax"),
    ("kernel: page faults, scheduling, syscalls", r"^\[k\]"),
    ("allocation", r"malloc|free|alloc::|realloc|cfree"),
    ("iterators and Vec building", r"from_iter|Iterator|Vec<"),
]

TORCH_GROUPS = [
    ("GEMM kernels", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$"),
    ("copies and layout (strided iteration, contiguous copies, memmove/memset)",
     r"aten::(copy_|clone|contiguous|cat|t|transpose|permute|view|reshape|_unsafe_view|expand|as_strided|slice|select|empty|zeros|zero_|fill_|ones_like|zeros_like|empty_like|_reshape_alias|unsqueeze|squeeze)"),
    ("GELU", r"gelu"),
    ("softmax", r"softmax"),
    ("attention (scaled_dot_product_attention)", r"scaled_dot_product|flash_attention|efficient_attention"),
    ("layer norm", r"layer_norm"),
    ("optimizer (AdamW)", r"_foreach|adamw|lerp|addcmul|addcdiv|Optimizer"),
    ("element-wise and broadcast passes", r"aten::(add|mul|div|sub|neg|rsub|add_|mul_|div_|sub_|where|masked_fill|sum|mean|_to_copy|to)"),
]


def group(name, groups):
    for label, pattern in groups:
        if re.search(pattern, name):
            return label
    return "other"


def ours(args):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(
            ["perf", "record", "-e", "cpu-clock", "-F", "499", "-o", data, args.step_time,
             "--methods", args.method, "--budget", str(args.budget)],
            capture_output=True, text=True, check=True,
        )
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        report = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "symbol", "--stdio",
             "-g", "none", "--percent-limit", "0"],
            capture_output=True, text=True, check=True,
        ).stdout
    shares = collections.Counter()
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.*)", line)
        if m:
            pct, kind, sym = float(m.group(1)), m.group(2), m.group(3).strip()
            shares[group("[k]" if kind == "[k]" else sym, PERF_GROUPS)] += pct
    return shares, cpu / wall


def pytorch(args):
    method = {"krona": "torch_factorized_krona"}.get(args.method, args.method)
    step, _ = side_by_side.minilm_step(method, args.model_dir, args.batch, args.seq)
    for _ in range(2):
        step()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(3):
        step()
    cores = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    shares = collections.Counter()
    other = collections.Counter()
    total = 0.0
    for e in prof.key_averages():
        # Operators' self time (an autograd node's own time is its bookkeeping; its kernels
        # are the operators it calls).
        total += e.self_cpu_time_total
        label = group(e.key, TORCH_GROUPS)
        shares[label] += e.self_cpu_time_total
        if label == "other":
            other[e.key] += e.self_cpu_time_total
    print("PyTorch's largest 'other' entries:", file=sys.stderr)
    for key, t in other.most_common(8):
        print(f"  {key}: {100 * t / total:.1f}%", file=sys.stderr)
    return collections.Counter({k: 100 * v / total for k, v in shares.items()}), cores


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--method", default="lora_r1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--budget", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-time", help="this crate's step_time binary (default: build it with cargo)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.step_time:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "full", "--example", "step_time"],
                       check=True, cwd=root)
        args.step_time = os.path.join(root, "target", "release", "examples", "step_time")
    ours_shares, ours_cores = ours(args)
    torch_shares, torch_cores = pytorch(args)
    labels = [g for g, _ in PERF_GROUPS] + [g for g, _ in TORCH_GROUPS] + ["other"]
    labels = list(dict.fromkeys(labels))
    print(f"\nShare of a `{args.method}` training step's CPU time by kind of work, batch {args.batch} × {args.seq}, "
          f"{args.threads} threads\n")
    print("| kind of work | this crate (perf samples) | PyTorch (torch.profiler self time) |")
    print("| --- | ---: | ---: |")
    for label in labels:
        a, b = ours_shares.get(label, 0.0), torch_shares.get(label, 0.0)
        if a >= 0.05 or b >= 0.05:
            print(f"| {label} | {a:.1f}% | {b:.1f}% |")
    print(f"| cores kept busy (CPU time / wall time) | {ours_cores:.2f} | {torch_cores:.2f} |")


if __name__ == "__main__":
    main()
