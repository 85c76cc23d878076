#!/usr/bin/env python3
"""Q8_0 GGUF reference (tests/fixtures/llama/tiny_llama/tiny_llama_q8_0.gguf).

llama.cpp's converter with `--outtype q8_0` stores 2-D weights as Q8_0 (blocks of 32 values:
an f16 scale and 32 int8s, ggml-quants.c's reference rounding), falls back to F16 for a weight
whose rows are not a whole number of blocks, and keeps 1-D tensors (norms) in F32. This script
applies that rule, with the `gguf` package's bit-exact port of ggml's quantizer, to the tensors
of tiny_llama.gguf (the F32 file `scripts/make_llama_fixtures.py` writes as the converter
does) and copies its metadata with `general.file_type` MOSTLY_Q8_0. `export-gguf --dtype q8_0`
of the same weights must give the same bytes for every tensor.

Setup (CPU): python3 -m venv venv && venv/bin/pip install gguf numpy  (made with gguf 0.19.0)
Run from the repository root: venv/bin/python scripts/make_q8_0_gguf_fixture.py
"""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

SRC = "tests/fixtures/llama/tiny_llama/tiny_llama.gguf"
OUT = "tests/fixtures/llama/tiny_llama/tiny_llama_q8_0.gguf"


def main():
    r = gguf.GGUFReader(SRC)
    w = gguf.GGUFWriter(OUT, "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        if key == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    kinds = {}
    for t in r.tensors:
        assert t.tensor_type == T.F32, t.name
        data = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if data.ndim == 1:
            qtype, raw = T.F32, data
        else:
            try:
                qtype, raw = T.Q8_0, gguf.quants.quantize(data, T.Q8_0)
            except gguf.QuantError:  # rows not a whole number of blocks: the converter's fallback
                qtype, raw = T.F16, gguf.quants.quantize(data, T.F16)
        w.add_tensor(t.name, raw, raw_dtype=qtype)
        kinds[qtype.name] = kinds.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(OUT, kinds)


if __name__ == "__main__":
    main()
