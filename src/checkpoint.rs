//! Adapter-only checkpoints: the trainable factors of a model, not its frozen base, in a
//! safetensors file (a few hundred KB for a BERT-size model) that loads into a fresh model built
//! from the same base and adapter configuration.
//!
//! The whole module (base included) checkpoints with Burn's recorders as any Burn module does:
//! `module.save_file(path, &NamedMpkFileRecorder::<FullPrecisionSettings>::new())`.
//!
//! Files carry, in their safetensors metadata under `kron_adapters`, a JSON
//! [`CheckpointMeta`]: the crate version and an [`AdapterSpec`] per adapted layer. Loading
//! compares them with the model's and refuses a mismatch (a different scale, say), names any
//! missing or unexpected tensor, and names the parameter and both shapes of a shape mismatch.
//! A failed load leaves the model untouched; a save writes a temporary file and renames it, so
//! a failure never leaves a partial file behind.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{ApplyError, ModuleSnapshot, PathFilter, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::adapter::AdapterSpec;
use crate::error::AdapterError;
use crate::linear::AdaptedLinear;

/// Module paths saved by [`save_adapters`]: every parameter under a field named `adapter`.
pub const ADAPTER_PATTERN: &str = r"(^|\.)adapter\.";

/// The safetensors metadata key holding a [`CheckpointMeta`] as JSON.
pub const META_KEY: &str = "kron_adapters";

/// What an adapter checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The crate version that wrote the file.
    pub version: String,
    /// Every adapted layer (its module path, "" for a lone layer) and its adapter.
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

/// Models that can list their adapters, so their checkpoints can describe them.
pub trait AdapterLayers {
    /// Every adapted layer: its module path and its adapter's spec.
    fn adapter_specs(&self) -> Vec<(String, AdapterSpec)>;
}

impl<B: Backend> AdapterLayers for AdaptedLinear<B> {
    fn adapter_specs(&self) -> Vec<(String, AdapterSpec)> {
        self.spec()
            .map(|s| (String::new(), s))
            .into_iter()
            .collect()
    }
}

/// Saves the adapters of `module` (every parameter under a field named `adapter`) to `path`.
/// Returns the file size in bytes.
pub fn save_adapters<B: Backend, M: Module<B> + AdapterLayers>(
    module: &M,
    path: impl AsRef<Path>,
) -> Result<u64, AdapterError> {
    let meta = CheckpointMeta::new(module.adapter_specs());
    save_params_matching(module, path, &[ADAPTER_PATTERN], &meta)
}

/// Loads adapters saved by [`save_adapters`] into `module`, which must have been built with the
/// same adapter configuration. On error the module is dropped unchanged (keep a clone if you
/// need it back).
pub fn load_adapters<B: Backend, M: Module<B> + AdapterLayers>(
    module: M,
    path: impl AsRef<Path>,
) -> Result<M, AdapterError> {
    let path = path.as_ref();
    let (module, meta) = load_params_matching(module, path, &[ADAPTER_PATTERN])?;
    if let Some(meta) = meta {
        check_specs(path, &meta, &module.adapter_specs())?;
    }
    Ok(module)
}

/// Saves the parameters of `module` whose paths match any of `patterns` (regexes), with `meta`.
/// Returns the file size in bytes.
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
    module
        .save_into(&mut store)
        .map_err(|e| AdapterError::Format {
            path: path.display().to_string(),
            message: format!("could not serialize the adapters: {e}"),
        })?;
    let bytes = store.get_bytes().map_err(|e| AdapterError::Format {
        path: path.display().to_string(),
        message: format!("could not serialize the adapters: {e}"),
    })?;
    let bytes = canonical_safetensors(&bytes).map_err(|message| AdapterError::Format {
        path: path.display().to_string(),
        message,
    })?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
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

/// Reads the [`CheckpointMeta`] of an adapter file, if it has one.
pub fn read_meta(path: impl AsRef<Path>) -> Result<Option<CheckpointMeta>, AdapterError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
    read_meta_bytes(&path.display().to_string(), &bytes)
}

fn read_meta_bytes(path: &str, bytes: &[u8]) -> Result<Option<CheckpointMeta>, AdapterError> {
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

fn check_specs(
    path: &Path,
    meta: &CheckpointMeta,
    model: &[(String, AdapterSpec)],
) -> Result<(), AdapterError> {
    let model: BTreeMap<_, _> = model.iter().cloned().collect();
    for (layer, spec) in &model {
        match meta.layers.get(layer) {
            Some(saved) if saved == spec => {}
            Some(saved) => {
                return Err(AdapterError::CheckpointMeta {
                    path: path.display().to_string(),
                    message: format!(
                        "layer `{layer}` was saved as {} {:?} with scale {} but the model has \
                         {} {:?} with scale {}",
                        saved.method,
                        saved.factors,
                        saved.scale,
                        spec.method,
                        spec.factors,
                        spec.scale
                    ),
                })
            }
            None => {
                return Err(AdapterError::CheckpointMeta {
                    path: path.display().to_string(),
                    message: format!("the file describes no adapter for layer `{layer}`"),
                })
            }
        }
    }
    if let Some(extra) = meta.layers.keys().find(|k| !model.contains_key(*k)) {
        return Err(AdapterError::CheckpointMeta {
            path: path.display().to_string(),
            message: format!("the file has an adapter for layer `{extra}`, which the model lacks"),
        });
    }
    Ok(())
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
