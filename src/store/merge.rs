//! Merging adapters into a base checkpoint file: every adapted weight of a PyTorch-layout
//! safetensors file (`<name>.weight`, `[out, in]`) replaced by `W + ΔW` in its own dtype, every
//! other tensor copied as is. The merge itself is [`AdaptedLinear::merge`], the crate's one
//! merge (with its NaN/Inf refusal).

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
    let (bytes, merged) = merge_bytes::<B>(
        &base.display().to_string(),
        &base_bytes,
        adapters,
        map,
        device,
    )?;
    st::write_atomic(out, &bytes)?;
    Ok(MergeReport {
        merged,
        bytes: bytes.len() as u64,
    })
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
    adapters.validate("adapters")?;
    let shown = name;
    let tensors = st::parse(shown, base_bytes)?;
    let metadata = st::metadata(shown, base_bytes)?;
    let mut replaced: HashMap<String, Vec<u8>> = HashMap::new();
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
        let w = HostTensor::from_view(shown, &key, &view)?.transposed();
        let linear = Linear {
            weight: Param::from_tensor(w.to_tensor::<B, 2>(device)),
            bias: None,
        };
        let mut layer = AdaptedLinear::frozen(linear);
        layer.set_adapter(adapters.adapter::<B>(name, device)?)?;
        let merged = layer.merge().map_err(|e| e.at(name))?;
        let merged = HostTensor::from_tensor(merged.weight.val()).transposed();
        replaced.insert(key, st::encode_f32(&merged.data, view.dtype()));
    }
    let mut names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    names.sort();
    let entries: Vec<st::Entry<&[u8]>> = names
        .iter()
        .map(|n| {
            let v = tensors.tensor(n).expect("listed");
            let data: &[u8] = replaced.get(n).map_or(v.data(), |b| b.as_slice());
            (n.clone(), v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    let bytes = st::serialize(shown, &entries, metadata)?;
    let mut merged: Vec<String> = replaced.into_keys().collect();
    merged.sort();
    Ok((bytes, merged))
}
