//! Hugging Face PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`):
//! reading LoRA and every LoKr variant into this crate's adapters, writing this crate's LoRA,
//! KronA and Kron-LoRA adapters as folders PEFT loads, and putting adapters into a model by
//! (mapped) module name.
//!
//! Layout: PyTorch stores `[out, in]`, Burn `[in, out]`. PEFT's LoKr is
//! `ΔW = (alpha / r) · kron(w1, w2)` with `w1 = lokr_w1` or `lokr_w1_a @ lokr_w1_b` and
//! `w2 = lokr_w2` or `lokr_w2_a @ lokr_w2_b`, so in Burn layout `a = w1ᵀ`, `b = w2ᵀ`,
//! `b1 = lokr_w2_bᵀ`, `b2 = lokr_w2_aᵀ`. LoRA: `ΔW = (lora_alpha / r) · lora_B @ lora_A`, so
//! `down = lora_Aᵀ`, `up = lora_Bᵀ` (`lora_alpha / √r` with `use_rslora`).
//!
//! Options this crate cannot honour are refused with an error naming them — DoRA, conv layers
//! and `use_effective_conv2d`, `fan_in_fan_out`, trained biases, `modules_to_save`,
//! `layers_to_transform` — never silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterSpec, Method};
use crate::checkpoint::{write_atomic, AdapterLayers, CheckpointMeta, HostTensor, NativeAdapters};
use crate::error::AdapterError;
use crate::kron::peft_factorization;
use crate::targets::Targets;

/// The PEFT methods this crate reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// LoRA.
    #[serde(rename = "LORA")]
    Lora,
    /// LoKr (LyCORIS's Kronecker adapter).
    #[serde(rename = "LOKR")]
    Lokr,
}

/// The fields of `adapter_config.json` this crate uses or must check.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PeftFileConfig {
    /// `LORA` or `LOKR`.
    pub peft_type: String,
    /// The default rank.
    pub r: usize,
    /// LoRA's alpha.
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// LoKr's alpha.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Per-module ranks, keys matched as PEFT does (`(.*\.)?key$`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Which modules PEFT adapted.
    #[serde(default)]
    pub target_modules: Option<Targets>,
    /// LoRA: scale `lora_alpha / √r` instead of `lora_alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// LoRA: DoRA (refused).
    #[serde(default)]
    pub use_dora: bool,
    /// LoKr: Tucker-decomposed conv kernels (refused when true).
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// LoKr: `w1` decomposed too.
    #[serde(default)]
    pub decompose_both: bool,
    /// LoKr: the factorization hint.
    #[serde(default = "minus_one")]
    pub decompose_factor: i64,
    /// LoRA: weights stored `[in, out]` (GPT-2's Conv1D; refused).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// LoRA: which biases trained (`none` only).
    #[serde(default = "none")]
    pub bias: String,
    /// Modules saved in full (refused).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only some layer indices (refused).
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// The base model, for information.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn minus_one() -> i64 {
    -1
}
fn none() -> String {
    "none".into()
}

impl PeftFileConfig {
    /// Parses and checks `adapter_config.json`; `path` names it in errors.
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Self, AdapterError> {
        let cfg: Self = serde_json::from_slice(bytes).map_err(|e| AdapterError::Format {
            path: path.to_string(),
            message: format!("not a PEFT adapter_config.json: {e}"),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// The method.
    pub fn peft_type(&self) -> Result<PeftType, AdapterError> {
        match self.peft_type.as_str() {
            "LORA" => Ok(PeftType::Lora),
            "LOKR" => Ok(PeftType::Lokr),
            other => Err(AdapterError::Unsupported {
                option: "peft_type".into(),
                message: format!("peft_type {other:?}: only LORA and LOKR are supported"),
            }),
        }
    }

    fn check(&self, path: &str) -> Result<(), AdapterError> {
        let refuse = |option: &str, message: &str| {
            Err(AdapterError::Unsupported {
                option: option.into(),
                message: format!("{path}: {message}"),
            })
        };
        self.peft_type()?;
        if self.r == 0 {
            return Err(AdapterError::Format {
                path: path.into(),
                message: "r = 0".into(),
            });
        }
        if self.use_dora {
            return refuse(
                "use_dora",
                "DoRA adapters (use_dora = true) are not supported",
            );
        }
        if self.use_effective_conv2d {
            return refuse(
                "use_effective_conv2d",
                "conv LoKr (use_effective_conv2d = true) is not supported",
            );
        }
        if self.fan_in_fan_out {
            return refuse(
                "fan_in_fan_out",
                "fan_in_fan_out = true (GPT-2 Conv1D weights) is not supported",
            );
        }
        if self.bias != "none" {
            return refuse(
                "bias",
                &format!("bias = {:?}: trained biases are not supported", self.bias),
            );
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse(
                "modules_to_save",
                "modules_to_save (fully trained modules) is not supported",
            );
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return refuse(
                "layers_to_transform",
                "layers_to_transform is not supported",
            );
        }
        if let Some(t) = &self.target_modules {
            t.validate()?;
        }
        Ok(())
    }

    /// The rank and alpha of `module`, with `rank_pattern`/`alpha_pattern` applied as PEFT does.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let matches = |key: &str| {
            regex::Regex::new(&format!(r"^(.*\.)?({key})$"))
                .map(|re| re.is_match(module))
                .unwrap_or(false)
        };
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(self.r, |(_, r)| *r);
        let default_alpha = match self.peft_type() {
            Ok(PeftType::Lora) => self.lora_alpha.unwrap_or(8.0),
            _ => self.alpha.unwrap_or(0.0),
        };
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(default_alpha, |(_, a)| *a);
        (r, alpha)
    }
}

const PREFIX: &str = "base_model.model.";

const SUFFIXES: &[&str] = &[
    "lora_A.weight",
    "lora_B.weight",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// Tensor names PEFT uses for things this crate does not support, and what they are.
const UNSUPPORTED_SUFFIXES: &[(&str, &str, &str)] = &[
    ("lokr_t2", "use_effective_conv2d", "conv LoKr (lokr_t2)"),
    (
        "lora_magnitude_vector",
        "use_dora",
        "DoRA (lora_magnitude_vector)",
    ),
    (
        "lora_embedding_A",
        "embedding layers",
        "LoRA on embeddings (lora_embedding_A)",
    ),
    (
        "lora_embedding_B",
        "embedding layers",
        "LoRA on embeddings (lora_embedding_B)",
    ),
];

/// A PEFT adapter read into this crate's terms: the file's config and every module's adapter as
/// [`NativeAdapters`] (Burn layout, specs with method, shapes and scale), keyed by the module
/// names PEFT used.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    /// The parsed `adapter_config.json`.
    pub config: PeftFileConfig,
    /// The adapters, by PEFT module name.
    pub adapters: NativeAdapters,
}

impl PeftAdapter {
    /// Reads a PEFT adapter folder.
    pub fn read_dir(dir: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        let cfg = std::fs::read(&cfg_path).map_err(|e| AdapterError::io(&cfg_path, e))?;
        let st = std::fs::read(&st_path).map_err(|e| AdapterError::io(&st_path, e))?;
        Self::from_bytes(&dir.display().to_string(), &cfg, &st)
    }

    /// Parses a PEFT adapter from its two files' bytes; `path` names it in errors.
    pub fn from_bytes(
        path: &str,
        config_json: &[u8],
        safetensors_bytes: &[u8],
    ) -> Result<Self, AdapterError> {
        let config =
            PeftFileConfig::from_json(&format!("{path}/adapter_config.json"), config_json)?;
        let kind = config.peft_type()?;
        let st_name = format!("{path}/adapter_model.safetensors");
        let st = safetensors::SafeTensors::deserialize(safetensors_bytes).map_err(|e| {
            AdapterError::Format {
                path: st_name.clone(),
                message: format!("not a valid safetensors file: {e}"),
            }
        })?;
        // Group tensors by module.
        let mut modules: BTreeMap<String, BTreeMap<&'static str, HostTensor>> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let key = name.strip_prefix(PREFIX).unwrap_or(&name);
            if let Some((suffix, option, what)) = UNSUPPORTED_SUFFIXES.iter().find(|(s, _, _)| {
                key.ends_with(&format!(".{s}")) || key.contains(&format!(".{s}."))
            }) {
                let _ = suffix;
                return Err(AdapterError::Unsupported {
                    option: option.to_string(),
                    message: format!(
                        "{st_name}: tensor `{name}` is {what}, which is not supported"
                    ),
                });
            }
            let Some(suffix) = SUFFIXES.iter().find(|s| key.ends_with(&format!(".{s}"))) else {
                return Err(AdapterError::Format {
                    path: st_name.clone(),
                    message: format!("unexpected tensor `{name}`: not a LoRA or LoKr factor"),
                });
            };
            let module = &key[..key.len() - suffix.len() - 1];
            if view.shape().len() != 2 {
                return Err(AdapterError::Unsupported {
                    option: "conv layers".into(),
                    message: format!(
                        "{st_name}: `{name}` has shape {:?}; only linear layers (2-D factors) are supported",
                        view.shape()
                    ),
                });
            }
            if view.shape().contains(&0) {
                return Err(AdapterError::Format {
                    path: st_name.clone(),
                    message: format!("`{name}` has an empty shape {:?}", view.shape()),
                });
            }
            let t = HostTensor::from_view(&view).ok_or_else(|| AdapterError::Format {
                path: st_name.clone(),
                message: format!(
                    "`{name}` is {:?}; F32, F16 and BF16 are supported",
                    view.dtype()
                ),
            })?;
            modules
                .entry(module.to_string())
                .or_default()
                .insert(suffix, t);
        }
        if modules.is_empty() {
            return Err(AdapterError::Format {
                path: st_name,
                message: "no adapter tensors".into(),
            });
        }
        let mut specs = Vec::new();
        let mut factors = BTreeMap::new();
        for (module, tensors) in modules {
            if let Some(t) = &config.target_modules {
                if !t.matches(&module) {
                    return Err(AdapterError::Format {
                        path: st_name.clone(),
                        message: format!(
                            "module `{module}` has factors but is not in target_modules {t:?}"
                        ),
                    });
                }
            }
            let (r, alpha) = config.rank_alpha(&module);
            let (spec, values) = match kind {
                PeftType::Lora => {
                    lora_layer(&st_name, &module, tensors, r, alpha, config.use_rslora)?
                }
                PeftType::Lokr => lokr_layer(&st_name, &module, tensors, r, alpha)?,
            };
            specs.push((module.clone(), spec));
            factors.insert(module, values);
        }
        let mut meta = CheckpointMeta::new(specs);
        meta.extra = Some(serde_json::json!({ "source": "peft", "peft_type": config.peft_type }));
        Ok(Self {
            config,
            adapters: NativeAdapters { meta, factors },
        })
    }
}

fn take(
    path: &str,
    module: &str,
    tensors: &mut BTreeMap<&'static str, HostTensor>,
    suffix: &str,
) -> Result<HostTensor, AdapterError> {
    tensors.remove(suffix).ok_or_else(|| AdapterError::Format {
        path: path.to_string(),
        message: format!("module `{module}` lacks `{suffix}`"),
    })
}

fn shape_err(path: &str, module: &str, what: String) -> AdapterError {
    AdapterError::Format {
        path: path.to_string(),
        message: format!("module `{module}`: {what}"),
    }
}

fn lora_layer(
    path: &str,
    module: &str,
    mut t: BTreeMap<&'static str, HostTensor>,
    r: usize,
    alpha: f64,
    rslora: bool,
) -> Result<(AdapterSpec, Vec<HostTensor>), AdapterError> {
    let a = take(path, module, &mut t, "lora_A.weight")?;
    let b = take(path, module, &mut t, "lora_B.weight")?;
    if let Some(k) = t.keys().next() {
        return Err(shape_err(
            path,
            module,
            format!("`{k}` does not belong to a LoRA adapter"),
        ));
    }
    let (ra, d_in) = (a.shape[0], a.shape[1]);
    let (d_out, rb) = (b.shape[0], b.shape[1]);
    if ra != rb || ra != r {
        return Err(shape_err(
            path,
            module,
            format!(
                "lora_A {:?} and lora_B {:?} do not have the config's rank {r}",
                a.shape, b.shape
            ),
        ));
    }
    let scale = if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    let spec = AdapterSpec {
        method: Method::Lora,
        d_in,
        d_out,
        factors: vec![("down".into(), [d_in, r]), ("up".into(), [r, d_out])],
        scale,
    };
    Ok((spec, vec![a.transposed(), b.transposed()]))
}

fn lokr_layer(
    path: &str,
    module: &str,
    mut t: BTreeMap<&'static str, HostTensor>,
    r: usize,
    alpha: f64,
) -> Result<(AdapterSpec, Vec<HostTensor>), AdapterError> {
    let scale = alpha / r as f64;
    // w1 [out_l, in_m], full or w1_a [out_l, r'] @ w1_b [r', in_m] (materialized: ΔW is the same).
    let w1 = match t.remove("lokr_w1") {
        Some(w1) => {
            if t.contains_key("lokr_w1_a") || t.contains_key("lokr_w1_b") {
                return Err(shape_err(
                    path,
                    module,
                    "both lokr_w1 and lokr_w1_a/_b".into(),
                ));
            }
            w1
        }
        None => {
            let (a, b) = (
                take(path, module, &mut t, "lokr_w1_a")?,
                take(path, module, &mut t, "lokr_w1_b")?,
            );
            if a.shape[1] != b.shape[0] {
                return Err(shape_err(
                    path,
                    module,
                    format!(
                        "lokr_w1_a {:?} @ lokr_w1_b {:?} do not chain",
                        a.shape, b.shape
                    ),
                ));
            }
            a.matmul(&b)
        }
    };
    let a = w1.transposed();
    let (spec_factors, values, method) = match t.remove("lokr_w2") {
        Some(w2) => {
            if t.contains_key("lokr_w2_a") || t.contains_key("lokr_w2_b") {
                return Err(shape_err(
                    path,
                    module,
                    "both lokr_w2 and lokr_w2_a/_b".into(),
                ));
            }
            let b = w2.transposed();
            let shapes = vec![
                ("a".to_string(), [a.shape[0], a.shape[1]]),
                ("b".to_string(), [b.shape[0], b.shape[1]]),
            ];
            (shapes, vec![a, b], Method::Krona)
        }
        None => {
            let (w2a, w2b) = (
                take(path, module, &mut t, "lokr_w2_a")?,
                take(path, module, &mut t, "lokr_w2_b")?,
            );
            if w2a.shape[1] != w2b.shape[0] {
                return Err(shape_err(
                    path,
                    module,
                    format!(
                        "lokr_w2_a {:?} @ lokr_w2_b {:?} do not chain",
                        w2a.shape, w2b.shape
                    ),
                ));
            }
            let (b1, b2) = (w2b.transposed(), w2a.transposed());
            let shapes = vec![
                ("a".to_string(), [a.shape[0], a.shape[1]]),
                ("b1".to_string(), [b1.shape[0], b1.shape[1]]),
                ("b2".to_string(), [b2.shape[0], b2.shape[1]]),
            ];
            (shapes, vec![a, b1, b2], Method::KronLora)
        }
    };
    if let Some(k) = t.keys().next() {
        return Err(shape_err(
            path,
            module,
            format!("`{k}` does not belong here"),
        ));
    }
    let d_in = spec_factors[0].1[0] * spec_factors[1].1[0];
    let d_out = spec_factors[0].1[1] * spec_factors.last().expect("two or three").1[1];
    let spec = AdapterSpec {
        method,
        d_in,
        d_out,
        factors: spec_factors,
        scale,
    };
    Ok((spec, values))
}

/// How module names in an adapter file map to the layer names of a model (or of a base
/// checkpoint): prefix rewrites, applied in order, first match wins. The identity by default.
///
/// ```
/// use kron_adapters::peft::NameMap;
/// // A PEFT adapter trained on BertForSequenceClassification ("bert.encoder.layer.0...")
/// // applied to this crate's encoder ("encoder.layer.0...").
/// let map = NameMap::new().with_prefix("bert.", "");
/// assert_eq!(map.apply("bert.encoder.layer.0.attention.self.query"), "encoder.layer.0.attention.self.query");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameMap {
    rules: Vec<(String, String)>,
}

impl NameMap {
    /// The identity.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule: names starting with `from` get `to` instead.
    pub fn with_prefix(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.rules.push((from.into(), to.into()));
        self
    }

    /// Parses `FROM=TO`.
    pub fn parse_rule(mut self, rule: &str) -> Result<Self, AdapterError> {
        let (from, to) = rule.split_once('=').ok_or_else(|| {
            AdapterError::config("name map", "rule", format!("{rule:?} is not FROM=TO"))
        })?;
        self.rules.push((from.into(), to.into()));
        Ok(self)
    }

    /// The mapped name.
    pub fn apply(&self, name: &str) -> String {
        for (from, to) in &self.rules {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

/// Puts the adapters into `model`: each adapter goes to the layer its mapped name names, which
/// must have the adapter's size. Layers without an adapter in the file keep theirs. Fails,
/// changing nothing, if a name matches no layer (the error lists the model's layers).
pub fn apply_adapters<B: Backend, M: AdapterLayers<B>>(
    mut model: M,
    adapters: &NativeAdapters,
    map: &NameMap,
    device: &B::Device,
) -> Result<M, AdapterError> {
    let mut built = HashMap::new();
    {
        let layers = model.adapter_layers();
        let names: HashMap<String, (usize, usize)> = layers
            .iter()
            .map(|(n, l)| (n.clone(), (l.d_in(), l.d_out())))
            .collect();
        for (name, spec) in &adapters.meta.layers {
            let target = map.apply(name);
            let Some(&(d_in, d_out)) = names.get(&target) else {
                let mut known: Vec<&String> = names.keys().collect();
                known.sort();
                known.truncate(12);
                return Err(AdapterError::config(
                    name.clone(),
                    "name",
                    format!("maps to `{target}`, which is not a layer of the model; its layers include {known:?} (use a NameMap)"),
                ));
            };
            if (d_in, d_out) != (spec.d_in, spec.d_out) {
                return Err(AdapterError::config(
                    target,
                    "size",
                    format!(
                        "the adapter is [{}, {}] (in, out) but the layer is [{d_in}, {d_out}]",
                        spec.d_in, spec.d_out
                    ),
                ));
            }
            built.insert(target, adapters.adapter::<B>(name, device)?);
        }
    }
    for (name, layer) in model.adapter_layers_mut() {
        if let Some(adapter) = built.remove(&name) {
            layer.adapter = Some(adapter);
        }
    }
    Ok(model)
}

/// Which PEFT method and `decompose_factor` can express these adapters, or why none can.
fn export_plan(adapters: &NativeAdapters) -> Result<(PeftType, i64), AdapterError> {
    let methods: Vec<Method> = adapters.meta.layers.values().map(|s| s.method).collect();
    if methods.is_empty() {
        return Err(AdapterError::config(
            "export",
            "adapters",
            "no adapters to export",
        ));
    }
    let lora = methods.iter().all(|m| *m == Method::Lora);
    if lora {
        return Ok((PeftType::Lora, -1));
    }
    if methods.contains(&Method::Lora) {
        return Err(AdapterError::Unsupported {
            option: "mixed methods".into(),
            message: "LoRA and Kronecker adapters in one model cannot be one PEFT config; export them separately".into(),
        });
    }
    // PEFT LoKr derives the factor shapes from factorization(d, decompose_factor), with one
    // factor for the whole config: find one that gives every layer's shapes.
    let fits = |f: i64| {
        adapters.meta.layers.values().all(|s| {
            let a = s.factors[0].1;
            peft_factorization(s.d_in, f).0 == a[0] && peft_factorization(s.d_out, f).0 == a[1]
        })
    };
    let mut candidates = vec![-1i64];
    candidates.extend(
        adapters
            .meta
            .layers
            .values()
            .flat_map(|s| [s.factors[0].1[0] as i64, s.factors[0].1[1] as i64]),
    );
    candidates
        .into_iter()
        .find(|&f| fits(f))
        .map(|f| (PeftType::Lokr, f))
        .ok_or_else(|| AdapterError::Unsupported {
            option: "factor shapes".into(),
            message: format!(
                "PEFT's LoKr derives its factor shapes from factorization(d, decompose_factor) with \
                 one factor for all layers, and no factor gives these shapes: {:?}. Build the \
                 adapters with KronAConfig::auto() (or a_shape [f, f] for one f) to export them",
                adapters
                    .meta
                    .layers
                    .iter()
                    .map(|(n, s)| format!("{n}: a {:?}", s.factors[0].1))
                    .collect::<Vec<_>>()
            ),
        })
}

/// Writes adapters as a PEFT folder (`adapter_config.json`, `adapter_model.safetensors` with
/// metadata `format: pt`). LoRA adapters become LoRA; KronA and Kron-LoRA become LoKr with
/// `decompose_both = false`, full `lokr_w2` for KronA and `lokr_w2_a`/`lokr_w2_b` for
/// Kron-LoRA (or, when its rank is at least half the larger `b` size, where PEFT would build a
/// full `w2` itself, the product `b1·b2`). Per-layer ranks and alphas go to `rank_pattern` and
/// `alpha_pattern`, so that PEFT rebuilds exactly these factors with these scales.
///
/// The folder is written to a temporary directory and renamed, so a failure leaves nothing.
/// An existing `dir` is refused unless `overwrite`.
pub fn write_peft_dir(
    dir: impl AsRef<Path>,
    adapters: &NativeAdapters,
    base_model: Option<&str>,
    overwrite: bool,
) -> Result<(), AdapterError> {
    let dir = dir.as_ref();
    let (config, tensors) = peft_files(adapters, base_model)?;
    if dir.exists() && !overwrite {
        return Err(AdapterError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists (pass overwrite to replace it)",
            ),
        ));
    }
    let tmp: PathBuf = {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "peft".into());
        dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
        write_atomic(&tmp.join("adapter_config.json"), config.as_bytes())?;
        write_atomic(&tmp.join("adapter_model.safetensors"), &tensors)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| AdapterError::io(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The two files of a PEFT folder for these adapters: `adapter_config.json` text and
/// `adapter_model.safetensors` bytes.
pub fn peft_files(
    adapters: &NativeAdapters,
    base_model: Option<&str>,
) -> Result<(String, Vec<u8>), AdapterError> {
    let (kind, factor) = export_plan(adapters)?;
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut push = |name: String, t: &HostTensor| {
        let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name, t.shape.clone(), bytes));
    };
    for (module, spec) in &adapters.meta.layers {
        let f = &adapters.factors[module];
        let key = |s: &str| format!("{PREFIX}{module}.{s}");
        let r = match spec.method {
            Method::Lora => {
                push(key("lora_A.weight"), &f[0].transposed());
                push(key("lora_B.weight"), &f[1].transposed());
                spec.factors[0].1[1]
            }
            Method::Krona => {
                push(key("lokr_w1"), &f[0].transposed());
                push(key("lokr_w2"), &f[1].transposed());
                // PEFT keeps w2 full when r >= max(out_k, in_n) / 2.
                let b = spec.factors[1].1;
                b[0].max(b[1])
            }
            Method::KronLora => {
                push(key("lokr_w1"), &f[0].transposed());
                let (b1, b2) = (&f[1], &f[2]);
                let rank = b1.shape[1];
                let (b_in, b_out) = (b1.shape[0], b2.shape[1]);
                if 2 * rank < b_in.max(b_out) {
                    push(key("lokr_w2_a"), &b2.transposed());
                    push(key("lokr_w2_b"), &b1.transposed());
                } else {
                    push(key("lokr_w2"), &b1.matmul(b2).transposed());
                }
                rank
            }
        };
        ranks.insert(module.clone(), r);
        alphas.insert(module.clone(), spec.scale * r as f64);
    }
    // The most common rank and alpha are the defaults, the rest go to the patterns.
    let mode = |values: Vec<String>| -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .map(|(v, _)| v)
            .unwrap_or_default()
    };
    let r_default: usize = mode(ranks.values().map(|r| r.to_string()).collect())
        .parse()
        .expect("a rank");
    let alpha_default: f64 = mode(alphas.values().map(|a| format!("{a:?}")).collect())
        .parse()
        .expect("an alpha");
    let rank_pattern: BTreeMap<_, _> = ranks
        .iter()
        .filter(|(_, r)| **r != r_default)
        .map(|(m, r)| (m.clone(), *r))
        .collect();
    let alpha_pattern: BTreeMap<_, _> = alphas
        .iter()
        .filter(|(_, a)| (**a - alpha_default).abs() > 1e-12 * a.abs().max(1.0))
        .map(|(m, a)| (m.clone(), *a))
        .collect();
    let targets: Vec<&String> = adapters.meta.layers.keys().collect();
    let mut config = serde_json::json!({
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "peft_type": kind,
        "r": r_default,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "task_type": null,
        "revision": null,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
    });
    let obj = config.as_object_mut().expect("an object");
    match kind {
        PeftType::Lora => {
            obj.insert("lora_alpha".into(), serde_json::json!(alpha_default));
            obj.insert("lora_dropout".into(), serde_json::json!(0.0));
            obj.insert("bias".into(), serde_json::json!("none"));
            obj.insert("fan_in_fan_out".into(), serde_json::json!(false));
            obj.insert("use_rslora".into(), serde_json::json!(false));
            obj.insert("use_dora".into(), serde_json::json!(false));
            obj.insert("init_lora_weights".into(), serde_json::json!(true));
        }
        PeftType::Lokr => {
            obj.insert("alpha".into(), serde_json::json!(alpha_default));
            obj.insert("rank_dropout".into(), serde_json::json!(0.0));
            obj.insert("module_dropout".into(), serde_json::json!(0.0));
            obj.insert("use_effective_conv2d".into(), serde_json::json!(false));
            obj.insert("decompose_both".into(), serde_json::json!(false));
            obj.insert("decompose_factor".into(), serde_json::json!(factor));
            obj.insert("rank_dropout_scale".into(), serde_json::json!(false));
            obj.insert("init_weights".into(), serde_json::json!(true));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("consistent"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).expect("valid tensors serialize");
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes");
    Ok((text, bytes))
}
