//! Checkpoints of what trains, not of the frozen base.
//!
//! * **Adapter files** ([`save_adapters`], [`load_adapters`], [`NativeAdapters`]): a model's
//!   linear adapters, one safetensors tensor per factor keyed `<layer>.<factor>`
//!   (`encoder.layer.0.attention.self.query.a`; just `a` for a lone layer), in Burn layout
//!   (`[in, out]`), f32, with a JSON [`CheckpointMeta`] in the metadata under `kron_adapters`:
//!   method, sizes, factor shapes and scale of every layer. They describe themselves: the
//!   command-line tool inspects, merges and converts them to PEFT without the Rust model.
//! * **Trainable-parameter checkpoints** ([`save_params_matching`], [`load_params_matching`]):
//!   any parameters chosen by module-path regexes (adapters, block adapters, a classifier head,
//!   BitFit's biases), keyed by Burn module path.
//!
//! The whole module (base included) checkpoints with Burn's recorders as any Burn module does:
//! `module.save_file(path, &NamedMpkFileRecorder::<FullPrecisionSettings>::new())`.
//!
//! Loading checks the file against the model and refuses any mismatch with an error that names
//! the parameter and both shapes, lists missing and unexpected tensors, or names the layer whose
//! method or scale differs. A failed load changes nothing; a save writes a temporary file and
//! renames it, so a failure never leaves a partial file; the same adapters always give the same
//! bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use burn_store::{ApplyError, ModuleSnapshot, PathFilter, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterSpec, LinearAdapter};
use crate::error::AdapterError;
use crate::linear::AdaptedLinear;

/// Module paths of the adapters in a trainable-parameter checkpoint: every parameter under a
/// field named `adapter`.
pub const ADAPTER_PATTERN: &str = r"(^|\.)adapter\.";

/// The safetensors metadata key holding a [`CheckpointMeta`] as JSON.
pub const META_KEY: &str = "kron_adapters";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The crate version that wrote the file.
    pub version: String,
    /// Every adapted layer (its name, "" for a lone layer) and its adapter.
    pub layers: BTreeMap<String, AdapterSpec>,
    /// Anything else the writer wants to keep (an experiment config, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

impl CheckpointMeta {
    /// Metadata for these layers, with this crate's version.
    pub fn new(layers: impl IntoIterator<Item = (String, AdapterSpec)>) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            layers: layers.into_iter().collect(),
            extra: None,
        }
    }
}

/// Models that can list their adapted linear layers by name. Implement it for your own model
/// by listing its [`AdaptedLinear`] fields (the encoder in [`crate::model`] names them with
/// Hugging Face module names, which PEFT files use too).
pub trait AdapterLayers<B: Backend> {
    /// Every adapted linear layer, with its name.
    fn adapter_layers(&self) -> Vec<(String, &AdaptedLinear<B>)>;

    /// The same, mutably.
    fn adapter_layers_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)>;

    /// The layers that have an adapter, and its spec.
    fn adapter_specs(&self) -> Vec<(String, AdapterSpec)> {
        self.adapter_layers()
            .into_iter()
            .filter_map(|(name, l)| l.spec().map(|s| (name, s)))
            .collect()
    }
}

impl<B: Backend> AdapterLayers<B> for AdaptedLinear<B> {
    fn adapter_layers(&self) -> Vec<(String, &AdaptedLinear<B>)> {
        vec![(String::new(), self)]
    }

    fn adapter_layers_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)> {
        vec![(String::new(), self)]
    }
}

/// A tensor's values on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Copies a tensor to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let data = t.into_data().convert::<f32>();
        Self {
            shape: data.shape.to_vec(),
            data: data.to_vec::<f32>().expect("f32 after convert"),
        }
    }

    /// A safetensors tensor as f32 (from F32, F16 or BF16); `None` for other dtypes.
    pub fn from_view(view: &safetensors::tensor::TensorView<'_>) -> Option<Self> {
        use safetensors::Dtype;
        let b = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => return None,
        };
        Some(Self {
            shape: view.shape().to_vec(),
            data,
        })
    }

    /// A 2-D tensor on `device`.
    pub fn to_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), [self.shape[0], self.shape[1]]),
            device,
        )
    }

    /// The transpose of a 2-D tensor (PyTorch `[out, in]` ↔ Burn `[in, out]`).
    pub fn transposed(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self {
            shape: vec![c, r],
            data,
        }
    }

    /// `self · other` for 2-D tensors (f64 accumulation).
    pub fn matmul(&self, other: &Self) -> Self {
        let (n, k, m) = (self.shape[0], self.shape[1], other.shape[1]);
        assert_eq!(k, other.shape[0], "inner sizes");
        let mut data = vec![0f32; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut s = 0f64;
                for t in 0..k {
                    s += self.data[i * k + t] as f64 * other.data[t * m + j] as f64;
                }
                data[i * m + j] = s as f32;
            }
        }
        Self {
            shape: vec![n, m],
            data,
        }
    }
}

fn key(layer: &str, factor: &str) -> String {
    if layer.is_empty() {
        factor.to_string()
    } else {
        format!("{layer}.{factor}")
    }
}

/// An adapter file's content on the host: every layer's spec and factor values.
#[derive(Clone, Debug, PartialEq)]
pub struct NativeAdapters {
    /// Version, specs and extra metadata.
    pub meta: CheckpointMeta,
    /// Each layer's factors, in spec order, Burn layout.
    pub factors: BTreeMap<String, Vec<HostTensor>>,
}

impl NativeAdapters {
    /// The adapters of a model.
    pub fn from_model<B: Backend, M: AdapterLayers<B>>(model: &M) -> Self {
        Self::from_adapters(
            model
                .adapter_layers()
                .into_iter()
                .filter_map(|(name, l)| l.adapter.as_ref().map(|a| (name, a))),
        )
    }

    /// Named adapters.
    pub fn from_adapters<'a, B: Backend>(
        layers: impl IntoIterator<Item = (String, &'a Adapter<B>)>,
    ) -> Self {
        let mut specs = Vec::new();
        let mut factors = BTreeMap::new();
        for (name, a) in layers {
            specs.push((name.clone(), a.spec()));
            factors.insert(
                name,
                a.factors()
                    .into_iter()
                    .map(HostTensor::from_tensor)
                    .collect(),
            );
        }
        Self {
            meta: CheckpointMeta::new(specs),
            factors,
        }
    }

    /// The adapter of layer `name`, built on `device` (trainable).
    pub fn adapter<B: Backend>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Adapter<B>, AdapterError> {
        let spec = self.meta.layers.get(name).ok_or_else(|| {
            AdapterError::config(name, "layer", "no such layer in the adapter file")
        })?;
        let values = self.factors[name]
            .iter()
            .map(|t| t.to_tensor(device))
            .collect();
        Adapter::from_spec(spec, values).map_err(|e| e.at(name))
    }

    /// Trainable parameters in all layers.
    pub fn num_params(&self) -> usize {
        self.meta.layers.values().map(|s| s.num_params()).sum()
    }

    /// The safetensors bytes (canonical: the same adapters give the same bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (layer, spec) in &self.meta.layers {
            for ((factor, _), t) in spec.factors.iter().zip(&self.factors[layer]) {
                let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                owned.push((key(layer, factor), t.shape.clone(), bytes));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
            .iter()
            .map(|(k, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .expect("shape and bytes agree");
                (k.clone(), view)
            })
            .collect();
        let meta = HashMap::from([(
            META_KEY.to_string(),
            serde_json::to_string(&self.meta).expect("metadata serializes"),
        )]);
        let bytes = safetensors::serialize(views, Some(meta)).expect("valid tensors serialize");
        canonical_safetensors(&bytes).expect("a buffer safetensors just wrote")
    }

    /// Parses an adapter file's bytes; `path` names it in errors. Every layer the metadata
    /// describes must have all its factors with their shapes, and nothing else may be there.
    /// A quantized adapter file ([`crate::quant`]) is read dequantized.
    pub fn from_bytes(path: &str, bytes: &[u8]) -> Result<Self, AdapterError> {
        if crate::quant::is_quantized(bytes) {
            return Ok(crate::quant::QuantizedAdapters::from_bytes(path, bytes)?.dequantize());
        }
        let meta = read_meta_bytes(path, bytes)?.ok_or_else(|| AdapterError::Format {
            path: path.to_string(),
            message: format!(
                "no `{META_KEY}` metadata: not a kron-adapters adapter file (a PEFT adapter is a \
                 folder with adapter_config.json)"
            ),
        })?;
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Format {
                path: path.to_string(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
        let mut expected = BTreeMap::new();
        for (layer, spec) in &meta.layers {
            for (factor, shape) in &spec.factors {
                expected.insert(key(layer, factor), (layer.clone(), *shape));
            }
        }
        let present: BTreeMap<String, _> = st.tensors().into_iter().collect();
        let missing: Vec<String> = expected
            .keys()
            .filter(|k| !present.contains_key(*k))
            .cloned()
            .collect();
        let unexpected: Vec<String> = present
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(AdapterError::CheckpointMismatch {
                path: path.to_string(),
                missing,
                unexpected,
            });
        }
        let mut factors: BTreeMap<String, Vec<HostTensor>> = BTreeMap::new();
        for (layer, spec) in &meta.layers {
            let mut list = Vec::new();
            for (factor, shape) in &spec.factors {
                let k = key(layer, factor);
                let view = &present[&k];
                if view.shape() != shape.as_slice() {
                    return Err(AdapterError::CheckpointShape {
                        path: path.to_string(),
                        param: k,
                        expected: shape.to_vec(),
                        found: view.shape().to_vec(),
                    });
                }
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(AdapterError::Format {
                        path: path.to_string(),
                        message: format!("`{k}` is {:?}, adapter files hold F32", view.dtype()),
                    });
                }
                let data = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                list.push(HostTensor {
                    shape: shape.to_vec(),
                    data,
                });
            }
            factors.insert(layer.clone(), list);
        }
        Ok(Self { meta, factors })
    }

    /// Reads an adapter file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        read_file(path.as_ref(), Self::from_bytes)
    }

    /// Writes an adapter file (atomically). Returns its size in bytes.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<u64, AdapterError> {
        write_file(path.as_ref(), &self.to_bytes())
    }
}

/// Reads the file at `path` and parses it with `parse(name, bytes)`, the name being the path
/// (for error messages).
pub(crate) fn read_file<T>(
    path: &Path,
    parse: impl FnOnce(&str, &[u8]) -> Result<T, AdapterError>,
) -> Result<T, AdapterError> {
    let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
    parse(&path.display().to_string(), &bytes)
}

/// Writes `bytes` to `path` atomically; returns the size written.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<u64, AdapterError> {
    write_atomic(path, bytes)?;
    Ok(bytes.len() as u64)
}

/// Saves the linear adapters of `model` to an adapter file. Returns its size in bytes.
pub fn save_adapters<B: Backend, M: AdapterLayers<B>>(
    model: &M,
    path: impl AsRef<Path>,
) -> Result<u64, AdapterError> {
    NativeAdapters::from_model(model).write(path)
}

/// Loads an adapter file into `model`, which must have been built with the same adapters
/// (methods, shapes, scales). On error the model is dropped unchanged (keep a clone if you need
/// it back); parameter ids and trainability are kept.
pub fn load_adapters<B: Backend, M: AdapterLayers<B>>(
    mut model: M,
    path: impl AsRef<Path>,
) -> Result<M, AdapterError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let file = NativeAdapters::read(path)?;
    let model_specs: BTreeMap<String, AdapterSpec> = model.adapter_specs().into_iter().collect();
    // Tensors the model expects and the file has, by key.
    let keys = |specs: &BTreeMap<String, AdapterSpec>| -> BTreeMap<String, [usize; 2]> {
        specs
            .iter()
            .flat_map(|(l, s)| s.factors.iter().map(move |(f, shape)| (key(l, f), *shape)))
            .collect()
    };
    let (want, have) = (keys(&model_specs), keys(&file.meta.layers));
    let missing: Vec<String> = want
        .keys()
        .filter(|k| !have.contains_key(*k))
        .cloned()
        .collect();
    let unexpected: Vec<String> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(AdapterError::CheckpointMismatch {
            path: shown,
            missing,
            unexpected,
        });
    }
    if let Some((k, shape)) = want.iter().find(|(k, s)| have[*k] != **s) {
        return Err(AdapterError::CheckpointShape {
            path: shown,
            param: k.clone(),
            expected: shape.to_vec(),
            found: have[k].to_vec(),
        });
    }
    for (layer, spec) in &model_specs {
        let saved = &file.meta.layers[layer];
        if saved != spec {
            return Err(AdapterError::CheckpointMeta {
                path: shown,
                message: format!(
                    "layer `{layer}` was saved as {} with scale {} but the model has {} with \
                     scale {}",
                    saved.method, saved.scale, spec.method, spec.scale
                ),
            });
        }
    }
    for (name, layer) in model.adapter_layers_mut() {
        if let Some(adapter) = layer.adapter.take() {
            let device = adapter.factors()[0].device();
            let values = file.factors[&name]
                .iter()
                .map(|t| t.to_tensor(&device))
                .collect();
            layer.adapter = Some(adapter.with_factors(values));
        }
    }
    Ok(model)
}

/// Saves the parameters of `module` whose module paths match any of `patterns` (regexes), with
/// `meta`. Returns the file size in bytes.
pub fn save_params_matching<B: Backend, M: Module<B>>(
    module: &M,
    path: impl AsRef<Path>,
    patterns: &[&str],
    meta: &CheckpointMeta,
) -> Result<u64, AdapterError> {
    let path = path.as_ref();
    let meta_json = serde_json::to_string(meta).expect("metadata serializes");
    let mut store = SafetensorsStore::from_bytes(None)
        .filter(PathFilter::new().with_regexes(patterns.iter().copied()))
        .metadata(META_KEY, meta_json);
    let fail = |e: String| AdapterError::Format {
        path: path.display().to_string(),
        message: format!("could not serialize the parameters: {e}"),
    };
    module
        .save_into(&mut store)
        .map_err(|e| fail(e.to_string()))?;
    let bytes = store.get_bytes().map_err(|e| fail(e.to_string()))?;
    let bytes = canonical_safetensors(&bytes).map_err(fail)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Loads the parameters matching `patterns` from `path` into `module`; returns the module and
/// the file's [`CheckpointMeta`] if it has one. Every model parameter that matches must be in
/// the file with the same shape, and every tensor in the file must be a model parameter.
pub fn load_params_matching<B: Backend, M: Module<B>>(
    module: M,
    path: impl AsRef<Path>,
    patterns: &[&str],
) -> Result<(M, Option<CheckpointMeta>), AdapterError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
    let meta = read_meta_bytes(&shown, &bytes)?;

    let filter = PathFilter::new().with_regexes(patterns.iter().copied());
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .filter(filter.clone())
        .validate(false)
        .allow_partial(true);
    let mut loaded = module.clone();
    let result = loaded
        .load_from(&mut store)
        .map_err(|e| AdapterError::Format {
            path: shown.clone(),
            message: e.to_string(),
        })?;

    if let Some(err) = result.errors.first() {
        return Err(match err {
            ApplyError::ShapeMismatch {
                path: param,
                expected,
                found,
            } => AdapterError::CheckpointShape {
                path: shown,
                param: param.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => AdapterError::Format {
                path: shown,
                message: other.to_string(),
            },
        });
    }
    let missing: Vec<String> = result
        .missing
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| filter.matches(p))
        .collect();
    if !missing.is_empty() || !result.unused.is_empty() {
        return Err(AdapterError::CheckpointMismatch {
            path: shown,
            missing,
            unexpected: result.unused.clone(),
        });
    }
    Ok((loaded, meta))
}

/// Reads the [`CheckpointMeta`] of a checkpoint, if it has one.
pub fn read_meta(path: impl AsRef<Path>) -> Result<Option<CheckpointMeta>, AdapterError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
    read_meta_bytes(&path.display().to_string(), &bytes)
}

pub(crate) fn read_meta_bytes(
    path: &str,
    bytes: &[u8],
) -> Result<Option<CheckpointMeta>, AdapterError> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| AdapterError::Format {
            path: path.to_string(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
    let Some(json) = header.metadata().as_ref().and_then(|m| m.get(META_KEY)) else {
        return Ok(None);
    };
    serde_json::from_str(json)
        .map(Some)
        .map_err(|e| AdapterError::Format {
            path: path.to_string(),
            message: format!("bad `{META_KEY}` metadata: {e}"),
        })
}

/// Rewrites a safetensors file's JSON header with sorted keys (padded with spaces to a multiple
/// of 8 bytes), so the same tensors and metadata always give the same bytes. Burn's store writes
/// its metadata from a hash map, in an order that changes from run to run.
pub fn canonical_safetensors(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (n, _) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a valid safetensors buffer: {e}"))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| format!("bad safetensors header: {e}"))?;
    // serde_json's map is ordered by key, so this serialization is canonical.
    let mut json = serde_json::to_vec(&header).expect("a JSON value serializes");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(AdapterError::io(path, e));
    }
    Ok(())
}
