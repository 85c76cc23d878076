//! A Llama-family decoder's configuration: from a Hugging Face `config.json` (Llama, Mistral,
//! Qwen2, SmolLM, TinyLlama; the transformers 4 and 5 spellings of the RoPE settings) or from a
//! GGUF file's `llama.*` metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AdapterError, ConfigError};
use crate::store::gguf::GgufFile;

/// How RoPE's frequencies are scaled for long contexts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// No scaling (`rope_type: default`).
    #[default]
    None,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (`llama3`).
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled by `factor`.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// A Llama-family decoder's sizes and settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, ...
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// SwiGLU inner size.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// The LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// A bias on o_proj.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any).
    pub eos_token_ids: Vec<u32>,
    /// Attention scores computed at once, at most (values; default
    /// [`LlamaConfig::DEFAULT_ATTENTION_SCORES_AT_ONCE`], 256 MB in `f32`): where a batch's
    /// scores `[b·kv_heads, g·s, past + s]` are more, the attention goes a block of query rows
    /// at a time — the same results in less memory (a 2,048-token Mistral-7B layer's training
    /// step 2,683 → 2,289 MB peak; training's attention, whole or in blocks, keeps no
    /// probabilities either since stop 47: 1,808–1,821 MB). An execution setting, not read from
    /// a model's files (set it on a loaded model's `model.config`); must be positive.
    #[serde(default = "default_attention_scores_at_once")]
    pub attention_scores_at_once: usize,
}

fn default_attention_scores_at_once() -> usize {
    LlamaConfig::DEFAULT_ATTENTION_SCORES_AT_ONCE
}

impl LlamaConfig {
    /// [`LlamaConfig::attention_scores_at_once`]'s default: 2²⁶ values.
    pub const DEFAULT_ATTENTION_SCORES_AT_ONCE: usize = 1 << 26;

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |field: &str, reason: String| Err(ConfigError::invalid("LlamaConfig", field, reason));
        ConfigError::nonzero(
            "LlamaConfig",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads),
                ("head_dim", self.head_dim),
                ("max_position_embeddings", self.max_position_embeddings),
                ("attention_scores_at_once", self.attention_scores_at_once),
            ],
        )?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads do not divide into {} key/value groups",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE rotates pairs", self.head_dim),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_norm_eps/rope_theta", "must be positive".into());
        }
        let specials = [
            ("bos_token_id", self.bos_token_id.as_slice()),
            ("eos_token_id", &self.eos_token_ids),
        ];
        for (field, ids) in specials {
            if let Some(t) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
                return bad(
                    field,
                    format!("token {t} is outside the vocabulary of {}", self.vocab_size),
                );
            }
        }
        Ok(())
    }

    /// The frozen model's parameters this configuration describes (embedding, every layer's
    /// projections, norms and biases, the final norm and an untied head); `None` when the count
    /// overflows.
    pub fn num_params(&self) -> Option<usize> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let attn = [mul(d, q)?, mul(d, kv)?, mul(d, kv)?, mul(q, d)?];
        let mlp = [mul(d, f)?, mul(d, f)?, mul(f, d)?];
        let mut layer = attn
            .iter()
            .chain(&mlp)
            .try_fold(0usize, |a, &b| a.checked_add(b))?;
        let biases = [
            (self.qkv_bias, q + 2 * kv),
            (self.o_bias, d),
            (self.mlp_bias, 2 * f + d),
        ];
        for (on, n) in biases {
            if on {
                layer = layer.checked_add(n)?;
            }
        }
        layer = layer.checked_add(mul(2, d)?)?; // the two RMSNorms
        let embed = mul(self.vocab_size, d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        mul(layer, self.num_hidden_layers)?
            .checked_add(embed)?
            .checked_add(head)?
            .checked_add(d)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = crate::store::read_text(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| AdapterError::format(&shown, format!("not a config.json: {e}")))?;
        Self::from_hf(&shown, &v)
    }

    /// From a parsed Hugging Face config; `path` names it in errors.
    pub fn from_hf(path: &str, v: &Value) -> Result<Self, AdapterError> {
        let err = |m: String| AdapterError::format(path, m);
        let usize_of = |k: &str| -> Result<Option<usize>, AdapterError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| err(format!("`{k}` is {x}, not a non-negative integer"))),
            }
        };
        let need = |k: &str| usize_of(k)?.ok_or_else(|| err(format!("no `{k}`")));
        let f64_of = |k: &str, d: f64| v.get(k).and_then(Value::as_f64).unwrap_or(d);
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        const KNOWN: &[&str] = &["llama", "mistral", "qwen2", "smollm", "smollm2"];
        if !KNOWN.contains(&model_type.as_str()) {
            return Err(AdapterError::Unsupported {
                option: "model_type".into(),
                message: format!(
                    "{path}: model_type {model_type:?}; this decoder covers {KNOWN:?} (Llama-family \
                     architectures)"
                ),
            });
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(AdapterError::Unsupported {
                    option: "hidden_act".into(),
                    message: format!("{path}: hidden_act {act:?}; only \"silu\" (SwiGLU)"),
                });
            }
        }
        let heads = need("num_attention_heads")?;
        let hidden = need("hidden_size")?;
        // transformers 5 moves the RoPE settings into `rope_parameters`; 4 has `rope_theta` and
        // `rope_scaling` at the top level.
        let rope = v
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or_else(|| f64_of("rope_theta", 10000.0));
        let rope_scaling = match rope {
            Some(r) => rope_scaling(path, r, usize_of("max_position_embeddings")?)?,
            None => RopeScaling::None,
        };
        // An id beyond u32 saturates (and `validate` then names it as outside the vocabulary)
        // rather than wrapping to a valid-looking token.
        let id = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
        let ids = |k: &str| -> Vec<u32> {
            match v.get(k) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![id(x)]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(id).collect(),
                _ => Vec::new(),
            }
        };
        let qwen2 = model_type == "qwen2";
        let cfg = Self {
            vocab_size: need("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: usize_of("num_key_value_heads")?.unwrap_or(heads),
            head_dim: usize_of("head_dim")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            rms_norm_eps: f64_of("rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_of("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: qwen2
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            o_bias: !qwen2
                && v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
            model_type,
            attention_scores_at_once: Self::DEFAULT_ATTENTION_SCORES_AT_ONCE,
        };
        cfg.validate().map_err(|source| AdapterError::InvalidSpec {
            path: path.to_string(),
            source,
        })?;
        Ok(cfg)
    }

    /// From a GGUF file's `llama.*` (or `<arch>.*`) metadata and its tokenizer's special ids.
    pub fn from_gguf(file: &GgufFile, path: &str) -> Result<Self, AdapterError> {
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| AdapterError::format(path, "no general.architecture"))?;
        if arch != "llama" {
            return Err(AdapterError::Unsupported {
                option: "general.architecture".into(),
                message: format!(
                    "{path}: architecture {arch:?}; this decoder reads Llama-architecture GGUF \
                     files (SmolLM/SmolLM2, TinyLlama, Llama 2/3, Mistral are all \"llama\")"
                ),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<Option<usize>, AdapterError> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                    AdapterError::format(path, format!("`{}` is {v:?}, not an integer", key(k)))
                }),
            }
        };
        let need =
            |k: &str| int(k)?.ok_or_else(|| AdapterError::format(path, format!("no `{}`", key(k))));
        let float = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64());
        let tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let heads = need("attention.head_count")?;
        let hidden = need("embedding_length")?;
        // Saturated beyond u32, so that `validate` names it (as `from_hf`'s ids).
        let special = |k: &str| {
            file.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => {
                let factor = float("rope.scaling.factor").unwrap_or(1.0);
                if factor > 0.0 && factor != 1.0 {
                    RopeScaling::Linear { factor }
                } else {
                    RopeScaling::None
                }
            }
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(AdapterError::Unsupported {
                    option: "rope.scaling.type".into(),
                    message: format!("{path}: RoPE scaling {other:?}; none and linear are read"),
                })
            }
        };
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(AdapterError::Unsupported {
                option: "rope_freqs".into(),
                message: format!(
                    "{path}: Llama 3.1-style RoPE frequencies (rope_freqs.weight) are read from \
                     Hugging Face folders only"
                ),
            });
        }
        let head_dim =
            int("attention.key_length")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let cfg = Self {
            model_type: "llama".into(),
            vocab_size: int("vocab_size")?.or(tokens).ok_or_else(|| {
                AdapterError::format(path, "no vocab_size and no tokenizer.ggml.tokens")
            })?,
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: int("context_length")?.unwrap_or(2048),
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            qkv_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            o_bias: file.tensor("blk.0.attn_output.bias").is_some(),
            mlp_bias: file.tensor("blk.0.ffn_up.bias").is_some(),
            bos_token_id: special("bos_token_id"),
            eos_token_ids: special("eos_token_id").into_iter().collect(),
            attention_scores_at_once: Self::DEFAULT_ATTENTION_SCORES_AT_ONCE,
        };
        cfg.validate().map_err(|source| AdapterError::InvalidSpec {
            path: path.to_string(),
            source,
        })?;
        Ok(cfg)
    }

    /// Mistral-7B-v0.1's configuration (a Llama-architecture decoder; for sizing and timing
    /// without its weights).
    pub fn mistral_7b() -> Self {
        Self {
            model_type: "mistral".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            attention_scores_at_once: Self::DEFAULT_ATTENTION_SCORES_AT_ONCE,
        }
    }

    /// SmolLM2-135M's configuration.
    pub fn smollm2_135m() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            ..Self::mistral_7b()
        }
    }

    /// A tiny random configuration for tests (GQA: 4 query heads over 2 key/value heads).
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            attention_scores_at_once: Self::DEFAULT_ATTENTION_SCORES_AT_ONCE,
        }
    }

    /// The inverse frequencies of RoPE's rotation pairs (`head_dim / 2` of them), scaled.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match self.rope_scaling {
            RopeScaling::None | RopeScaling::Linear { .. } => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The factor positions are divided by (linear scaling), else 1.
    pub fn position_scale(&self) -> f64 {
        match self.rope_scaling {
            RopeScaling::Linear { factor } => 1.0 / factor,
            _ => 1.0,
        }
    }
}

/// RoPE scaling from a Hugging Face `rope_scaling` / `rope_parameters` object.
fn rope_scaling(
    path: &str,
    r: &Value,
    max_pos: Option<usize>,
) -> Result<RopeScaling, AdapterError> {
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| r.get(k).and_then(Value::as_f64);
    let need = |k: &str| {
        num(k).ok_or_else(|| {
            AdapterError::format(path, format!("rope scaling {kind:?} without `{k}`"))
        })
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")
                .or(max_pos.map(|m| m as f64))
                .ok_or_else(|| {
                    AdapterError::format(
                        path,
                        "llama3 rope scaling without original_max_position_embeddings",
                    )
                })?,
        },
        other => {
            return Err(AdapterError::Unsupported {
                option: "rope_scaling".into(),
                message: format!(
                    "{path}: rope_type {other:?}; default, linear and llama3 are supported"
                ),
            })
        }
    })
}
