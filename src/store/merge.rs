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
///
/// `base` may also be a Hugging Face model folder (`model.safetensors`, or the shards
/// `model.safetensors.index.json` lists, as 7B checkpoints come): `out` is then a folder with
/// the same shards, each adapted weight merged in the shard that holds it, and the folder's
/// other files (configuration, tokenizer, index) copied; weight files in other formats
/// (`.bin`, `.pt`, `.gguf`, …) are left out. Both forms stream: a base tensor is read when it is
/// written, a merged weight exists only while it is written.
pub fn merge_checkpoint<B: Backend>(
    base: &Path,
    adapters: &NativeAdapters,
    map: &NameMap,
    out: &Path,
    overwrite: bool,
    device: &B::Device,
) -> Result<MergeReport, AdapterError> {
    if base.is_dir() {
        return merge_folder::<B>(base, adapters, map, out, overwrite, device);
    }
    st::refuse_existing(out, overwrite)?;
    adapters.validate("adapters")?;
    let mut file = st::SafetensorsFile::open(base)?;
    let shown = base.display().to_string();
    let plan = plan(&shown, &[file.specs()], adapters, map)?;
    let mut bytes = 0;
    st::write_atomic_with(out, &mut |w| {
        bytes = merge_into::<B>(&shown, &mut file, adapters, &plan[0], device, w)?;
        Ok(())
    })?;
    Ok(report(plan, bytes))
}

/// [`merge_checkpoint`] into a model folder.
fn merge_folder<B: Backend>(
    base: &Path,
    adapters: &NativeAdapters,
    map: &NameMap,
    out: &Path,
    overwrite: bool,
    device: &B::Device,
) -> Result<MergeReport, AdapterError> {
    st::refuse_existing(out, overwrite)?;
    adapters.validate("adapters")?;
    let shards = st::model_dir_shards(base)?;
    let mut files = shards
        .iter()
        .map(|p| st::SafetensorsFile::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let specs: Vec<Vec<st::Spec>> = files.iter().map(|f| f.specs()).collect();
    let shown = base.display().to_string();
    let plan = plan(&shown, &specs, adapters, map)?;
    // The folder's other files: small ones copied, weight files in other formats left out.
    let mut others = Vec::new();
    let entries = std::fs::read_dir(base).map_err(|e| AdapterError::io(base, e))?;
    for entry in entries {
        let path = entry.map_err(|e| AdapterError::io(base, e))?.path();
        let weights = [
            "safetensors",
            "bin",
            "pt",
            "pth",
            "ckpt",
            "gguf",
            "h5",
            "msgpack",
        ];
        let is_weights = path
            .extension()
            .is_some_and(|x| weights.iter().any(|w| x.eq_ignore_ascii_case(w)));
        if path.is_file() && !is_weights && !shards.contains(&path) {
            others.push(path);
        }
    }
    let mut bytes = 0;
    st::write_dir_atomic_with(out, overwrite, &mut |tmp| {
        for (i, (shard, file)) in shards.iter().zip(&mut files).enumerate() {
            let name = shard.file_name().expect("a file in the folder");
            let shown = shard.display().to_string();
            st::write_atomic_with(&tmp.join(name), &mut |w| {
                bytes += merge_into::<B>(&shown, file, adapters, &plan[i], device, w)?;
                Ok(())
            })?;
        }
        // Copied by the system (a regular file: `is_file` above), inside the folder that is
        // renamed into place whole.
        for path in &others {
            let name = path.file_name().expect("a file in the folder");
            std::fs::copy(path, tmp.join(name)).map_err(|e| AdapterError::io(path, e))?;
        }
        Ok(())
    })?;
    Ok(report(plan, bytes))
}

/// What was merged: the weights replaced, sorted, and the bytes written.
fn report(plan: Vec<HashMap<String, String>>, bytes: u64) -> MergeReport {
    let mut merged: Vec<String> = plan.into_iter().flat_map(|p| p.into_keys()).collect();
    merged.sort();
    MergeReport { merged, bytes }
}

/// For each file of a base (`specs`: its tensors), the weights to replace and the adapter layer
/// merged into each: every layer's `<mapped name>.weight` must be in one of the files with the
/// layer's `[out, in]` shape.
fn plan(
    shown: &str,
    specs: &[Vec<st::Spec>],
    adapters: &NativeAdapters,
    map: &NameMap,
) -> Result<Vec<HashMap<String, String>>, AdapterError> {
    let index: HashMap<&str, (usize, &Vec<usize>)> = specs
        .iter()
        .enumerate()
        .flat_map(|(f, s)| s.iter().map(move |(n, _, shape)| (n.as_str(), (f, shape))))
        .collect();
    let mut plan = vec![HashMap::new(); specs.len()];
    for (name, spec) in &adapters.meta.layers {
        let key = format!("{}.weight", map.apply(name));
        let Some(&(file, shape)) = index.get(key.as_str()) else {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "the adapter's layer `{name}` needs `{key}` in {shown}, which has no such \
                     tensor (rename modules with a name map: --map FROM=TO)"
                ),
            });
        };
        if shape != &[spec.d_out, spec.d_in] {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "`{key}` is {shape:?} in {shown} but the adapter is for a [{}, {}] ([out, \
                     in]) weight",
                    spec.d_out, spec.d_in
                ),
            });
        }
        if let Some(other) = plan[file].insert(key.clone(), name.clone()) {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "the adapter's layers `{other}` and `{name}` both merge into `{key}` (check \
                     the name map)"
                ),
            });
        }
    }
    Ok(plan)
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
    let base = st::parse(name, base_bytes)?;
    let metadata = st::metadata(name, base_bytes)?;
    let mut source = (&base, metadata);
    let plan = plan(name, &[source.specs()], adapters, map)?;
    let mut out = Vec::new();
    merge_into::<B>(name, &mut source, adapters, &plan[0], device, &mut out)?;
    Ok((out, report(plan, 0).merged))
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

/// Writes the merged checkpoint to `out`, one tensor at a time: the weights of `plan` (from
/// [`plan`]) replaced by their layers' merges, every other tensor copied. Returns the bytes
/// written.
fn merge_into<'d, B: Backend>(
    shown: &str,
    base: &mut dyn Base<'d>,
    adapters: &NativeAdapters,
    plan: &HashMap<String, String>,
    device: &B::Device,
    out: &mut dyn std::io::Write,
) -> Result<u64, AdapterError> {
    let specs = base.specs();
    let metadata = base.metadata();
    st::write_streamed(shown, out, &specs, metadata, &mut |i| {
        let (key, dtype, shape) = &specs[i];
        let data = base.bytes(key)?;
        let Some(name) = plan.get(key) else {
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
        let bytes = st::encode_f32(&merged.data, *dtype)
            .map_err(|m| AdapterError::format(shown, format!("merged `{key}`: {m}")))?;
        Ok(Cow::Owned(bytes))
    })
}
