//! What every target does with adapters that parsed: the paths behind the parsers — writing,
//! exporting to PEFT, quantizing, merging — must return an error or succeed, never panic.

use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::store::{merge_bytes, peft_files, st, HostTensor, NativeAdapters, PeftAdapter, QuantizedAdapters};
use kron_adapters::NameMap;

type Cpu = burn::backend::NdArray;

/// Layers up to this many weights get a synthetic base to merge into (bigger ones are valid but
/// slow to fuzz).
const MERGE_LIMIT: usize = 1 << 14;

pub fn exercise(adapters: &NativeAdapters) {
    // Export to PEFT and read the export back.
    if let Ok((config, tensors)) = peft_files(adapters, None) {
        PeftAdapter::from_bytes("export", config.as_bytes(), &tensors)
            .expect("an exported PEFT folder reads back");
    }
    // Quantize, write, read back.
    for config in [
        QuantConfig::new(8, Level::Tensor).unwrap(),
        QuantConfig::new(4, Level::Block(7)).unwrap(),
        QuantConfig::new(4, Level::Channel).unwrap(),
    ] {
        if let Ok(q) = QuantizedAdapters::quantize(adapters, config) {
            let bytes = q.to_bytes().expect("quantized adapters write");
            QuantizedAdapters::from_bytes("q", &bytes).expect("a written quantized file reads back");
        }
    }
    // Merge into a base of zeros of the right shapes (small layers only).
    let small = adapters
        .meta
        .layers
        .values()
        .all(|s| s.d_in.saturating_mul(s.d_out) <= MERGE_LIMIT);
    if small {
        let entries: Vec<st::Entry> = adapters
            .meta
            .layers
            .iter()
            .map(|(name, s)| {
                let w = HostTensor {
                    shape: vec![s.d_out, s.d_in],
                    data: vec![0.0; s.d_out * s.d_in],
                };
                let key = if name.is_empty() { "weight".to_string() } else { format!("{name}.weight") };
                (key, safetensors::Dtype::F32, w.shape.clone(), w.f32_bytes())
            })
            .collect();
        if let Ok(base) = st::serialize("base", &entries, Default::default()) {
            let _ = merge_bytes::<Cpu>("base", &base, adapters, &NameMap::new(), &Default::default());
        }
    }
}
