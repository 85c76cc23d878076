"""Greedy decoding speed and peak memory, side by side on the CPU: this crate's CLI with float32
and with int8 frozen weights (`--base-weights int8`), and `transformers` in float32 and with
PyTorch's dynamic int8 quantization of its linear layers, on the same SmolLM2 weights, prompt
and number of new tokens. Each run is its own process (peak memory from the kernel), the
configurations alternated round by round; the table gives each one's median tokens a second
after the prompt (the prompt's own pass excluded) and its median peak memory.

Setup (the venv of scripts/side_by_side.py):
    python3 -m venv /work/venv && /work/venv/bin/pip install torch transformers
    kron-adapters export-hf --model SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2-f32
(the GGUF's weights as a float32 folder, so that both sides run the same weights)

Run:
    /work/venv/bin/python scripts/decode_side_by_side.py --cli target/release/kron-adapters \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --hf /tmp/smollm2-f32 --tokens 200 --rounds 3
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon."


def child_torch(hf, tokens, int8):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    if int8:
        model = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        # The prompt's pass and one token, then the timed tokens (as the CLI's rate counts).
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(json.dumps({"tokens": new, "rate": (new - 1) / max(total - first, 1e-9)}))


def measure(args, name):
    if name.startswith("crate"):
        cmd = [args.cli, "generate", "--model", args.gguf, "--prompt", PROMPT, "--chat"]
        cmd += ["--max-new-tokens", str(args.tokens)]
        if name == "crate int8":
            cmd += ["--base-weights", "int8"]
        _, err, mb = run_peak(cmd)
        m = re.search(r"(\d+) new tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", err)
        return float(m.group(3)), int(m.group(1)), mb
    cmd = [sys.executable, __file__, "--child", name, "--hf", args.hf]
    cmd += ["--tokens", str(args.tokens)]
    out, _, mb = run_peak(cmd)
    r = json.loads(out.strip().splitlines()[-1])
    return r["rate"], r["tokens"], mb


def run_peak(cmd):
    """Runs `cmd` alone; its stdout, stderr and peak resident memory in MB (`/usr/bin/time`)."""
    p = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_KB %M"] + cmd, capture_output=True, text=True
    )
    if p.returncode != 0:
        sys.exit(f"{cmd} failed:\n{p.stderr}")
    kb = int(re.search(r"PEAK_KB (\d+)", p.stderr).group(1))
    return p.stdout, p.stderr, kb / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli")
    ap.add_argument("--gguf")
    ap.add_argument("--hf", required=True)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child_torch(args.hf, args.tokens, args.child == "torch int8")
        return
    names = ["crate f32", "crate int8", "torch f32", "torch int8"]
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else reversed(names):
            rate, tokens, mb = measure(args, n)
            runs[n].append((rate, tokens, mb))
            print(f"round {r + 1}: {n}: {rate:.1f} tokens/s ({tokens} new), {mb:.0f} MB",
                  file=sys.stderr)
    print("| | tokens/s (median) | rounds | peak MB (median) |")
    print("| --- | ---: | --- | ---: |")
    for n in names:
        rates = [x[0] for x in runs[n]]
        mbs = [x[2] for x in runs[n]]
        print(f"| {n} | {statistics.median(rates):.1f} | "
              f"{' / '.join(f'{x:.1f}' for x in rates)} | {statistics.median(mbs):.0f} |")


if __name__ == "__main__":
    main()
