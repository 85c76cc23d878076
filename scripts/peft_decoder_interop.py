#!/usr/bin/env python3
"""Interchange check for decoders, both directions, on the real SmolLM2-135M-Instruct GGUF:

1. an adapter trained by this crate (examples/llm.rs writes RUN/peft, a PEFT folder) loads into
   transformers' LlamaForCausalLM with PEFT and gives the same greedy continuation as
   `kron-adapters generate --adapter RUN/peft` (and the same first logits, to ~1e-3);
2. `kron-adapters export-hf --adapter RUN/peft` writes a merged Hugging Face folder that
   transformers loads and runs with the same continuation.

Setup: python3 -m venv venv && venv/bin/pip install torch transformers peft gguf
Run (after `cargo build --release --features full --bin kron-adapters` and the llm example):
    venv/bin/python scripts/peft_decoder_interop.py MODEL.gguf runs/llm-kron-lora-arc_easy-seed0
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Question: Which gas do plants take in from the air?\nAnswer:"
NEW = 16


def greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW)
        logits = model(torch.tensor([ids])).logits[0, -1]
    return out[0, len(ids):].tolist(), logits


def main():
    torch.set_num_threads(2)
    gguf, run = sys.argv[1], sys.argv[2]
    binary = os.path.join("target", "release", "kron-adapters")
    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, os.path.join(run, "peft")).eval()
    want, logits = greedy(peft_model, ids)
    text = tok.decode(want, skip_special_tokens=True)
    ours = subprocess.run(
        [binary, "generate", "--model", gguf, "--adapter", os.path.join(run, "peft"),
         "--prompt", PROMPT, "--max-new-tokens", str(NEW)],
        check=True, capture_output=True, text=True).stdout
    report = {"prompt": PROMPT, "peft_continuation": text, "kron_adapters_continuation": ours.rstrip("\n"),
              "same_text": ours.rstrip("\n") == text}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "merged")
        subprocess.run([binary, "export-hf", "--model", gguf, "--adapter", os.path.join(run, "peft"),
                        "--out", out], check=True, capture_output=True, text=True)
        merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        got, merged_logits = greedy(merged, ids)
        report["exported_folder_continuation"] = tok.decode(got, skip_special_tokens=True)
        report["exported_same_tokens_as_peft"] = got == want
        report["exported_vs_peft_max_abs_logit_diff"] = (merged_logits - logits).abs().max().item()
        mtok = AutoTokenizer.from_pretrained(out)
        report["exported_tokenizer_same_ids"] = mtok(PROMPT, add_special_tokens=False)["input_ids"] == ids
    report["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                          "peft": __import__("peft").__version__}
    print(json.dumps(report, indent=1))
    ok = report["same_text"] and report["exported_same_tokens_as_peft"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
