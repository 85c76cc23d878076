#!/usr/bin/env python3
"""PEFT fixtures for the rules this crate must match exactly (tests/fixtures/peft/<case>/).

The four original cases (lora_d48, lokr_*_d48, lokr_both_d64) came with the project (see
tests/fixtures/README.md); this script makes the cases that pin PEFT's behaviour where this
crate once differed:

* lokr_no_alpha_d48 — an adapter_config.json without "alpha": PEFT's LoKrConfig default (8).
* lokr_pattern_order_d48 — rank_pattern/alpha_pattern keys that select the same module, listed
  in an order that is not sorted: PEFT takes the first key in the file's order.
* lokr_rank_above_min_d48 — a rank above min(out_k, in_n) but below max(out_k, in_n)/2, which
  PEFT stores as lokr_w2_a/lokr_w2_b (an FFN 48 → 192 with decompose_factor 16: w2 [12, 3],
  r = 4).

Each case holds what the original ones hold: base.safetensors, adapter/ (a real
save_pretrained, edited where the case says), delta.safetensors (PEFT's get_delta_weight per
targeted module, after loading the folder back with PeftModel.from_pretrained), merged.safetensors
(merge_and_unload), io.safetensors (x and PEFT's unmerged y) and meta.json. A case whose
config PEFT refuses records the refusal in meta.json.

Setup (CPU is enough): python3 -m venv venv && venv/bin/pip install torch peft safetensors
Run from the repository root: venv/bin/python scripts/make_peft_fixtures.py
"""

import json
import os
import shutil
import tempfile

import peft
import torch
from peft import LoKrConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join("tests", "fixtures", "peft")


class Layer(torch.nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.attention = torch.nn.Module()
        self.attention.self = torch.nn.Module()
        self.attention.self.query = torch.nn.Linear(d, d)
        self.attention.self.value = torch.nn.Linear(d, d)
        self.intermediate = torch.nn.Module()
        self.intermediate.dense = torch.nn.Linear(d, ffn)
        self.output = torch.nn.Module()
        self.output.dense = torch.nn.Linear(ffn, d)


class Net(torch.nn.Module):
    """The fixtures' network (tests/fixtures/README.md)."""

    def __init__(self, d, ffn, layers):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList([Layer(d, ffn) for _ in range(layers)])
        self.pooler = torch.nn.Linear(d, d)

    def forward(self, x):
        for layer in self.encoder.layer:
            x = x + layer.attention.self.value(torch.tanh(layer.attention.self.query(x)))
            x = x + layer.output.dense(torch.relu(layer.intermediate.dense(x)))
        return self.pooler(x)


TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def make(case, config, d=48, ffn=96, layers=2, seed=20, edit=None):
    torch.manual_seed(seed)
    net = Net(d, ffn, layers)
    base = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    model = get_peft_model(net, config)
    # Non-zero factors (PEFT zero-initialises one), seeded, in a recorded order.
    order = []
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lokr_" in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                order.append(name)
    dirname = os.path.join(OUT, case)
    shutil.rmtree(dirname, ignore_errors=True)
    os.makedirs(dirname)
    save_file(base, os.path.join(dirname, "base.safetensors"))
    adapter = os.path.join(dirname, "adapter")
    model.save_pretrained(adapter)
    meta = {"case": case, "d": d, "ffn": ffn, "layers": layers, "seed": seed,
            "randn_std": 0.2, "randomised_params_in_order": order,
            "torch": torch.__version__, "peft": peft.__version__}
    cfg_path = os.path.join(adapter, "adapter_config.json")
    if edit is not None:
        with open(cfg_path) as f:
            cfg = json.load(f)
        edit(cfg)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        meta["edited_config"] = True
    # What PEFT makes of the folder as written: load it back into a fresh base.
    fresh = Net(d, ffn, layers)
    fresh.load_state_dict(base)
    try:
        loaded = PeftModel.from_pretrained(fresh, adapter)
    except Exception as e:  # PEFT refuses the folder: record it, no outputs
        meta["peft_refuses"] = f"{type(e).__name__}: {e}"[:400]
        with open(os.path.join(dirname, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        return meta
    deltas = {}
    for name, module in loaded.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "active_adapters"):
            key = name.replace("base_model.model.", "", 1)
            deltas[f"{key}.delta_weight"] = module.get_delta_weight("default").detach().contiguous()
            shapes = {n: list(p.shape) for n, p in module.named_parameters() if "lokr_" in n}
            meta.setdefault("factor_shapes", {})[key] = shapes
    save_file(deltas, os.path.join(dirname, "delta.safetensors"))
    x = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        y = loaded(x)
    save_file({"x": x.contiguous(), "y": y.contiguous()}, os.path.join(dirname, "io.safetensors"))
    merged = loaded.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
              os.path.join(dirname, "merged.safetensors"))
    with torch.no_grad():
        meta["max_abs_y_minus_merged"] = (merged(x) - y).abs().max().item()
    with open(os.path.join(dirname, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main():
    # 1. No "alpha" in the config: PEFT's default applies (8; scale 8 / r = 4).
    make("lokr_no_alpha_d48", LoKrConfig(r=2, alpha=8, target_modules=TARGETS),
         edit=lambda c: c.pop("alpha"))
    # 2. Two keys select layer 0's query; PEFT takes the first in the file's order ("query":
    # r = 2, alpha 6), although sorted order would pick the other ("encoder..." < "query").
    # save_pretrained writes the config with sorted keys, so the patterns are written back in
    # the order they were given: a hand-edited (unsorted) file, which PEFT loads as ordered.
    layer0_query = "encoder\\.layer\\.0\\.attention\\.self\\.query"
    ranks = {"query": 2, layer0_query: 3}
    alphas = {"query": 6.0, layer0_query: 9.0}
    make("lokr_pattern_order_d48",
         LoKrConfig(r=1, alpha=2, target_modules=TARGETS, rank_pattern=ranks,
                    alpha_pattern=alphas),
         seed=30, edit=lambda c: c.update(rank_pattern=ranks, alpha_pattern=alphas))
    # 3. r = 4 on w2 [12, 3] (48 → 192 with factor 16): above min = 3, below max/2 = 6.
    make("lokr_rank_above_min_d48",
         LoKrConfig(r=4, alpha=4, decompose_factor=16, target_modules=TARGETS),
         ffn=192, seed=40)
    # 4. The config's r disagrees with lokr_w2_a/lokr_w2_b (r edited 2 → 3): PEFT refuses.
    tmp = make("lokr_r_mismatch_d48", LoKrConfig(r=2, alpha=4, target_modules=TARGETS),
               edit=lambda c: c.update(r=3), seed=50)
    assert "peft_refuses" in tmp, "PEFT was expected to refuse a rank that the tensors contradict"
    print("wrote", ", ".join(["lokr_no_alpha_d48", "lokr_pattern_order_d48",
                              "lokr_rank_above_min_d48", "lokr_r_mismatch_d48"]))


if __name__ == "__main__":
    main()
