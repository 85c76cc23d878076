//! The quantized adapter file: every factor quantized with one [`QuantConfig`] — values as
//! `<layer>.<factor>.q` (I8, or U8 with int4 packed two to a byte) and scales as
//! `<layer>.<factor>.scale` (F32) — with the specs under `kron_adapters` and the scheme under
//! `kron_adapters.quantization` in the metadata. Every reader of adapter files reads it,
//! dequantized.

use std::collections::{BTreeMap, HashMap};

use ::safetensors::Dtype;

use super::native::{CheckpointMeta, NativeAdapters, META_KEY};
use super::st;
use crate::error::AdapterError;
use crate::quant::{QuantConfig, QuantizedTensor};

/// The safetensors metadata key of a quantized adapter file's [`QuantConfig`].
pub const QUANT_KEY: &str = "kron_adapters.quantization";

/// A quantized adapter file's content: the adapters' specs and their quantized factors.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedAdapters {
    /// Version and specs.
    pub meta: CheckpointMeta,
    /// The scheme.
    pub config: QuantConfig,
    /// Each layer's quantized factors, in spec order.
    pub factors: BTreeMap<String, Vec<QuantizedTensor>>,
}

st::file_io!(QuantizedAdapters, "a quantized adapter file");

impl QuantizedAdapters {
    /// Quantizes every factor of `adapters` with `config`.
    pub fn quantize(adapters: &NativeAdapters, config: QuantConfig) -> Result<Self, AdapterError> {
        adapters.validate("adapters")?;
        let mut factors = BTreeMap::new();
        for (layer, spec) in &adapters.meta.layers {
            let list = spec
                .factors
                .iter()
                .zip(&adapters.factors[layer])
                .map(|((f, _), t)| {
                    QuantizedTensor::quantize(&super::native::factor_key(layer, f), t, config)
                })
                .collect::<Result<Vec<_>, _>>()?;
            factors.insert(layer.clone(), list);
        }
        Ok(Self {
            meta: adapters.meta.clone(),
            config,
            factors,
        })
    }

    /// The dequantized adapters.
    pub fn dequantize(&self) -> NativeAdapters {
        NativeAdapters {
            meta: self.meta.clone(),
            factors: self
                .factors
                .iter()
                .map(|(l, fs)| (l.clone(), fs.iter().map(|q| q.dequantize()).collect()))
                .collect(),
        }
    }

    /// The safetensors bytes (canonical).
    pub fn to_bytes(&self) -> Result<Vec<u8>, AdapterError> {
        let mut entries = Vec::new();
        for (key, layer, _) in self.meta.factor_keys() {
            let index = self.meta.layers[layer]
                .factors
                .iter()
                .position(|(f, _)| super::native::factor_key(layer, f) == key)
                .expect("the key came from this spec");
            let q = self
                .factors
                .get(layer)
                .and_then(|fs| fs.get(index))
                .ok_or_else(|| {
                    AdapterError::format("quantized adapters", format!("no values for `{key}`"))
                })?;
            let packed = q.packed();
            let (dtype, shape) = if self.config.bits == 8 {
                (Dtype::I8, q.shape.to_vec())
            } else {
                (Dtype::U8, vec![packed.len()])
            };
            entries.push((format!("{key}.q"), dtype, shape, packed));
            let scales = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            entries.push((
                format!("{key}.scale"),
                Dtype::F32,
                vec![q.scales.len()],
                scales,
            ));
        }
        let json = |v: Result<String, serde_json::Error>| {
            v.map_err(|e| AdapterError::format("quantized adapters", e.to_string()))
        };
        let meta = HashMap::from([
            (
                META_KEY.to_string(),
                json(serde_json::to_string(&self.meta))?,
            ),
            (
                QUANT_KEY.to_string(),
                json(serde_json::to_string(&self.config))?,
            ),
        ]);
        st::serialize("quantized adapters", &entries, meta)
    }

    /// Parses a quantized adapter file: valid specs, every factor present and consistent with
    /// its spec and the scheme, nothing else.
    pub fn from_bytes(path: &str, bytes: &[u8]) -> Result<Self, AdapterError> {
        let md = st::metadata(path, bytes)?;
        let meta: CheckpointMeta = st::meta_json(path, &md, META_KEY)?
            .ok_or_else(|| AdapterError::format(path, format!("no `{META_KEY}` metadata")))?;
        meta.validate(path)?;
        let config: QuantConfig = st::meta_json(path, &md, QUANT_KEY)?
            .ok_or_else(|| AdapterError::format(path, format!("no `{QUANT_KEY}` metadata")))?;
        let config = QuantConfig::new(config.bits, config.level).map_err(|source| {
            AdapterError::InvalidSpec {
                path: path.to_string(),
                source,
            }
        })?;
        let tensors = st::parse(path, bytes)?;
        let keys = meta.factor_keys();
        let expected: Vec<String> = keys
            .iter()
            .flat_map(|(k, ..)| [format!("{k}.q"), format!("{k}.scale")])
            .collect();
        let present: Vec<String> = tensors.names().into_iter().map(String::from).collect();
        super::native::check_keys(path, expected.iter().map(String::as_str), &present)?;
        let mut factors: BTreeMap<String, Vec<QuantizedTensor>> = BTreeMap::new();
        for (key, layer, shape) in &keys {
            let (qv, sv) = (
                tensors.tensor(&format!("{key}.q")),
                tensors.tensor(&format!("{key}.scale")),
            );
            let (Ok(qv), Ok(sv)) = (qv, sv) else {
                return Err(AdapterError::format(
                    path,
                    format!("`{key}` cannot be read"),
                ));
            };
            if sv.dtype() != Dtype::F32 || !matches!(qv.dtype(), Dtype::I8 | Dtype::U8) {
                return Err(AdapterError::format(
                    path,
                    format!("`{key}`: quantized values are I8/U8 and scales F32"),
                ));
            }
            let scales = st::decode_f32(path, key, &sv)?;
            let q = QuantizedTensor::from_packed(key, *shape, config, qv.data(), scales).map_err(
                |source| AdapterError::InvalidSpec {
                    path: path.to_string(),
                    source,
                },
            )?;
            factors.entry(layer.to_string()).or_default().push(q);
        }
        Ok(Self {
            meta,
            config,
            factors,
        })
    }
}

/// Is this metadata a quantized adapter file's?
pub(crate) fn is_quantized_meta(meta: &HashMap<String, String>) -> bool {
    meta.contains_key(QUANT_KEY)
}

/// Is this safetensors buffer a quantized adapter file?
pub fn is_quantized(bytes: &[u8]) -> bool {
    st::metadata("", bytes).is_ok_and(|m| is_quantized_meta(&m))
}
