//! GGUF files (the decoder's weights): the header, metadata and tensor table parse or give an
//! error, never a panic; whatever parses dequantizes every tensor (or refuses it) and builds a
//! Llama model from it (or says what does not fit), never panicking or allocating beyond what
//! the file's bytes describe.
#![no_main]

use kron_adapters::model::llama;
use kron_adapters::store::gguf::GgufFile;
use kron_adapters::PlacementConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes("fuzz", data.to_vec()) {
        for info in &file.tensors {
            if let Ok(values) = file.dequantize_info(info) {
                assert_eq!(values.len(), info.numel(), "{}: dequantized length", info.name);
            }
        }
        let device = Default::default();
        let _ = llama::from_gguf::<burn::backend::NdArray>(&file, "fuzz", &PlacementConfig::new(), &device);
    }
});
