//! Merging an adapter file into a base checkpoint, both from the input (split at a length in
//! its first four bytes): any base — wrong shapes, dtypes, names, a damaged header — gives an
//! error or a merged checkpoint, never a panic.
#![no_main]

use kron_adapters::store::{merge_bytes, st, NativeAdapters};
use kron_adapters::NameMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let n = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 4);
    let (adapter, base) = data[4..].split_at(n);
    if let Ok(adapters) = NativeAdapters::from_bytes("fuzz", adapter) {
        let device = Default::default();
        let merged =
            merge_bytes::<burn::backend::NdArray>("base", base, &adapters, &NameMap::new(), &device);
        // A merge that succeeds writes a checkpoint that reads back with the base's tensors.
        if let Ok((out, _)) = merged {
            let out = st::parse("out", &out).expect("a merged checkpoint parses");
            let base = st::parse("base", base).expect("a merged base parsed");
            let mut names = out.names();
            names.sort();
            let mut want = base.names();
            want.sort();
            assert_eq!(names, want);
        }
    }
});
