#!/usr/bin/env python3
"""Tiny Llama / Qwen2 reference fixtures (tests/fixtures/llama/).

Makes, all float32 and fully seeded (reruns give identical files):

* tiny_llama/         random LlamaForCausalLM (vocab 64, hidden 32, ffn 48, 2 layers, 4 heads,
                      2 kv heads), save_pretrained -> config.json + model.safetensors, plus
                      reference.safetensors (input_ids, attention_mask, logits).
* tiny_llama_tied/    the same with tie_word_embeddings=True (no lm_head.weight in the file).
* tiny_qwen2/         Qwen2ForCausalLM with the same sizes (random q/k/v biases).
* tiny_llama/peft_lora/ + tiny_llama/reference_lora.safetensors   LoRA r=4 alpha=8 on all 7
                      projections, random factors; logits and merged_logits.
* tiny_llama/peft_lokr/ + tiny_llama/reference_lokr.safetensors   LoKr r=2 alpha=4, random factors.
* tiny_llama/tiny_llama.gguf   the tiny_llama weights as llama.cpp's converter writes them
                      (arch "llama", F32, Q/K rows permuted), and tiny_llama/gguf_check.json.

See tests/fixtures/llama/README.md for every key and shape.

Setup (CPU is enough):
    python3 -m venv venv && venv/bin/pip install torch transformers peft gguf safetensors numpy
    (made with torch 2.15, transformers 5.24, peft 0.21.2, gguf 0.19)
Run from the repository root:
    venv/bin/python scripts/make_llama_fixtures.py
"""

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
from peft import LoKrConfig, LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

torch.set_num_threads(2)

OUT = os.path.join("tests", "fixtures", "llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)


def randomize(model, seed):
    """Every parameter ~ N(0, 0.2^2); norm weights 1 + 0.1*randn. In named_parameters() order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.2 * r)


def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (2, 7), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(2, 7, dtype=torch.int64)
    attention_mask[1, 5:] = 0  # right padding: last 2 positions of row 1
    return input_ids, attention_mask


@torch.no_grad()
def logits_of(model, input_ids, attention_mask):
    model.eval()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().contiguous()


def build(cls, cfg_cls, tie, seed, extra=None):
    cfg = cfg_cls(**SIZES, tie_word_embeddings=tie, **(extra or {}))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    randomize(model, seed)
    model.eval()
    return model


def save_model(model, d, input_ids, attention_mask):
    if os.path.isdir(d):
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    # Reload from disk with eager attention, so the logits are those of the saved file.
    cls = type(model)
    m2 = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m2.eval()
    logits = logits_of(m2, input_ids, attention_mask)
    ref = logits_of(model, input_ids, attention_mask)
    assert torch.equal(logits, ref), "reloaded model differs"
    save_file(
        {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits},
        os.path.join(d, "reference.safetensors"),
    )
    return m2, logits


def randomize_adapter(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "lokr_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32))
                n += 1
    assert n > 0
    return n


def drop_model_card(d):
    """save_pretrained also writes a boilerplate model card (README.md); no loader reads it."""
    os.remove(os.path.join(d, "README.md"))


# ---- GGUF -------------------------------------------------------------------------------------


def permute(weights, n_head, n_head_kv):
    """llama.cpp conversion/llama.py LlamaModel.permute (verbatim logic)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute(w, n):
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    return f"blk.{parts[2]}.{LAYER_MAP['.'.join(parts[3:])]}"


def write_gguf(model_dir, path):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    n_head = cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(path, "llama")  # writes general.architecture = "llama"
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = {}
    for hf in sorted(sd):  # the converter walks the safetensors keys (sorted)
        t = sd[hf].to(torch.float32)
        if hf.endswith("q_proj.weight"):
            t = permute(t, n_head, n_head)
        elif hf.endswith("k_proj.weight"):
            t = permute(t, n_head, n_kv)
        name = gguf_name(hf)
        names[hf] = name
        w.add_tensor(name, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd, names, n_head, n_kv


def check_gguf(path, sd, names, n_head, n_kv):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(sd), (len(tensors), len(sd))
    entries = []
    for hf, gname in names.items():
        t = tensors[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, (gname, t.tensor_type)
        data = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(sd[hf].shape)
        stored_equal = bool(torch.equal(data, sd[hf]))
        if hf.endswith("q_proj.weight"):
            back = unpermute(data, n_head)
        elif hf.endswith("k_proj.weight"):
            back = unpermute(data, n_kv)
        else:
            back = data
        exact = bool(torch.equal(back, sd[hf]))
        assert exact, gname
        entries.append(
            {
                "gguf": gname,
                "hf": hf,
                "ggml_type": t.tensor_type.name,
                "gguf_dims": [int(x) for x in t.shape],  # ne0 first
                "hf_shape": list(sd[hf].shape),
                "permuted": hf.endswith(("q_proj.weight", "k_proj.weight")),
                "stored_equals_hf_without_unpermute": stored_equal,
                "unpermuted_equals_hf_exactly": exact,
            }
        )
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        meta[k] = {"type": f.types[0].name, "value": v}
    # a spot check of the index map: GGUF row h*hd + 2i + j = HF row h*hd + j*half + i
    return {
        "gguf_file": os.path.basename(path),
        "reader": "gguf 0.19 GGUFReader",
        "all_exact": all(e["unpermuted_equals_hf_exactly"] for e in entries),
        "n_head": n_head,
        "n_head_kv": n_kv,
        "head_dim": sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // n_head,
        "unpermute": "hf = w.reshape(n, rows//n//2, 2, cols).swapaxes(1, 2).reshape(rows, cols); n = n_head for Q, n_head_kv for K",
        "index_map": "GGUF row h*hd + 2*i + j == HF row h*hd + j*(hd/2) + i",
        "metadata": meta,
        "tensors": entries,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    input_ids, attention_mask = make_inputs(1234)

    # (a) tiny_llama
    d_llama = os.path.join(OUT, "tiny_llama")
    llama = build(LlamaForCausalLM, LlamaConfig, tie=False, seed=0)
    llama, logits = save_model(llama, d_llama, input_ids, attention_mask)
    keys = set(load_file(os.path.join(d_llama, "model.safetensors")))
    assert "lm_head.weight" in keys

    # (b) tiny_llama_tied
    d_tied = os.path.join(OUT, "tiny_llama_tied")
    tied = build(LlamaForCausalLM, LlamaConfig, tie=True, seed=1)
    tied, _ = save_model(tied, d_tied, input_ids, attention_mask)
    keys = set(load_file(os.path.join(d_tied, "model.safetensors")))
    assert "lm_head.weight" not in keys, keys
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()

    # (c) tiny_qwen2
    d_qwen = os.path.join(OUT, "tiny_qwen2")
    qwen = build(Qwen2ForCausalLM, Qwen2Config, tie=False, seed=2)
    for n, _ in qwen.named_parameters():
        if "bias" in n:
            assert any(p in n for p in ("q_proj", "k_proj", "v_proj")), n
    qwen, _ = save_model(qwen, d_qwen, input_ids, attention_mask)
    keys = set(load_file(os.path.join(d_qwen, "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys

    # (d) LoRA on tiny_llama
    base = LlamaForCausalLM.from_pretrained(d_llama, dtype=torch.float32, attn_implementation="eager")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    pm = get_peft_model(base, cfg)
    randomize_adapter(pm, seed=10)
    pm.eval()
    d_lora = os.path.join(d_llama, "peft_lora")
    if os.path.isdir(d_lora):
        shutil.rmtree(d_lora)
    pm.save_pretrained(d_lora, safe_serialization=True)
    drop_model_card(d_lora)
    lora_logits = logits_of(pm, input_ids, attention_mask)
    merged = pm.merge_and_unload()
    merged_logits = logits_of(merged, input_ids, attention_mask)
    diff = (lora_logits - merged_logits).abs().max().item()
    assert diff < 1e-4, diff
    assert (lora_logits - logits).abs().max().item() > 0.1
    save_file(
        {"logits": lora_logits, "merged_logits": merged_logits},
        os.path.join(d_llama, "reference_lora.safetensors"),
    )
    print(f"lora: max |logits - merged_logits| = {diff:.3g}")

    # (e) LoKr on tiny_llama
    base = LlamaForCausalLM.from_pretrained(d_llama, dtype=torch.float32, attn_implementation="eager")
    cfg = LoKrConfig(r=2, alpha=4, target_modules=TARGETS)
    pm = get_peft_model(base, cfg)
    n = randomize_adapter(pm, seed=11)
    pm.eval()
    d_lokr = os.path.join(d_llama, "peft_lokr")
    if os.path.isdir(d_lokr):
        shutil.rmtree(d_lokr)
    pm.save_pretrained(d_lokr, safe_serialization=True)
    drop_model_card(d_lokr)
    lokr_logits = logits_of(pm, input_ids, attention_mask)
    merged = pm.merge_and_unload()
    lokr_merged = logits_of(merged, input_ids, attention_mask)
    ldiff = (lokr_logits - lokr_merged).abs().max().item()
    assert ldiff < 1e-4, ldiff
    assert (lokr_logits - logits).abs().max().item() > 0.1
    save_file({"logits": lokr_logits}, os.path.join(d_llama, "reference_lokr.safetensors"))
    print(f"lokr: {n} factor tensors; max |logits - merged| = {ldiff:.3g}")

    # Round trip: reload the saved adapters from disk and check the logits.
    for sub, ref in (("peft_lora", lora_logits), ("peft_lokr", lokr_logits)):
        base = LlamaForCausalLM.from_pretrained(d_llama, dtype=torch.float32, attn_implementation="eager")
        pm = peft.PeftModel.from_pretrained(base, os.path.join(d_llama, sub))
        got = logits_of(pm, input_ids, attention_mask)
        assert torch.equal(got, ref), sub

    # (f) GGUF
    path = os.path.join(d_llama, "tiny_llama.gguf")
    sd, names, n_head, n_kv = write_gguf(d_llama, path)
    check = check_gguf(path, sd, names, n_head, n_kv)
    assert check["all_exact"]
    with open(os.path.join(d_llama, "gguf_check.json"), "w") as f:
        json.dump(check, f, indent=1)
        f.write("\n")

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    print("versions", versions)
    for root, _, files in os.walk(OUT):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            print(f"{os.path.getsize(p):>8}  {p}")


if __name__ == "__main__":
    main()
