//! Trainable-parameter checkpoints: any parameters of any module chosen by module-path regexes
//! (adapters, block adapters, a classifier head, BitFit's biases), keyed by Burn module path,
//! through burn-store's safetensors with a path filter, with a [`CheckpointMeta`] in the
//! metadata. The whole module (base included) checkpoints with Burn's recorders as any Burn
//! module does: `module.save_file(path, &NamedMpkFileRecorder::<FullPrecisionSettings>::new())`.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{ApplyError, ModuleSnapshot, PathFilter, SafetensorsStore};

use super::native::{CheckpointMeta, META_KEY};
use super::st;
use crate::error::AdapterError;

/// Module paths of linear adapters in a trainable-parameter checkpoint: every parameter under a
/// field named `adapter`.
pub const ADAPTER_PATTERN: &str = r"(^|\.)adapter\.";

/// Saves the parameters of `module` whose module paths match any of `patterns` (regexes), with
/// `meta`. Returns the file size in bytes.
pub fn save_params_matching<B: Backend, M: Module<B>>(
    module: &M,
    path: impl AsRef<Path>,
    patterns: &[&str],
    meta: &CheckpointMeta,
) -> Result<u64, AdapterError> {
    let path = path.as_ref();
    let meta_json = serde_json::to_string(meta)
        .map_err(|e| AdapterError::format(path.display().to_string(), e.to_string()))?;
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
    let bytes = st::canonical_safetensors(&bytes).map_err(fail)?;
    st::write_atomic(path, &bytes)?;
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
    let bytes = super::read_file(path)?;
    let meta = st::meta_json(&shown, &st::metadata(&shown, &bytes)?, META_KEY)?;

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
    st::read_file(path.as_ref(), |name, bytes| {
        st::meta_json(name, &st::metadata(name, bytes)?, META_KEY)
    })
}
