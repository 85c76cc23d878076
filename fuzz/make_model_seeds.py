"""Seeds for the `model_dir` fuzz target: a model folder's `config.json` and `model.safetensors`
joined as the target reads them (a zero byte: no field edits; the config's length in two
little-endian bytes, the config, the weights). The decoders are the test fixtures `tests/fixtures/llama/*` (Llama, tied
embeddings, Qwen2); the encoder is a tiny BERT with random weights under Hugging Face's names.

    python3 fuzz/make_model_seeds.py          # writes fuzz/seeds/model_dir/*
"""
import json
import random
import struct
from pathlib import Path

from make_merge_seeds import encode, safetensors

HERE = Path(__file__).parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "llama"


def seed(config: bytes, weights: bytes) -> bytes:
    # No field edits (the first byte), then the folder as it is.
    return b"\x00" + struct.pack("<H", len(config)) + config + weights


def bert(rng: random.Random) -> bytes:
    d, ffn, layers, vocab, positions = 16, 32, 1, 24, 8
    config = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab,
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": ffn,
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
    }
    shapes = [
        ("embeddings.word_embeddings.weight", [vocab, d]),
        ("embeddings.position_embeddings.weight", [positions, d]),
        ("embeddings.token_type_embeddings.weight", [2, d]),
        ("embeddings.LayerNorm.weight", [d]),
        ("embeddings.LayerNorm.bias", [d]),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name, o, n in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", ffn, d),
            ("output.dense", d, ffn),
        ]:
            shapes += [(f"{p}.{name}.weight", [o, n]), (f"{p}.{name}.bias", [o])]
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"]:
            shapes += [(f"{p}.{ln}.weight", [d]), (f"{p}.{ln}.bias", [d])]
    tensors = []
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        values = [rng.uniform(-0.1, 0.1) for _ in range(n)]
        tensors.append((name, "F32", shape, encode(values, "F32")))
    return seed(json.dumps(config).encode(), safetensors(tensors, {"format": "pt"}))


def main():
    out = HERE / "seeds" / "model_dir"
    out.mkdir(parents=True, exist_ok=True)
    seeds = {"bert": bert(random.Random(0))}
    for folder in sorted(FIXTURES.iterdir()):
        if (folder / "config.json").exists():
            config = (folder / "config.json").read_bytes()
            seeds[folder.name] = seed(config, (folder / "model.safetensors").read_bytes())
    # Each folder again with three field edits (10 bytes each: field, kind, payload) in front,
    # so that mutations start from inputs whose edit bytes line up.
    rng = random.Random(1)
    for name, data in list(seeds.items()):
        edits = bytes(rng.randrange(256) for _ in range(30))
        seeds[f"{name}_edited"] = b"\x03" + edits + data[1:]
    for name, data in seeds.items():
        (out / name).write_bytes(data)
        print(out / name, len(data))


if __name__ == "__main__":
    main()
