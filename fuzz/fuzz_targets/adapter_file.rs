//! This crate's adapter files (native and quantized): parsing must never panic, whatever
//! parses must write back to the same bytes (compared as bytes: factors may hold NaN, which
//! `==` on floats would call unequal to itself), and export, quantization and merge of it must
//! not panic either.
#![no_main]

mod common;

use kron_adapters::NativeAdapters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = NativeAdapters::from_bytes("fuzz", data) {
        let bytes = file.to_bytes().expect("a file that reads writes");
        let again = NativeAdapters::from_bytes("fuzz", &bytes).expect("a written file reads back");
        assert!(again.to_bytes().unwrap() == bytes, "writing is not idempotent");
        common::exercise(&file);
    }
});
