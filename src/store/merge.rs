//! Merging adapters into a base checkpoint file: every adapted weight of a PyTorch-layout
//! safetensors file (`<name>.weight`, `[out, in]`) replaced by `W + ΔW` in its own dtype, every
//! other tensor copied as is. The merge itself is [`AdaptedLinear::merge`], the crate's one
//! merge (with its NaN/Inf refusal).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;

use super::native::NativeAdapters;
use super::st::{self, HostTensor};
use crate::error::AdapterError;
use crate::linear::AdaptedLinear;
use crate::place::NameMap;

/// What [`merge_checkpoint`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeReport {
    /// The base tensors replaced, in the file's names.
    pub merged: Vec<String>,
    /// Bytes written.
    pub bytes: u64,
}

/// Merges `adapters` into the base checkpoint `base` (safetensors, PyTorch names and `[out, in]`
/// layout, F32/F16/BF16 weights) and writes the result to `out` atomically (refusing an
/// existing `out` unless `overwrite`). Adapter layer names map to base names through `map`
/// (the weight is `<mapped name>.weight`). Fails, writing nothing, when a layer has no weight in
/// the base, a weight's shape or dtype does not fit, or a merged weight would hold NaN/Inf.
/// The arithmetic runs on `B` (any backend; the command-line tool uses the CPU).
pub fn merge_checkpoint<B: Backend>(
    base: &Path,
    adapters: &NativeAdapters,
    map: &NameMap,
    out: &Path,
    overwrite: bool,
    device: &B::Device,
) -> Result<MergeReport, AdapterError> {
    st::refuse_existing(out, overwrite)?;
    let base_bytes = super::read_file(base)?;
    let shown = base.display().to_string();
    let mut report = MergeReport {
        merged: Vec::new(),
        bytes: 0,
    };
    // Streamed: the base is held once, a merged weight only while it is written.
    st::write_atomic_with(out, &mut |w| {
        (report.bytes, report.merged) =
            merge_into::<B>(&shown, &base_bytes, adapters, map, device, w)?;
        Ok(())
    })?;
    Ok(report)
}

/// [`merge_checkpoint`] on bytes: the merged checkpoint's bytes and the tensors replaced.
/// `name` names the base in errors.
pub fn merge_bytes<B: Backend>(
    name: &str,
    base_bytes: &[u8],
    adapters: &NativeAdapters,
    map: &NameMap,
    device: &B::Device,
) -> Result<(Vec<u8>, Vec<String>), AdapterError> {
    let mut out = Vec::new();
    let (_, merged) = merge_into::<B>(name, base_bytes, adapters, map, device, &mut out)?;
    Ok((out, merged))
}

/// Writes the merged checkpoint to `out`, one tensor at a time, after checking that every
/// adapter layer has a weight of its shape in the base: the bytes written and the tensors
/// replaced.
fn merge_into<B: Backend>(
    shown: &str,
    base_bytes: &[u8],
    adapters: &NativeAdapters,
    map: &NameMap,
    device: &B::Device,
    out: &mut dyn std::io::Write,
) -> Result<(u64, Vec<String>), AdapterError> {
    adapters.validate("adapters")?;
    let tensors = st::parse(shown, base_bytes)?;
    let metadata = st::metadata(shown, base_bytes)?;
    // Weight name -> adapter layer name.
    let mut replaced: HashMap<String, &str> = HashMap::new();
    for (name, spec) in &adapters.meta.layers {
        let key = format!("{}.weight", map.apply(name));
        let view = tensors
            .tensor(&key)
            .map_err(|_| AdapterError::Incompatible {
                message: format!(
                "the adapter's layer `{name}` needs `{key}` in {shown}, which has no such tensor \
                 (rename modules with a name map: --map FROM=TO)"
            ),
            })?;
        if view.shape() != [spec.d_out, spec.d_in] {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "`{key}` is {:?} in {shown} but the adapter is for a [{}, {}] ([out, in]) \
                     weight",
                    view.shape(),
                    spec.d_out,
                    spec.d_in
                ),
            });
        }
        replaced.insert(key, name);
    }
    let names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    let views: Vec<_> = names
        .iter()
        .map(|n| tensors.tensor(n).expect("listed"))
        .collect();
    let specs: Vec<st::Spec> = names
        .iter()
        .zip(&views)
        .map(|(n, v)| (n.clone(), v.dtype(), v.shape().to_vec()))
        .collect();
    let bytes = st::write_streamed(shown, out, &specs, metadata, &mut |i| {
        let (key, view) = (&names[i], &views[i]);
        let Some(&name) = replaced.get(key) else {
            return Ok(Cow::Borrowed(view.data()));
        };
        let w = HostTensor::from_view(shown, key, view)?.transposed();
        let linear = Linear {
            weight: Param::from_tensor(w.to_tensor::<B, 2>(device)),
            bias: None,
        };
        let mut layer = AdaptedLinear::frozen(linear);
        layer.set_adapter(adapters.adapter::<B>(name, device)?)?;
        let merged = layer.merge().map_err(|e| e.at(name))?;
        let merged = HostTensor::from_tensor(merged.weight.val()).transposed();
        Ok(Cow::Owned(st::encode_f32(&merged.data, view.dtype())))
    })?;
    let mut merged: Vec<String> = replaced.into_keys().collect();
    merged.sort();
    Ok((bytes, merged))
}
