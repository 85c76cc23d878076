//! This crate's adapter files: safetensors header and metadata parsing must never panic, and
//! whatever parses must write back to the same bytes (compared as bytes: factors may hold NaN,
//! which `==` on floats would call unequal to itself).
#![no_main]

use kron_adapters::NativeAdapters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = NativeAdapters::from_bytes("fuzz", data) {
        let bytes = file.to_bytes();
        let again = NativeAdapters::from_bytes("fuzz", &bytes).expect("a written file reads back");
        assert!(again.to_bytes() == bytes, "writing is not idempotent");
    }
});
