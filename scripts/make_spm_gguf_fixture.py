#!/usr/bin/env python3
"""SentencePiece GGUF tokenizer fixture (tests/fixtures/spm/).

Llama 2, Mistral, TinyLlama and Gemma GGUF files carry a SentencePiece tokenizer
(`tokenizer.ggml.model = "llama"`): pieces, scores and token types, no merges. This script
trains a small SentencePiece BPE model with Llama 2's settings (byte fallback, digits split,
a dummy prefix, no whitespace folding, identity normalization) and writes:

* tokenizer.gguf — the model's pieces as llama.cpp's converter writes them
  (`_set_vocab_sentencepiece`): `tokenizer.ggml.tokens`, `.scores`, `.token_type` (1 normal,
  2 unknown, 3 control, 5 unused, 6 byte), the special ids, `add_bos_token`, `add_space_prefix`.
* reference.json — for each text, the ids `sentencepiece` gives (no BOS) and its decoding.
* hf/ — the same tokenizer as `transformers` writes a Llama 2-style model's fast tokenizer
  (`tokenizer.json`: a byte-fallback BPE with a `Metaspace` pre-tokenizer;
  `tokenizer_config.json`), converted from a SentencePiece model rebuilt from tokenizer.gguf's
  pieces, scores and types, and hf/reference.json with `transformers`' ids for the same texts.

Setup (CPU): python3 -m venv venv && venv/bin/pip install sentencepiece gguf numpy protobuf
transformers (made with sentencepiece 0.2.3, gguf 0.19.0, protobuf 7.36.2, transformers 5.25.0).
Run from the repository root:
    venv/bin/python scripts/make_spm_gguf_fixture.py            # trains; writes everything
    venv/bin/python scripts/make_spm_gguf_fixture.py --hf-only  # hf/ from the committed GGUF
The training text is this repository's docs, which change: `--hf-only` leaves the committed
tokenizer.gguf and reference.json as they are.
"""

import io
import json
import os
import sys
import tempfile

import gguf
import sentencepiece as spm

OUT = "tests/fixtures/spm"

# The training text: this repository's README and method notes, deterministic and in the tree.
CORPUS = ["README.md", "docs/methods.md", "docs/llm.md"]

TEXTS = [
    "Hello world",
    "The Kronecker product of two small factors, A ⊗ B, adapts a frozen weight.",
    "  leading spaces, and  double  spaces  ",
    "digits 1234567890 and 3.14159",
    "tabs\tand\nnewlines\n\n",
    "accents: café, naïve, Zürich; other scripts: 漢字, Ελληνικά, русский",
    "emoji 🙂 and symbols ∑ ∞ ≠",
    "x",
    "",
]


def main():
    lines = []
    for path in CORPUS:
        with open(path, encoding="utf-8") as f:
            lines.extend(line.strip() for line in f if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    os.makedirs(OUT, exist_ok=True)
    w = gguf.GGUFWriter(os.path.join(OUT, "tokenizer.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases = []
    for text in TEXTS:
        ids = sp.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": sp.decode(ids)})
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"vocab_size": n, "bos": 1, "eos": 2, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"{n} pieces, {sum(t == 6 for t in types)} byte pieces; {len(cases)} cases")


def write_hf():
    """hf/: transformers' fast tokenizer for the SentencePiece model tokenizer.gguf holds."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(os.path.join(OUT, "tokenizer.gguf"))

    def field(name):
        f = reader.fields["tokenizer.ggml." + name]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode("utf-8") for p in field("tokens")]
    scores = [float(p[0]) for p in field("scores")]
    types = [int(p[0]) for p in field("token_type")]
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind  # the same numbering
    t = proto.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = pb.TrainerSpec.BPE, len(tokens), True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.split_digits = True
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces = "identity", True, False
    ns.escape_whitespaces = True
    model = proto.SerializeToString()
    # The rebuilt model tokenizes as the trained one did.
    sp = spm.SentencePieceProcessor(model_proto=model)
    with open(os.path.join(OUT, "reference.json"), encoding="utf-8") as f:
        for case in json.load(f)["cases"]:
            assert sp.encode(case["text"]) == case["ids"], case["text"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        tok = AutoTokenizer.from_pretrained(tmp)
        hf = os.path.join(OUT, "hf")
        tok.save_pretrained(hf)
    for name in os.listdir(hf):
        if name not in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(hf, name))
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    with open(os.path.join(hf, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"hf/: {type(tok).__name__}, {len(cases)} cases")


if __name__ == "__main__":
    if "--hf-only" not in sys.argv[1:]:
        main()
    write_hf()
