//! The native adapter file: a model's linear adapters, one safetensors tensor per factor keyed
//! `<layer path>.<factor>` (`encoder.layer.0.attention.self.query.a`; just `a` for a lone layer),
//! Burn layout (`[in, out]`), f32, with a JSON [`CheckpointMeta`] under `kron_adapters` in the
//! metadata: every layer's method, sizes, factor shapes and scale. Files describe themselves, so
//! the command-line tool inspects, merges and converts them without the Rust model.
//!
//! Reading validates every spec ([`AdapterSpec::validate`]) and checks every tensor against it,
//! so nothing downstream (export, merge, quantization) meets an inconsistent adapter.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::st::{self, HostTensor};
use crate::adapter::{Adapter, AdapterSpec, LinearAdapter};
use crate::error::AdapterError;
use crate::linear::AdapterLayers;
use crate::place::{place_with, NameMap};

/// The safetensors metadata key holding a [`CheckpointMeta`] as JSON.
pub const META_KEY: &str = "kron_adapters";

/// What an adapter file says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The crate version that wrote the file.
    pub version: String,
    /// Every adapted layer (its path, "" for a lone layer) and its adapter.
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

    /// Validates every layer's spec; the error names the file and the layer.
    pub fn validate(&self, path: &str) -> Result<(), AdapterError> {
        for (layer, spec) in &self.layers {
            spec.validate(layer)
                .map_err(|source| AdapterError::InvalidSpec {
                    path: path.to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The tensor key of each factor, with its layer and shape, in layer order.
    pub fn factor_keys(&self) -> Vec<(String, &str, [usize; 2])> {
        self.layers
            .iter()
            .flat_map(|(l, s)| {
                s.factors
                    .iter()
                    .map(move |(f, shape)| (factor_key(l, f), l.as_str(), *shape))
            })
            .collect()
    }
}

/// `<layer>.<factor>`, or `<factor>` for a lone layer (path "").
pub fn factor_key(layer: &str, factor: &str) -> String {
    crate::linear::join_path(layer, factor)
}

/// An adapter file's content on the host: every layer's spec and factor values.
#[derive(Clone, Debug, PartialEq)]
pub struct NativeAdapters {
    /// Version, specs and extra metadata.
    pub meta: CheckpointMeta,
    /// Each layer's factors, in spec order, Burn layout.
    pub factors: BTreeMap<String, Vec<HostTensor>>,
}

st::file_io!(
    NativeAdapters,
    "an adapter file (native, or quantized read dequantized)"
);

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

    /// Checks that the specs are valid and every layer's values have its factors' shapes (what
    /// every constructor of this type from outside data must hold).
    pub fn validate(&self, path: &str) -> Result<(), AdapterError> {
        self.meta.validate(path)?;
        for (layer, spec) in &self.meta.layers {
            let values = self.factors.get(layer).map(Vec::as_slice).unwrap_or(&[]);
            let shapes: Vec<Vec<usize>> = values.iter().map(|t| t.shape.clone()).collect();
            let want: Vec<Vec<usize>> = spec.shapes().iter().map(|s| s.to_vec()).collect();
            if shapes != want {
                return Err(AdapterError::InvalidSpec {
                    path: path.to_string(),
                    source: crate::ConfigError::invalid(
                        layer,
                        "factors",
                        format!("values of shapes {shapes:?} for factors {want:?}"),
                    ),
                });
            }
        }
        if let Some(extra) = self
            .factors
            .keys()
            .find(|k| !self.meta.layers.contains_key(*k))
        {
            return Err(AdapterError::format(
                path,
                format!("values for `{extra}`, which the metadata does not describe"),
            ));
        }
        Ok(())
    }

    /// The adapter of layer `name`, built on `device` (trainable).
    pub fn adapter<B: Backend>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Adapter<B>, AdapterError> {
        let (spec, values) = self
            .meta
            .layers
            .get(name)
            .zip(self.factors.get(name))
            .ok_or_else(|| {
                crate::ConfigError::invalid(name, "layer", "no such layer in the adapter file")
            })?;
        let values = values.iter().map(|t| t.to_tensor(device)).collect();
        Ok(Adapter::from_spec(spec, values).map_err(|e| e.at(name))?)
    }

    /// Trainable parameters in all layers.
    pub fn num_params(&self) -> usize {
        self.meta.layers.values().map(|s| s.num_params()).sum()
    }

    /// The safetensors bytes (canonical: the same adapters give the same bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>, AdapterError> {
        self.validate("adapter file")?;
        let mut entries = Vec::new();
        for (layer, spec) in &self.meta.layers {
            for ((factor, _), t) in spec.factors.iter().zip(&self.factors[layer]) {
                let key = factor_key(layer, factor);
                entries.push((
                    key,
                    ::safetensors::Dtype::F32,
                    t.shape.clone(),
                    t.f32_bytes(),
                ));
            }
        }
        let meta = HashMap::from([(META_KEY.to_string(), self.meta_json()?)]);
        st::serialize("adapter file", &entries, meta)
    }

    fn meta_json(&self) -> Result<String, AdapterError> {
        serde_json::to_string(&self.meta)
            .map_err(|e| AdapterError::format("adapter file", format!("metadata: {e}")))
    }

    /// Parses an adapter file's bytes (native or quantized, read dequantized); `path` names it in
    /// errors. Every layer the metadata describes must be valid and have all its factors with
    /// their shapes, and nothing else may be there.
    pub fn from_bytes(path: &str, bytes: &[u8]) -> Result<Self, AdapterError> {
        let meta_map = st::metadata(path, bytes)?;
        if super::quantized::is_quantized_meta(&meta_map) {
            return Ok(super::QuantizedAdapters::from_bytes(path, bytes)?.dequantize());
        }
        let meta: CheckpointMeta = st::meta_json(path, &meta_map, META_KEY)?.ok_or_else(|| {
            AdapterError::format(
                path,
                format!(
                    "no `{META_KEY}` metadata: not a kron-adapters adapter file (a PEFT adapter \
                     is a folder with adapter_config.json)"
                ),
            )
        })?;
        meta.validate(path)?;
        let tensors = st::parse(path, bytes)?;
        let expected = meta.factor_keys();
        let present: BTreeMap<String, _> = tensors.tensors().into_iter().collect();
        check_keys(
            path,
            expected.iter().map(|(k, ..)| k.as_str()),
            present.keys(),
        )?;
        let mut factors: BTreeMap<String, Vec<HostTensor>> = BTreeMap::new();
        for (key, layer, shape) in &expected {
            let view = &present[key];
            if view.shape() != shape.as_slice() {
                return Err(AdapterError::CheckpointShape {
                    path: path.to_string(),
                    param: key.clone(),
                    expected: shape.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
            if view.dtype() != ::safetensors::Dtype::F32 {
                return Err(AdapterError::format(
                    path,
                    format!("`{key}` is {:?}, adapter files hold F32", view.dtype()),
                ));
            }
            let t = HostTensor::from_view(path, key, view)?;
            factors.entry(layer.to_string()).or_default().push(t);
        }
        Ok(Self { meta, factors })
    }
}

/// Fails with [`AdapterError::CheckpointMismatch`] unless `present` holds exactly `expected`.
pub(crate) fn check_keys<'a>(
    path: &str,
    expected: impl IntoIterator<Item = &'a str>,
    present: impl IntoIterator<Item = &'a String>,
) -> Result<(), AdapterError> {
    let expected: std::collections::BTreeSet<&str> = expected.into_iter().collect();
    let present: std::collections::BTreeSet<&str> =
        present.into_iter().map(String::as_str).collect();
    let missing: Vec<String> = expected
        .difference(&present)
        .map(|s| s.to_string())
        .collect();
    let unexpected: Vec<String> = present
        .difference(&expected)
        .map(|s| s.to_string())
        .collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(AdapterError::CheckpointMismatch {
        path: path.to_string(),
        missing,
        unexpected,
    })
}

/// Saves the linear adapters of `model` to an adapter file. Returns its size in bytes.
pub fn save_adapters<B: Backend, M: AdapterLayers<B>>(
    model: &M,
    path: impl AsRef<Path>,
) -> Result<u64, AdapterError> {
    NativeAdapters::from_model(model).write(path)
}

/// Loads an adapter file into `model`, which must have been built with the same adapters
/// (methods, shapes, scales): the factor values are replaced, parameter ids and trainability
/// kept. On error the model is dropped unchanged (keep a clone if you need it back). To put a
/// file's adapters into a model built without them, use [`attach`].
pub fn load_adapters<B: Backend, M: AdapterLayers<B>>(
    model: M,
    path: impl AsRef<Path>,
) -> Result<M, AdapterError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let file = NativeAdapters::read(path)?;
    let model_specs: BTreeMap<String, AdapterSpec> = model.adapter_specs().into_iter().collect();
    let want = CheckpointMeta::new(model_specs.clone());
    let wanted = want.factor_keys();
    let have = file.meta.factor_keys();
    let have_keys: Vec<String> = have.iter().map(|(k, ..)| k.clone()).collect();
    check_keys(&shown, wanted.iter().map(|(k, ..)| k.as_str()), &have_keys)?;
    let have_shapes: HashMap<&str, [usize; 2]> =
        have.iter().map(|(k, _, s)| (k.as_str(), *s)).collect();
    if let Some((k, _, shape)) = wanted
        .iter()
        .find(|(k, _, s)| have_shapes[k.as_str()] != *s)
    {
        return Err(AdapterError::CheckpointShape {
            path: shown,
            param: k.clone(),
            expected: shape.to_vec(),
            found: have_shapes[k.as_str()].to_vec(),
        });
    }
    let placed = place_with(model, |layer_path, layer| {
        let Some(adapter) = &layer.adapter else {
            return Ok(None);
        };
        let (saved, spec) = (&file.meta.layers[layer_path], &model_specs[layer_path]);
        if saved != spec {
            return Err(AdapterError::CheckpointMeta {
                path: shown.clone(),
                message: format!(
                    "layer `{layer_path}` was saved as {} with scale {} but the model has {} \
                     with scale {}",
                    saved.method, saved.scale, spec.method, spec.scale
                ),
            });
        }
        let device = adapter.factors()[0].device();
        let values = file.factors[layer_path]
            .iter()
            .map(|t| t.to_tensor(&device))
            .collect();
        Ok(Some(adapter.clone().with_factors(values)))
    })?;
    Ok(placed.model)
}

/// Puts `adapters` into `model` by name (after `map`): each adapter goes to the layer its mapped
/// name names, which must have the adapter's size; layers without an adapter in the file keep
/// theirs. Fails, changing nothing, if a name matches no layer (the error lists the model's
/// layers). This is how adapter files and PEFT folders are applied to a model built without
/// adapters.
pub fn attach<B: Backend, M: AdapterLayers<B>>(
    model: M,
    adapters: &NativeAdapters,
    map: &NameMap,
    device: &B::Device,
) -> Result<M, AdapterError> {
    let by_target: BTreeMap<String, &str> = adapters
        .meta
        .layers
        .keys()
        .map(|name| (map.apply(name), name.as_str()))
        .collect();
    let layers: Vec<String> = model.adapter_layers().into_iter().map(|(p, _)| p).collect();
    if let Some((target, name)) = by_target
        .iter()
        .find(|(target, _)| !layers.contains(target))
    {
        let known: Vec<&String> = layers.iter().take(12).collect();
        return Err(AdapterError::Incompatible {
            message: format!(
                "the adapter's layer `{name}` maps to `{target}`, which is not a layer of the \
                 model; its layers include {known:?} (rename with a NameMap / --map)"
            ),
        });
    }
    let placed = place_with(model, |path, _| {
        by_target
            .get(path)
            .map(|name| adapters.adapter::<B>(name, device).map_err(|e| at(e, path)))
            .transpose()
    })
    .map_err(|e| match e {
        // A layer whose size differs from its adapter's: the file was made for another model.
        AdapterError::Config(c) => AdapterError::Incompatible {
            message: format!("{c} (the adapter was made for another model)"),
        },
        other => other,
    })?;
    Ok(placed.model)
}

/// Names a layer-level error by the model path the adapter is attached to.
fn at(e: AdapterError, path: &str) -> AdapterError {
    match e {
        AdapterError::Config(c) => AdapterError::Config(c.at(path)),
        other => other,
    }
}
