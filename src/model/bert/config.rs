//! The encoder's configuration (Hugging Face `config.json`).

use serde::{Deserialize, Serialize};

use crate::error::{AdapterError, ConfigError};

/// A BERT configuration, read from a Hugging Face `config.json` (unknown fields ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `d`.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads (`d` must divide by it).
    pub num_attention_heads: usize,
    /// FFN size.
    pub intermediate_size: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states.
    #[serde(default = "dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "dropout")]
    pub attention_probs_dropout_prob: f64,
    /// The FFN activation; only `gelu` (exact, erf-based) is supported.
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn dropout() -> f64 {
    0.1
}
fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    /// all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522.
    pub fn minilm_l6() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            hidden_act: "gelu".into(),
        }
    }

    /// A tiny random configuration for tests.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 96,
            max_position_embeddings: 64,
            ..Self::minilm_l6()
        }
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> Result<Self, AdapterError> {
        let path = path.as_ref();
        let text = crate::store::read_text(path)?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| {
            AdapterError::format(
                path.display().to_string(),
                format!("not a BERT config.json: {e}"),
            )
        })?;
        cfg.validate().map_err(|source| AdapterError::InvalidSpec {
            path: path.display().to_string(),
            source,
        })?;
        Ok(cfg)
    }

    /// Checks the sizes fit together and every value is one the encoder can run with: a
    /// `config.json` is user input, and a zero size or a dropout probability outside `[0, 1]`
    /// would otherwise fail deep inside the model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |field: &str, reason: String| Err(ConfigError::invalid("BertConfig", field, reason));
        ConfigError::nonzero(
            "BertConfig",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
                ("type_vocab_size", self.type_vocab_size),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        for (field, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(field, format!("{p} is not a probability in [0, 1]"));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad(
                "layer_norm_eps",
                format!("{} is not a positive number", self.layer_norm_eps),
            );
        }
        if self.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!("{:?} is not supported (only \"gelu\")", self.hidden_act),
            );
        }
        Ok(())
    }

    /// The frozen encoder's parameters this configuration describes (the three embeddings and
    /// their norm, every layer's projections, biases and norms); `None` when the count overflows.
    pub fn num_params(&self) -> Option<usize> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let embeddings = self
            .vocab_size
            .checked_add(self.max_position_embeddings)?
            .checked_add(self.type_vocab_size)?
            .checked_add(2)?
            .checked_mul(d)?;
        // q, k, v and the attention output (d² + d each), the FFN's two projections, two norms.
        let attention = d.checked_mul(d)?.checked_add(d)?.checked_mul(4)?;
        let ffn = d
            .checked_mul(f)?
            .checked_mul(2)?
            .checked_add(f)?
            .checked_add(d)?;
        let layer = attention.checked_add(ffn)?.checked_add(d.checked_mul(4)?)?;
        layer
            .checked_mul(self.num_hidden_layers)?
            .checked_add(embeddings)
    }

    /// Size of one attention head.
    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
