//! Text generation with a KV cache: greedy, or sampled with temperature and nucleus (top-p)
//! filtering from a seeded generator (the same seed gives the same tokens on every backend, up
//! to the backend's float rounding), stopping at an end-of-sequence token.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::error::ConfigError;
use crate::model::llama::LlamaForCausalLM;
use crate::rng::SplitMix64;

crate::macros::config! {
    /// How to pick tokens.
    pub struct GenerateConfig(new) {
        required {}
        optional {
            /// Sampling temperature; without it decoding is greedy (the most likely token).
            temperature: f64,
        }
        defaults {
            /// Tokens to generate at most.
            max_new_tokens: usize = 64,
            /// Nucleus sampling: only the most likely tokens whose probabilities sum to `top_p`
            /// are drawn from (1: all).
            top_p: f64 = 1.0,
            /// The sampler's seed.
            seed: u64 = 0,
        }
    }
}

impl GenerateConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |f: &str, r: String| Err(ConfigError::invalid("generate", f, r));
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return bad(
                    "temperature",
                    format!("{t}: use a positive temperature (or none for greedy)"),
                );
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

/// The index of the largest value (the first of equal ones, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Draws a token from `logits` at `temperature`, restricted to the smallest set of most likely
/// tokens whose probability reaches `top_p`.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i, ((*l as f64 - max) / temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = n + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() * mass;
    for (i, p) in probs {
        if u < *p {
            return *i;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0)
}

/// Generates up to `config.max_new_tokens` tokens after `prompt`, stopping after any token of
/// `eos` (which is returned too); `on_token` hears each token as it is chosen. Returns the new
/// tokens.
pub fn generate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    config: &GenerateConfig,
    eos: &[u32],
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, ConfigError> {
    config.validate()?;
    if prompt.is_empty() {
        return Err(ConfigError::invalid(
            "generate",
            "prompt",
            "the prompt has no tokens",
        ));
    }
    let max_pos = model.config().max_position_embeddings;
    if prompt.len() + config.max_new_tokens > max_pos {
        return Err(ConfigError::invalid(
            "generate",
            "max_new_tokens",
            format!(
                "{} prompt tokens + {} new tokens exceed the model's context of {max_pos}",
                prompt.len(),
                config.max_new_tokens
            ),
        ));
    }
    let vocab = model.config().vocab_size;
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ConfigError::invalid(
            "generate",
            "prompt",
            format!("token {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let ids = |v: &[u32]| {
        let data: Vec<i64> = v.iter().map(|&t| t as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, v.len()]), device)
    };
    let mut rng = SplitMix64::new(config.seed);
    let mut cache = model.new_cache();
    let mut logits = model.forward_cached(ids(prompt), &mut cache);
    let mut out = Vec::with_capacity(config.max_new_tokens);
    for _ in 0..config.max_new_tokens {
        let row: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 logits");
        let next = match config.temperature {
            None => argmax(&row),
            Some(t) => sample(&row, t, config.top_p, &mut rng),
        } as u32;
        out.push(next);
        on_token(next);
        if eos.contains(&next) {
            break;
        }
        logits = model.forward_cached(ids(&[next]), &mut cache);
    }
    Ok(out)
}
