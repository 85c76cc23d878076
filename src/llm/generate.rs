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
    if prompt.len().saturating_add(config.max_new_tokens) > max_pos {
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

/// Generates for several prompts at once, row `i` with `configs[i]` and the adapter `routing`
/// gives it (see [`crate::multi`]): prompts are left-padded to one length (each row's positions
/// start at its first real token), the KV cache is shared by the batch, and a row that reached
/// an end-of-sequence token or its `max_new_tokens` stops contributing. Each row's tokens equal
/// [`generate`] on that row alone with its adapter (greedy, or sampled from its own seed).
pub fn generate_batch<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    configs: &[GenerateConfig],
    eos: &[u32],
    routing: Option<&crate::multi::Routing<B>>,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>, ConfigError> {
    if prompts.len() != configs.len() || prompts.is_empty() {
        return Err(ConfigError::invalid(
            "generate",
            "batch",
            format!("{} prompts and {} configs", prompts.len(), configs.len()),
        ));
    }
    let vocab = model.config().vocab_size;
    let max_pos = model.config().max_position_embeddings;
    for (p, c) in prompts.iter().zip(configs) {
        c.validate()?;
        if p.is_empty() {
            return Err(ConfigError::invalid(
                "generate",
                "prompt",
                "a prompt has no tokens",
            ));
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ConfigError::invalid(
                "generate",
                "prompt",
                format!("token {t} is outside the vocabulary of {vocab}"),
            ));
        }
        if p.len().saturating_add(c.max_new_tokens) > max_pos {
            return Err(ConfigError::invalid(
                "generate",
                "max_new_tokens",
                format!(
                    "{} prompt tokens + {} new tokens exceed the model's context of {max_pos}",
                    p.len(),
                    c.max_new_tokens
                ),
            ));
        }
    }
    let b = prompts.len();
    let l = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let pads: Vec<usize> = prompts.iter().map(|p| l - p.len()).collect();
    let mut ids = vec![0i64; b * l];
    let mut keys: Vec<Vec<i64>> = Vec::with_capacity(b);
    for (r, p) in prompts.iter().enumerate() {
        for (c, &t) in p.iter().enumerate() {
            ids[r * l + pads[r] + c] = t as i64;
        }
        keys.push((0..l).map(|c| i64::from(c >= pads[r])).collect());
    }
    let mask = |keys: &[Vec<i64>]| {
        let n = keys[0].len();
        Tensor::<B, 2, Int>::from_data(TensorData::new(keys.concat(), [b, n]), device)
    };
    let mut cache = model.new_cache();
    let h = model.model.forward_routed(
        Tensor::from_data(TensorData::new(ids, [b, l]), device),
        Some(mask(&keys)),
        Some(&mut cache),
        routing,
        Some(&pads),
    );
    let d = h.dims()[2];
    let mut logits = model.logits(h.slice([0..b, l - 1..l, 0..d]).reshape([b, d]));
    let mut rngs: Vec<SplitMix64> = configs.iter().map(|c| SplitMix64::new(c.seed)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let longest = configs.iter().map(|c| c.max_new_tokens).max().unwrap_or(0);
    for step in 0..longest {
        let rows: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 logits");
        let mut next = vec![0i64; b];
        for r in 0..b {
            if done[r] || step >= configs[r].max_new_tokens {
                done[r] = true;
                continue;
            }
            let row = &rows[r * vocab..(r + 1) * vocab];
            let t = match configs[r].temperature {
                None => argmax(row),
                Some(temp) => sample(row, temp, configs[r].top_p, &mut rngs[r]),
            } as u32;
            out[r].push(t);
            next[r] = t as i64;
            if eos.contains(&t) || out[r].len() >= configs[r].max_new_tokens {
                done[r] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        for k in keys.iter_mut() {
            k.push(1);
        }
        let h = model.model.forward_routed(
            Tensor::from_data(TensorData::new(next, [b, 1]), device),
            Some(mask(&keys)),
            Some(&mut cache),
            routing,
            Some(&pads),
        );
        logits = model.logits(h.reshape([b, d]));
    }
    Ok(out)
}
