"""Seeds for the `merge` fuzz target: an adapter file from `seeds/adapter_file/` and a base
checkpoint with a weight for each of its layers, joined as the target reads them (the adapter's
length in four little-endian bytes, the adapter, the base). The bases hold random weights in
f32, f16 and bf16, with a bias, an untouched tensor and metadata beside them.

    python3 fuzz/make_merge_seeds.py          # writes fuzz/seeds/merge/*
"""
import json
import random
import struct
from pathlib import Path

HERE = Path(__file__).parent


def header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


def encode(values, dtype: str) -> bytes:
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    # bf16: the upper half of each f32
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def safetensors(tensors, metadata) -> bytes:
    head, body = {"__metadata__": metadata}, b""
    for name, dtype, shape, data in tensors:
        head[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def main():
    rng = random.Random(0)
    out = HERE / "seeds" / "merge"
    out.mkdir(parents=True, exist_ok=True)
    for adapter, dtype in [("krona", "F32"), ("kronlora", "BF16"), ("krona", "F16")]:
        data = (HERE / "seeds" / "adapter_file" / f"{adapter}.safetensors").read_bytes()
        layers = json.loads(header(data)["__metadata__"]["kron_adapters"])["layers"]
        tensors = []
        for name, spec in sorted(layers.items()):
            d_in, d_out = spec["d_in"], spec["d_out"]
            w = [rng.uniform(-0.1, 0.1) for _ in range(d_in * d_out)]
            tensors.append((f"{name}.weight", dtype, [d_out, d_in], encode(w, dtype)))
            tensors.append((f"{name}.bias", dtype, [d_out], encode([0.01] * d_out, dtype)))
        tensors.append(("embeddings.word.weight", dtype, [4, 8], encode([0.5] * 32, dtype)))
        base = safetensors(tensors, {"format": "pt"})
        seed = struct.pack("<I", len(data)) + data + base
        (out / f"{adapter}_{dtype.lower()}").write_bytes(seed)
        print(out / f"{adapter}_{dtype.lower()}", len(seed))


if __name__ == "__main__":
    main()
