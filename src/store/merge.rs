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

use ::safetensors::tensor::TensorView;
use ::safetensors::SafeTensors;

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
    let mut file = st::SafetensorsFile::open(base)?;
    let shown = base.display().to_string();
    let mut report = MergeReport {
        merged: Vec::new(),
        bytes: 0,
    };
    // Streamed both ways: a base tensor is read when it is written, and a merged weight exists
    // only while it is written.
    st::write_atomic_with(out, &mut |w| {
        (report.bytes, report.merged) =
            merge_into::<B>(&shown, &mut file, adapters, map, device, w)?;
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
    let base = st::parse(name, base_bytes)?;
    let metadata = st::metadata(name, base_bytes)?;
    let mut out = Vec::new();
    let mut source = (&base, metadata);
    let (_, merged) = merge_into::<B>(name, &mut source, adapters, map, device, &mut out)?;
    Ok((out, merged))
}

/// The tensors of a base checkpoint, in memory or read from its file one at a time (`'d`: the
/// life of the bytes in memory).
trait Base<'d> {
    /// Each tensor's name, dtype and shape.
    fn specs(&self) -> Vec<st::Spec>;
    /// The file's metadata.
    fn metadata(&self) -> HashMap<String, String>;
    /// A tensor's bytes (`name` is one of [`Base::specs`]).
    fn bytes(&mut self, name: &str) -> Result<Cow<'d, [u8]>, AdapterError>;
}

impl<'d> Base<'d> for (&SafeTensors<'d>, HashMap<String, String>) {
    fn specs(&self) -> Vec<st::Spec> {
        self.0
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec()))
            .collect()
    }
    fn metadata(&self) -> HashMap<String, String> {
        self.1.clone()
    }
    fn bytes(&mut self, name: &str) -> Result<Cow<'d, [u8]>, AdapterError> {
        Ok(Cow::Borrowed(self.0.tensor(name).expect("listed").data()))
    }
}

impl Base<'static> for st::SafetensorsFile {
    fn specs(&self) -> Vec<st::Spec> {
        st::SafetensorsFile::specs(self)
    }
    fn metadata(&self) -> HashMap<String, String> {
        st::SafetensorsFile::metadata(self)
    }
    fn bytes(&mut self, name: &str) -> Result<Cow<'static, [u8]>, AdapterError> {
        self.read_bytes(name).expect("listed").map(Cow::Owned)
    }
}

/// Writes the merged checkpoint to `out`, one tensor at a time, after checking that every
/// adapter layer has a weight of its shape in the base: the bytes written and the tensors
/// replaced.
fn merge_into<'d, B: Backend>(
    shown: &str,
    base: &mut dyn Base<'d>,
    adapters: &NativeAdapters,
    map: &NameMap,
    device: &B::Device,
    out: &mut dyn std::io::Write,
) -> Result<(u64, Vec<String>), AdapterError> {
    adapters.validate("adapters")?;
    let specs = base.specs();
    let index: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, (n, _, _))| (n.as_str(), i))
        .collect();
    // Weight name -> adapter layer name.
    let mut replaced: HashMap<String, &str> = HashMap::new();
    for (name, spec) in &adapters.meta.layers {
        let key = format!("{}.weight", map.apply(name));
        let Some(&i) = index.get(key.as_str()) else {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "the adapter's layer `{name}` needs `{key}` in {shown}, which has no such \
                     tensor (rename modules with a name map: --map FROM=TO)"
                ),
            });
        };
        let shape = &specs[i].2;
        if shape != &[spec.d_out, spec.d_in] {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "`{key}` is {shape:?} in {shown} but the adapter is for a [{}, {}] ([out, \
                     in]) weight",
                    spec.d_out, spec.d_in
                ),
            });
        }
        replaced.insert(key, name);
    }
    let metadata = base.metadata();
    let bytes = st::write_streamed(shown, out, &specs, metadata, &mut |i| {
        let (key, dtype, shape) = &specs[i];
        let data = base.bytes(key)?;
        let Some(&name) = replaced.get(key) else {
            return Ok(data);
        };
        let view = TensorView::new(*dtype, shape.clone(), &data)
            .map_err(|e| AdapterError::format(shown, format!("`{key}`: {e}")))?;
        let w = HostTensor::from_view(shown, key, &view)?.transposed();
        let linear = Linear {
            weight: Param::from_tensor(w.to_tensor::<B, 2>(device)),
            bias: None,
        };
        let mut layer = AdaptedLinear::frozen(linear);
        layer.set_adapter(adapters.adapter::<B>(name, device)?)?;
        let merged = layer.merge().map_err(|e| e.at(name))?;
        let merged = HostTensor::from_tensor(merged.weight.val()).transposed();
        Ok(Cow::Owned(st::encode_f32(&merged.data, *dtype)))
    })?;
    let mut merged: Vec<String> = replaced.into_keys().collect();
    merged.sort();
    Ok((bytes, merged))
}
