#!/usr/bin/env python3
"""GGUF reader/dequantization fixture (tests/fixtures/gguf/).

Makes:

* quants.gguf — arch "test", metadata of every scalar value type plus string/i32/f32 arrays,
  and one tensor per ggml type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
  Q4_K, Q5_K, Q6_K), each of logical shape [3, 256] (PyTorch order; GGUF dims [256, 3]),
  named "t.<TYPE>". Types that gguf.quants can quantize hold quantized seeded N(0, 1) data;
  the K-quants (gguf 0.19 cannot quantize them) hold seeded random raw block bytes whose f16
  scale fields (d, and dmin where present) are overwritten with finite f16 values uniform in
  [-0.05, 0.05], so the dequantized values are finite.
* reference.safetensors — per tensor name, float32 [3, 256]: gguf.quants.dequantize of the bytes.
  The script also checks those arrays against a scalar port of ggml's C dequantize_row_* (bit
  for bit) and against a read-back with gguf.GGUFReader.
* reference.json — the metadata written (key, GGUF value type, value), and per tensor its
  ggml type id, GGUF dims, byte size and data offset.

Setup (CPU is enough):
    python3 -m venv venv && venv/bin/pip install gguf numpy safetensors torch
    (made with gguf 0.19.0)
Run from the repository root:
    venv/bin/python scripts/make_gguf_quant_fixture.py
"""

import json
import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from safetensors.torch import load_file, save_file

OUT = os.path.join("tests", "fixtures", "gguf")
ROWS, COLS = 3, 256

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

# Byte offsets of the f16 scale fields inside one block (ggml-common.h block layouts).
K_SCALE_OFFSETS = {
    T.Q2_K: [80, 82],  # scales[16] qs[64] d dmin
    T.Q3_K: [108],     # hmask[32] qs[64] scales[12] d
    T.Q4_K: [0, 2],    # d dmin scales[12] qs[128]
    T.Q5_K: [0, 2],    # d dmin scales[12] qh[32] qs[128]
    T.Q6_K: [208],     # ql[128] qh[64] scales[16] d
}

METADATA = [
    # (key, GGUF value type, value, array element type)
    ("general.name", V.STRING, "quant fixture", None),
    ("test.u8", V.UINT8, 200, None),
    ("test.i8", V.INT8, -100, None),
    ("test.u16", V.UINT16, 60000, None),
    ("test.i16", V.INT16, -30000, None),
    ("test.u32", V.UINT32, 4000000000, None),
    ("test.i32", V.INT32, -123456789, None),
    ("test.f32", V.FLOAT32, 0.1, None),  # stored as the f32 nearest 0.1
    ("test.bool_true", V.BOOL, True, None),
    ("test.bool_false", V.BOOL, False, None),
    ("test.u64", V.UINT64, 2**40 + 7, None),
    ("test.i64", V.INT64, -(2**40) - 7, None),
    ("test.f64", V.FLOAT64, 3.141592653589793, None),
    ("test.unicode", V.STRING, "héllo 日本語 🙂", None),
    ("test.string_array", V.ARRAY, ["alpha", "", "γάμμα", "<|im_start|>"], V.STRING),
    ("test.i32_array", V.ARRAY, [1, -2, 3, 2147483647], V.INT32),
    ("test.f32_array", V.ARRAY, [0.5, -1.25, 1e-3], V.FLOAT32),
]


# ---- an independent scalar port of ggml-quants.c dequantize_row_* (C order of operations) ---------
# Used only to check that gguf.quants.dequantize is bit-exact with ggml's reference code. Every
# product/sum is a numpy float32 scalar op, in the order the C code evaluates it.

f32 = np.float32


def _f16(b, o):
    return f32(np.frombuffer(bytes(b[o:o + 2]), dtype=np.float16)[0])


def _q4_0(b):
    d, qs, y = _f16(b, 0), b[2:18], np.zeros(32, f32)
    for j in range(16):
        y[j] = f32((int(qs[j]) & 15) - 8) * d
        y[j + 16] = f32((int(qs[j]) >> 4) - 8) * d
    return y


def _q4_1(b):
    d, m, qs, y = _f16(b, 0), _f16(b, 2), b[4:20], np.zeros(32, f32)
    for j in range(16):
        y[j] = f32(int(qs[j]) & 15) * d + m
        y[j + 16] = f32(int(qs[j]) >> 4) * d + m
    return y


def _q5(b, has_m):
    d = _f16(b, 0)
    m = _f16(b, 2) if has_m else None
    o = 4 if has_m else 2
    qh = int.from_bytes(bytes(b[o:o + 4]), "little")
    qs, y = b[o + 4:o + 20], np.zeros(32, f32)
    for j in range(16):
        x0 = (int(qs[j]) & 15) | (((qh >> j) << 4) & 0x10)
        x1 = (int(qs[j]) >> 4) | ((qh >> (j + 12)) & 0x10)
        if has_m:
            y[j], y[j + 16] = f32(x0) * d + m, f32(x1) * d + m
        else:
            y[j], y[j + 16] = f32(x0 - 16) * d, f32(x1 - 16) * d
    return y


def _q8_0(b):
    d, qs = _f16(b, 0), np.frombuffer(bytes(b[2:34]), dtype=np.int8)
    return np.array([f32(int(q)) * d for q in qs], f32)


def _q2_k(b):
    sc, qs, d, mn = b[0:16], b[16:80], _f16(b, 80), _f16(b, 82)
    y, k = [], 0
    for n in (0, 32):
        q, shift = qs[n:n + 32], 0
        for _ in range(4):
            for half in (0, 16):
                s = int(sc[k])
                k += 1
                dl, ml = d * f32(s & 15), mn * f32(s >> 4)
                y += [dl * f32((int(q[l + half]) >> shift) & 3) - ml for l in range(16)]
            shift += 2
    return np.array(y, f32)


def _q3_k(b):
    hm, qs, scales, d = b[0:32], b[32:96], b[96:108], _f16(b, 108)

    def scale(s):
        low4 = scales[s] & 15 if s < 8 else scales[s - 8] >> 4
        hi2 = (scales[8 + s % 4] >> (2 * (s // 4))) & 3
        return int(np.uint8(int(low4) | (int(hi2) << 4)).view(np.int8)) - 32

    sc = [scale(s) for s in range(16)]
    y, m, k = [], 1, 0
    for n in (0, 32):
        q, shift = qs[n:n + 32], 0
        for _ in range(4):
            for half in (0, 16):
                dl = d * f32(sc[k])
                k += 1
                y += [dl * f32(((int(q[l + half]) >> shift) & 3) - (0 if int(hm[l + half]) & m else 4))
                      for l in range(16)]
            shift += 2
            m <<= 1
    return np.array(y, f32)


def _scale_min_k4(j, q):
    q = [int(x) for x in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _q45_k(b, five):
    d, mn, sc = _f16(b, 0), _f16(b, 2), b[4:16]
    qh, ql = (b[16:48], b[48:176]) if five else (None, b[16:144])
    y, k, o, u1, u2 = [], 0, 0, 1, 2
    for _ in range(4):
        s, m = _scale_min_k4(k, sc)
        d1, m1 = d * f32(s), mn * f32(m)
        s, m = _scale_min_k4(k + 1, sc)
        d2, m2 = d * f32(s), mn * f32(m)
        q = ql[o:o + 32]
        h1 = [16 if five and int(qh[l]) & u1 else 0 for l in range(32)]
        h2 = [16 if five and int(qh[l]) & u2 else 0 for l in range(32)]
        y += [d1 * f32((int(q[l]) & 15) + h1[l]) - m1 for l in range(32)]
        y += [d2 * f32((int(q[l]) >> 4) + h2[l]) - m2 for l in range(32)]
        o, k, u1, u2 = o + 32, k + 2, u1 << 2, u2 << 2
    return np.array(y, f32)


def _q6_k(b):
    ql, qh, d = b[0:128], b[128:192], _f16(b, 208)
    sc = np.frombuffer(bytes(b[192:208]), dtype=np.int8)
    y = np.zeros(256, f32)
    for n in range(2):
        L, H, S, Y = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8], 128 * n
        for l in range(32):
            i = l // 16
            q1 = ((int(L[l]) & 15) | (((int(H[l]) >> 0) & 3) << 4)) - 32
            q2 = ((int(L[l + 32]) & 15) | (((int(H[l]) >> 2) & 3) << 4)) - 32
            q3 = ((int(L[l]) >> 4) | (((int(H[l]) >> 4) & 3) << 4)) - 32
            q4 = ((int(L[l + 32]) >> 4) | (((int(H[l]) >> 6) & 3) << 4)) - 32
            y[Y + l] = d * f32(int(S[i])) * f32(q1)
            y[Y + l + 32] = d * f32(int(S[i + 2])) * f32(q2)
            y[Y + l + 64] = d * f32(int(S[i + 4])) * f32(q3)
            y[Y + l + 96] = d * f32(int(S[i + 6])) * f32(q4)
    return y


SCALAR_PORT = {
    "Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20), "Q5_0": (lambda b: _q5(b, False), 22),
    "Q5_1": (lambda b: _q5(b, True), 24), "Q8_0": (_q8_0, 34), "Q2_K": (_q2_k, 84),
    "Q3_K": (_q3_k, 110), "Q4_K": (lambda b: _q45_k(b, False), 144),
    "Q5_K": (lambda b: _q45_k(b, True), 176), "Q6_K": (_q6_k, 210),
}


def dequantize_scalar(name, raw):
    fn, type_size = SCALAR_PORT[name]
    blocks = np.asarray(raw, np.uint8).reshape(-1, type_size)
    return np.concatenate([fn(blk) for blk in blocks])


def make_bytes(qtype, rng):
    """Return (uint8 array [ROWS, row_bytes] or float array [ROWS, COLS], how it was made)."""
    if qtype == T.F32:
        return rng.standard_normal((ROWS, COLS)).astype(np.float32), "N(0,1) f32"
    if qtype in K_SCALE_OFFSETS:
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        nblk = ROWS * COLS // block
        raw = rng.integers(0, 256, size=(nblk, tsize), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            scale = rng.uniform(-0.05, 0.05, size=nblk).astype(np.float16)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(nblk, 2)
        return raw.reshape(ROWS, -1), "random block bytes, f16 scales uniform(-0.05, 0.05)"
    data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    q = gguf.quants.quantize(data, qtype)
    return q, "gguf.quants.quantize of N(0,1)"


def main():
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "quants.gguf")
    rng = np.random.default_rng(20240531)

    w = gguf.GGUFWriter(path, "test")  # general.architecture = "test"
    for key, vt, val, sub in METADATA:
        w.add_key_value(key, val, vt, sub_type=sub)

    reference = {}
    made = {}
    for qtype in TYPES:
        name = f"t.{qtype.name}"
        arr, how = make_bytes(qtype, rng)
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, arr)
            raw = arr.view(np.uint8)
        else:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qtype)
            raw = arr
        deq = gguf.quants.dequantize(raw if qtype not in (T.F32, T.F16) else arr, qtype)
        deq = np.ascontiguousarray(deq, dtype=np.float32).reshape(ROWS, COLS)
        assert np.isfinite(deq).all(), name
        if qtype.name in SCALAR_PORT:
            c = dequantize_scalar(qtype.name, raw).reshape(ROWS, COLS)
            assert np.array_equal(c.view(np.uint32), deq.view(np.uint32)), name
        reference[name] = deq
        made[name] = how
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read back and check.
    r = gguf.GGUFReader(path)
    tinfo = []
    for t in r.tensors:
        qtype = t.tensor_type
        assert list(t.shape) == [COLS, ROWS], (t.name, t.shape)
        deq = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(ROWS, COLS)
        assert np.array_equal(deq, reference[t.name], equal_nan=False), t.name
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        assert t.n_bytes == ROWS * COLS // block * tsize
        tinfo.append({
            "name": t.name,
            "ggml_type": qtype.name,
            "ggml_type_id": int(qtype),
            "gguf_dims": [int(x) for x in t.shape],
            "shape": [ROWS, COLS],
            "block_size": block,
            "type_size": tsize,
            "n_bytes": int(t.n_bytes),
            "offset_in_data": int(t.data_offset - r.data_offset),
            "made_from": made[t.name],
        })
    meta = []
    for key, vt, val, sub in METADATA:
        f = r.fields[key]
        got = f.contents()
        if vt == V.FLOAT32:
            val = float(np.float32(val))
        elif vt == V.ARRAY and sub == V.FLOAT32:
            val = [float(np.float32(x)) for x in val]
        assert got == val, (key, got, val)
        assert f.types[0] == vt
        entry = {"key": key, "type": vt.name, "type_id": int(vt), "value": val}
        if sub is not None:
            entry["array_type"] = sub.name
            entry["array_type_id"] = int(sub)
        meta.append(entry)
    arch = r.fields["general.architecture"]
    assert arch.contents() == "test"
    meta.insert(0, {"key": "general.architecture", "type": "STRING", "type_id": int(V.STRING), "value": "test"})
    kv_count = [k for k in r.fields if not k.startswith("GGUF.")]
    assert len(kv_count) == len(meta), kv_count

    info = {
        "file": "quants.gguf",
        "version": int(r.fields["GGUF.version"].contents()),
        "alignment": r.alignment,
        "data_offset": int(r.data_offset),
        "file_size": os.path.getsize(path),
        "tensor_count": len(r.tensors),
        "metadata_kv_count": len(meta),
        "metadata": meta,
        "tensors": tinfo,
        "generator": {"gguf": "0.19.0", "numpy_seed": 20240531, "numpy": np.__version__},
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1, ensure_ascii=False)
        fh.write("\n")

    save_file({k: torch.from_numpy(v.copy()) for k, v in reference.items()},
              os.path.join(OUT, "reference.safetensors"),
              metadata={"source": "gguf.quants.dequantize of quants.gguf (gguf 0.19.0)"})
    back = load_file(os.path.join(OUT, "reference.safetensors"))
    assert set(back) == set(reference)
    for k in back:
        assert back[k].shape == (ROWS, COLS) and back[k].dtype == torch.float32
        print(f"{k:10s} absmax {back[k].abs().max().item():.4g}")
    for fn in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, fn)):>8}  {fn}")


if __name__ == "__main__":
    main()
