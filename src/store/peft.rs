//! Hugging Face PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`):
//! LoRA and every linear LoKr variant read into this crate's adapters, and this crate's LoRA,
//! KronA and Kron-LoRA adapters written as folders PEFT loads.
//!
//! Layout: PyTorch stores `[out, in]`, Burn `[in, out]`. PEFT's LoKr is
//! `ΔW = (alpha / r) · kron(w1, w2)` with `w1 = lokr_w1` or `lokr_w1_a @ lokr_w1_b` and
//! `w2 = lokr_w2` or `lokr_w2_a @ lokr_w2_b`, so in Burn layout `a = w1ᵀ`, `b = w2ᵀ`,
//! `b1 = lokr_w2_bᵀ`, `b2 = lokr_w2_aᵀ`. LoRA: `ΔW = (lora_alpha / r) · lora_B @ lora_A`, so
//! `down = lora_Aᵀ`, `up = lora_Bᵀ` (`lora_alpha / √r` with `use_rslora`).
//!
//! PEFT's rules, matched exactly: `r` and `alpha` default to 8; `rank_pattern` and
//! `alpha_pattern` keys are tried in the order the file lists them, the first selecting a
//! module by `(.*\.)?(key)$` wins; LoKr builds `w2` as `w2_a @ w2_b` exactly when
//! `r < max(out_k, in_n) / 2` (any `r ≥ 1`, even above `min(out_k, in_n)`) and `w1` decomposed
//! when `decompose_both` and `r < max(out_l, in_m) / 2`, with shapes from
//! `factorization(d, decompose_factor)`. A file PEFT would not build that way (a decomposed
//! factor whose inner size is not `r`, a full `w2` where PEFT expects `w2_a`/`w2_b`, shapes
//! another factorization makes) is refused, since PEFT itself could not load it.
//!
//! Options this crate cannot honour are refused with an error naming them — DoRA, conv layers
//! and `use_effective_conv2d`, `fan_in_fan_out`, trained biases, `modules_to_save`,
//! `layers_to_transform` — never silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ::safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::native::{CheckpointMeta, NativeAdapters};
use super::st::{self, HostTensor};
use crate::adapter::shape::peft_factorization;
use crate::adapter::{AdapterSpec, Method};
use crate::error::AdapterError;
use crate::place::{Patterns, Targets};

/// The PEFT methods this crate reads and writes, and their tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// LoRA.
    #[serde(rename = "LORA")]
    Lora,
    /// LoKr (LyCORIS's Kronecker adapter).
    #[serde(rename = "LOKR")]
    Lokr,
}

impl PeftType {
    /// The tensor names of one adapted module (as PEFT's `adapter_layer_names`, the ones this
    /// crate reads), as they end a key in `adapter_model.safetensors`.
    pub fn tensor_names(self) -> &'static [&'static str] {
        match self {
            PeftType::Lora => &["lora_A.weight", "lora_B.weight"],
            PeftType::Lokr => &[
                "lokr_w1",
                "lokr_w1_a",
                "lokr_w1_b",
                "lokr_w2",
                "lokr_w2_a",
                "lokr_w2_b",
            ],
        }
    }

    /// The name in `adapter_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            PeftType::Lora => "LORA",
            PeftType::Lokr => "LOKR",
        }
    }
}

/// Tensor names PEFT uses for things this crate does not support: (suffix, option, what).
const UNSUPPORTED_TENSORS: &[(&str, &str, &str)] = &[
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

/// The prefix PEFT puts before module names in `adapter_model.safetensors`.
const PREFIX: &str = "base_model.model.";

fn eight() -> usize {
    8
}
fn minus_one() -> i64 {
    -1
}
fn none() -> String {
    "none".into()
}

/// The fields of `adapter_config.json` this crate uses or must check, with PEFT's defaults.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PeftFileConfig {
    /// `LORA` or `LOKR`.
    pub peft_type: String,
    /// The default rank (PEFT's default 8).
    #[serde(default = "eight")]
    pub r: usize,
    /// LoRA's alpha (PEFT's default 8).
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// LoKr's alpha (PEFT's default 8).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Per-module ranks, in the file's order (the first key selecting a module wins).
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    /// Per-module alphas, likewise.
    #[serde(default)]
    pub alpha_pattern: Patterns<f64>,
    /// Which modules PEFT adapted (`"all-linear"` means every linear).
    #[serde(default)]
    pub target_modules: Option<Targets>,
    /// Modules PEFT excluded.
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
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

impl PeftFileConfig {
    /// Parses and checks `adapter_config.json`; `path` names it in errors.
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Self, AdapterError> {
        let cfg: Self = serde_json::from_slice(bytes).map_err(|e| {
            AdapterError::format(path, format!("not a PEFT adapter_config.json: {e}"))
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
            return Err(AdapterError::format(path, "r = 0: PEFT refuses it too"));
        }
        let flags = [
            (self.use_dora, "use_dora", "DoRA adapters (use_dora = true)"),
            (
                self.use_effective_conv2d,
                "use_effective_conv2d",
                "conv LoKr (use_effective_conv2d = true)",
            ),
            (
                self.fan_in_fan_out,
                "fan_in_fan_out",
                "fan_in_fan_out = true (GPT-2 Conv1D weights)",
            ),
            (
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
                "modules_to_save",
                "modules_to_save (fully trained modules)",
            ),
            (
                self.layers_to_transform
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
                "layers_to_transform",
                "layers_to_transform",
            ),
        ];
        if let Some((_, option, what)) = flags.iter().find(|(on, ..)| *on) {
            return refuse(option, &format!("{what} is not supported"));
        }
        if self.bias != "none" {
            return refuse(
                "bias",
                &format!("bias = {:?}: trained biases are not supported", self.bias),
            );
        }
        for t in [&self.target_modules, &self.exclude_modules]
            .into_iter()
            .flatten()
        {
            t.validate()?;
        }
        if let Some((k, _)) = self.rank_pattern.0.iter().find(|(_, r)| *r == 0) {
            return Err(AdapterError::format(
                path,
                format!("rank_pattern `{k}`: r = 0"),
            ));
        }
        Ok(())
    }

    /// The rank and alpha of `module`, with `rank_pattern`/`alpha_pattern` applied as PEFT does
    /// (first key in file order whose pattern selects the module).
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = self.rank_pattern.lookup(module).copied().unwrap_or(self.r);
        let default_alpha = match self.peft_type() {
            Ok(PeftType::Lora) => self.lora_alpha,
            _ => self.alpha,
        }
        .unwrap_or(8.0);
        let alpha = self
            .alpha_pattern
            .lookup(module)
            .copied()
            .unwrap_or(default_alpha);
        (r, alpha)
    }

    /// Did PEFT target `module` (and not exclude it)?
    fn targets(&self, module: &str) -> bool {
        let targeted = match &self.target_modules {
            Some(Targets::Regex(r)) if r == "all-linear" => true,
            Some(t) => t.matches(module),
            None => true,
        };
        targeted
            && !self
                .exclude_modules
                .as_ref()
                .is_some_and(|t| t.matches(module))
    }
}

/// A PEFT adapter read into this crate's terms: the file's config and every module's adapter as
/// [`NativeAdapters`] (Burn layout, validated specs with method, shapes and scale), keyed by the
/// module names PEFT used.
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
        let cfg = super::read_file(&cfg_path)?;
        let st = super::read_file(&st_path)?;
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
        let tensors = st::parse(&st_name, safetensors_bytes)?;
        // Group tensors by module.
        let mut modules: BTreeMap<String, BTreeMap<&'static str, HostTensor>> = BTreeMap::new();
        for (name, view) in tensors.tensors() {
            let key = name.strip_prefix(PREFIX).unwrap_or(&name);
            if let Some((_, option, what)) = UNSUPPORTED_TENSORS
                .iter()
                .find(|(s, ..)| key.ends_with(&format!(".{s}")) || key.contains(&format!(".{s}.")))
            {
                return Err(AdapterError::Unsupported {
                    option: option.to_string(),
                    message: format!(
                        "{st_name}: tensor `{name}` is {what}, which is not supported"
                    ),
                });
            }
            let Some(suffix) = kind
                .tensor_names()
                .iter()
                .find(|s| key.ends_with(&format!(".{s}")))
            else {
                return Err(AdapterError::format(
                    &st_name,
                    format!(
                        "unexpected tensor `{name}`: not one of {}'s tensors {:?}",
                        kind.name(),
                        kind.tensor_names()
                    ),
                ));
            };
            let module = &key[..key.len() - suffix.len() - 1];
            if view.shape().len() != 2 {
                return Err(AdapterError::Unsupported {
                    option: "conv layers".into(),
                    message: format!(
                        "{st_name}: `{name}` has shape {:?}; only linear layers (2-D factors) \
                         are supported",
                        view.shape()
                    ),
                });
            }
            if view.shape().contains(&0) {
                return Err(AdapterError::format(
                    &st_name,
                    format!("`{name}` has an empty shape {:?}", view.shape()),
                ));
            }
            let t = HostTensor::from_view(&st_name, &name, &view)?;
            modules
                .entry(module.to_string())
                .or_default()
                .insert(suffix, t);
        }
        if modules.is_empty() {
            return Err(AdapterError::format(&st_name, "no adapter tensors"));
        }
        let mut specs = Vec::new();
        let mut factors = BTreeMap::new();
        for (module, tensors) in modules {
            if !config.targets(&module) {
                return Err(AdapterError::format(
                    &st_name,
                    format!(
                        "module `{module}` has factors but is not in target_modules {:?} (or is \
                         excluded)",
                        config.target_modules
                    ),
                ));
            }
            let mut layer = Layer {
                path: &st_name,
                module: &module,
                tensors,
            };
            let (spec, values) = match kind {
                PeftType::Lora => lora_import(&mut layer, &config)?,
                PeftType::Lokr => lokr_import(&mut layer, &config)?,
            };
            layer.finish()?;
            specs.push((module.clone(), spec));
            factors.insert(module, values);
        }
        let mut meta = CheckpointMeta::new(specs);
        meta.extra = Some(serde_json::json!({ "source": "peft", "peft_type": config.peft_type }));
        let adapters = NativeAdapters { meta, factors };
        adapters.validate(&st_name)?;
        Ok(Self { config, adapters })
    }
}

/// One module's tensors while they are mapped.
struct Layer<'a> {
    path: &'a str,
    module: &'a str,
    tensors: BTreeMap<&'static str, HostTensor>,
}

impl Layer<'_> {
    fn error(&self, what: String) -> AdapterError {
        AdapterError::format(self.path, format!("module `{}`: {what}", self.module))
    }

    fn take(&mut self, name: &str) -> Result<HostTensor, AdapterError> {
        self.tensors
            .remove(name)
            .ok_or_else(|| self.error(format!("lacks `{name}`")))
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A full factor `full`, or the product of `low_a @ low_b` (whose inner size must be `r`);
    /// `decomposed` says which PEFT builds for this module.
    fn factor(
        &mut self,
        full: &str,
        low: [&str; 2],
        r: usize,
        decomposed: bool,
    ) -> Result<Factor, AdapterError> {
        match (self.has(full), self.has(low[0]) || self.has(low[1])) {
            (true, true) => Err(self.error(format!("both {full} and {}/{}", low[0], low[1]))),
            (true, false) if decomposed => Err(self.error(format!(
                "has a full {full}, but PEFT builds {}/{} at r = {r} for this module",
                low[0], low[1]
            ))),
            (true, false) => Ok(Factor::Full(self.take(full)?)),
            (false, _) if !decomposed => Err(self.error(format!(
                "has {}/{}, but PEFT builds a full {full} at r = {r} for this module",
                low[0], low[1]
            ))),
            (false, _) => {
                let (a, b) = (self.take(low[0])?, self.take(low[1])?);
                if a.shape[1] != r || b.shape[0] != r {
                    return Err(self.error(format!(
                        "{} {:?} @ {} {:?} do not have the config's rank r = {r} (PEFT would \
                         refuse the file: size mismatch)",
                        low[0], a.shape, low[1], b.shape
                    )));
                }
                Ok(Factor::Low(a, b))
            }
        }
    }

    /// Fails if tensors are left over.
    fn finish(&self) -> Result<(), AdapterError> {
        match self.tensors.keys().next() {
            Some(k) => Err(self.error(format!("`{k}` does not belong here"))),
            None => Ok(()),
        }
    }
}

/// A PEFT factor: full, or `a @ b`.
enum Factor {
    Full(HostTensor),
    Low(HostTensor, HostTensor),
}

fn lora_import(
    layer: &mut Layer,
    config: &PeftFileConfig,
) -> Result<(AdapterSpec, Vec<HostTensor>), AdapterError> {
    let (r, alpha) = config.rank_alpha(layer.module);
    let a = layer.take("lora_A.weight")?;
    let b = layer.take("lora_B.weight")?;
    let (ra, d_in) = (a.shape[0], a.shape[1]);
    let (d_out, rb) = (b.shape[0], b.shape[1]);
    if ra != r || rb != r {
        return Err(layer.error(format!(
            "lora_A {:?} and lora_B {:?} do not have the config's rank r = {r}",
            a.shape, b.shape
        )));
    }
    let scale = if config.use_rslora {
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

fn lokr_import(
    layer: &mut Layer,
    config: &PeftFileConfig,
) -> Result<(AdapterSpec, Vec<HostTensor>), AdapterError> {
    let (r, alpha) = config.rank_alpha(layer.module);
    // Which factors PEFT decomposes depends on their shapes, which the full or decomposed
    // tensors give either way: w1 [out_l, in_m], w2 [out_k, in_n].
    let w1_shape = full_or_low_shape(layer, "lokr_w1", ["lokr_w1_a", "lokr_w1_b"])?;
    let w2_shape = full_or_low_shape(layer, "lokr_w2", ["lokr_w2_a", "lokr_w2_b"])?;
    let low1 = config.decompose_both && 2 * r < w1_shape[0].max(w1_shape[1]);
    let low2 = 2 * r < w2_shape[0].max(w2_shape[1]);
    let w1 = layer.factor("lokr_w1", ["lokr_w1_a", "lokr_w1_b"], r, low1)?;
    let w2 = layer.factor("lokr_w2", ["lokr_w2_a", "lokr_w2_b"], r, low2)?;
    let (d_in, d_out) = (w1_shape[1] * w2_shape[1], w1_shape[0] * w2_shape[0]);
    let f = config.decompose_factor;
    let (in_m, _) = peft_factorization(d_in, f);
    let (out_l, _) = peft_factorization(d_out, f);
    if [out_l, in_m] != w1_shape {
        return Err(layer.error(format!(
            "w1 is {w1_shape:?} but PEFT's factorization with decompose_factor {f} gives \
             [{out_l}, {in_m}] for a [{d_out}, {d_in}] weight"
        )));
    }
    // w1 = w1_a @ w1_b is multiplied out: this crate's `a` is one factor (ΔW is the same).
    let a = match w1 {
        Factor::Full(w1) => w1.transposed(),
        Factor::Low(w1a, w1b) => w1a.matmul(&w1b).transposed(),
    };
    let a_shape = [a.shape[0], a.shape[1]];
    let (factors, values, method) = match w2 {
        Factor::Full(w2) => {
            let b = w2.transposed();
            let shapes = vec![
                ("a".into(), a_shape),
                ("b".into(), [b.shape[0], b.shape[1]]),
            ];
            (shapes, vec![a, b], Method::KronA)
        }
        Factor::Low(w2a, w2b) => {
            let (b1, b2) = (w2b.transposed(), w2a.transposed());
            let shapes = vec![
                ("a".into(), a_shape),
                ("b1".into(), [b1.shape[0], b1.shape[1]]),
                ("b2".into(), [b2.shape[0], b2.shape[1]]),
            ];
            (shapes, vec![a, b1, b2], Method::KronLora)
        }
    };
    let spec = AdapterSpec {
        method,
        d_in,
        d_out,
        factors,
        scale: alpha / r as f64,
    };
    Ok((spec, values))
}

/// The shape of a factor stored full or as `a @ b` (checking that `a @ b` chains).
fn full_or_low_shape(
    layer: &Layer,
    full: &str,
    low: [&str; 2],
) -> Result<[usize; 2], AdapterError> {
    if let Some(t) = layer.tensors.get(full) {
        return Ok([t.shape[0], t.shape[1]]);
    }
    match (layer.tensors.get(low[0]), layer.tensors.get(low[1])) {
        (Some(a), Some(b)) if a.shape[1] == b.shape[0] => Ok([a.shape[0], b.shape[1]]),
        (Some(a), Some(b)) => Err(layer.error(format!(
            "{} {:?} @ {} {:?} do not chain",
            low[0], a.shape, low[1], b.shape
        ))),
        _ => Err(layer.error(format!("lacks {full} (or {} and {})", low[0], low[1]))),
    }
}

/// Which PEFT method and `decompose_factor` can express these adapters, or why none can.
fn export_plan(adapters: &NativeAdapters) -> Result<(PeftType, i64), AdapterError> {
    let methods: Vec<Method> = adapters.meta.layers.values().map(|s| s.method).collect();
    if methods.is_empty() {
        return Err(
            crate::ConfigError::invalid("export", "adapters", "no adapters to export").into(),
        );
    }
    if methods.iter().all(|m| *m == Method::Lora) {
        return Ok((PeftType::Lora, -1));
    }
    if methods.contains(&Method::Lora) {
        return Err(AdapterError::Unsupported {
            option: "mixed methods".into(),
            message: "LoRA and Kronecker adapters in one model cannot be one PEFT config; \
                      export them separately"
                .into(),
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
                "PEFT's LoKr derives its factor shapes from factorization(d, decompose_factor) \
                 with one factor for all layers, and no factor gives these shapes: {:?}. Build \
                 the adapters with KronAConfig::auto() (or a_shape [f, f] for one f) to export \
                 them",
                adapters
                    .meta
                    .layers
                    .iter()
                    .map(|(n, s)| format!("{n}: a {:?}", s.factors[0].1))
                    .collect::<Vec<_>>()
            ),
        })
}

/// One module's PEFT tensors and its rank for these adapters (Burn layout in, PyTorch out).
fn export_layer(spec: &AdapterSpec, f: &[HostTensor]) -> (Vec<(&'static str, HostTensor)>, usize) {
    match spec.method {
        Method::Lora => (
            vec![
                ("lora_A.weight", f[0].transposed()),
                ("lora_B.weight", f[1].transposed()),
            ],
            spec.factors[0].1[1],
        ),
        Method::KronA => {
            // PEFT keeps w2 full when r >= max(out_k, in_n) / 2.
            let b = spec.factors[1].1;
            (
                vec![
                    ("lokr_w1", f[0].transposed()),
                    ("lokr_w2", f[1].transposed()),
                ],
                b[0].max(b[1]),
            )
        }
        Method::KronLora => {
            let (b1, b2) = (&f[1], &f[2]);
            let rank = b1.shape[1];
            let (b_in, b_out) = (b1.shape[0], b2.shape[1]);
            let w2 = if 2 * rank < b_in.max(b_out) {
                vec![
                    ("lokr_w2_a", b2.transposed()),
                    ("lokr_w2_b", b1.transposed()),
                ]
            } else {
                vec![("lokr_w2", b1.matmul(b2).transposed())]
            };
            let mut tensors = vec![("lokr_w1", f[0].transposed())];
            tensors.extend(w2);
            (tensors, rank)
        }
    }
}

/// The two files of a PEFT folder for these adapters: `adapter_config.json` text and
/// `adapter_model.safetensors` bytes. LoRA adapters become LoRA; KronA and Kron-LoRA become
/// LoKr with `decompose_both = false`, full `lokr_w2` for KronA and `lokr_w2_a`/`lokr_w2_b` for
/// Kron-LoRA (or, at ranks where PEFT would build a full `w2` itself, the product `b1·b2`).
/// Per-layer ranks and alphas go to `rank_pattern` and `alpha_pattern` (keys escaped, so each
/// selects its module only), so that PEFT rebuilds exactly these factors with these scales.
pub fn peft_files(
    adapters: &NativeAdapters,
    base_model: Option<&str>,
) -> Result<(String, Vec<u8>), AdapterError> {
    adapters.validate("adapters")?;
    let (kind, factor) = export_plan(adapters)?;
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut entries = Vec::new();
    for (module, spec) in &adapters.meta.layers {
        let (tensors, r) = export_layer(spec, &adapters.factors[module]);
        for (name, t) in tensors {
            entries.push((
                format!("{PREFIX}{module}.{name}"),
                Dtype::F32,
                t.shape.clone(),
                t.f32_bytes(),
            ));
        }
        ranks.insert(module.clone(), r);
        alphas.insert(module.clone(), spec.scale * r as f64);
    }
    // The most common rank and alpha are the defaults, the rest go to the patterns.
    let r_default = mode(ranks.values().copied());
    let alpha_default = mode(alphas.values().map(|a| OrdF64(*a))).0;
    let pattern = |m: &String| regex::escape(m);
    let rank_pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, r)| **r != r_default)
        .map(|(m, r)| (pattern(m), (*r).into()))
        .collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = alphas
        .iter()
        .filter(|(_, a)| (**a - alpha_default).abs() > 1e-12 * a.abs().max(1.0))
        .map(|(m, a)| (pattern(m), (*a).into()))
        .collect();
    let targets: Vec<&String> = adapters.meta.layers.keys().collect();
    let mut config = serde_json::json!({
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "peft_type": kind.name(),
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
    let extra = match kind {
        PeftType::Lora => serde_json::json!({
            "lora_alpha": alpha_default, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
            "init_lora_weights": true,
        }),
        PeftType::Lokr => serde_json::json!({
            "alpha": alpha_default, "rank_dropout": 0.0, "module_dropout": 0.0,
            "use_effective_conv2d": false, "decompose_both": false,
            "decompose_factor": factor, "rank_dropout_scale": false, "init_weights": true,
        }),
    };
    if let (Some(obj), serde_json::Value::Object(extra)) = (config.as_object_mut(), extra) {
        obj.extend(extra);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = st::serialize("adapter_model.safetensors", &entries, meta)?;
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| AdapterError::format("adapter_config.json", e.to_string()))?;
    Ok((text, bytes))
}

/// An `f64` ordered by its total order, to count equal values.
#[derive(Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The most common value (the smallest among ties); callers pass at least one.
fn mode<T: Ord + Copy>(values: impl Iterator<Item = T>) -> T {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let max = counts.values().copied().max().unwrap_or(0);
    *counts
        .iter()
        .find(|(_, c)| **c == max)
        .expect("at least one value")
        .0
}

/// Writes adapters as a PEFT folder ([`peft_files`]; `adapter_model.safetensors` has metadata
/// `format: pt`), atomically: a failure leaves nothing. An existing `dir` is refused unless
/// `overwrite`.
pub fn write_peft_dir(
    dir: impl AsRef<Path>,
    adapters: &NativeAdapters,
    base_model: Option<&str>,
    overwrite: bool,
) -> Result<(), AdapterError> {
    let dir = dir.as_ref();
    st::refuse_existing(dir, overwrite)?;
    let (config, tensors) = peft_files(adapters, base_model)?;
    st::write_dir_atomic(
        dir,
        &[
            ("adapter_config.json", config.as_bytes()),
            ("adapter_model.safetensors", &tensors),
        ],
        overwrite,
    )
}
