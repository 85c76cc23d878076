//! PEFT folders: `adapter_config.json` parsing and `adapter_model.safetensors` header parsing
//! and factor grouping must never panic, and neither may export, quantization and merge of
//! whatever parses. The input is split in two at a length given by its first two bytes.
#![no_main]

mod common;

use kron_adapters::store::{PeftAdapter, PeftFileConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, tensors) = data[2..].split_at(n);
    let _ = PeftFileConfig::from_json("fuzz", config);
    if let Ok(adapter) = PeftAdapter::from_bytes("fuzz", config, tensors) {
        common::exercise(&adapter.adapters);
    }
});
