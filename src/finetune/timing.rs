//! Timing a training step and a forward pass of the classifier, the same way for the
//! benchmarks, the method comparison and the side-by-side runner against PyTorch.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::LinearConfig;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use crate::error::AdapterError;
use crate::linear::AdaptedLinear;
use crate::model::{BertClassifier, BertConfig, TensorSource};
use crate::params::count_params;
use crate::place::PlacementConfig;
use crate::rng::SplitMix64;
use crate::shards;
use crate::AdapterConfig;

/// Median milliseconds of `f` after `warmup` calls, over enough calls to fill about
/// `budget_s` seconds (at least 3, at most 200).
pub fn median_ms<F: FnMut()>(mut f: F, warmup: usize, budget_s: f64) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64();
    let n = ((budget_s / once.max(1e-6)) as usize).clamp(3, 200);
    let times: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&times)
}

/// The median of `values`: the upper of the middle two for an even count (0 for none), the
/// one rule behind every median figure the crate reports (step times, benchmark tables).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// A batch of random token ids (no padding): `ids`, `mask`, both `[batch, seq]`.
pub fn random_batch<B: Backend>(
    seed: u64,
    batch: usize,
    seq: usize,
    vocab: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let mut rng = SplitMix64::new(seed);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|_| 1000.min(vocab - 1) as i64 + rng.below(vocab.saturating_sub(1000).max(1)) as i64)
        .collect();
    (
        Tensor::from_data(TensorData::new(ids, [batch, seq]), device),
        Tensor::from_data(
            TensorData::new(vec![1i64; batch * seq], [batch, seq]),
            device,
        ),
    )
}

/// Median milliseconds of one training step (forward, backward, AdamW), the batch computed in
/// `parts` parts at once ([`crate::shards`]; 1: whole), of a classifier with
/// `placement`'s adapters and mode on an encoder of `bert`'s size (random weights: the cost does not
/// depend on their values), on a `[batch, seq]` batch; and its trainable parameters.
pub fn train_step_ms<B: AutodiffBackend>(
    bert: &BertConfig,
    placement: &PlacementConfig,
    batch: usize,
    seq: usize,
    parts: usize,
    budget_s: f64,
    device: &B::Device,
) -> Result<(f64, usize), AdapterError> {
    if seq > bert.max_position_embeddings {
        return Err(crate::ConfigError::invalid(
            "timing",
            "seq",
            format!(
                "{seq} tokens a row: the encoder has {} positions",
                bert.max_position_embeddings
            ),
        )
        .into());
    }
    let mut model =
        BertClassifier::<B>::new(&mut TensorSource::random(2), bert, placement, 2, device)?;
    model.encoder = placement.train.apply(model.encoder);
    let trainable = count_params(&model).trainable;
    let (ids, mask) = random_batch::<B>(1, batch, seq, bert.vocab_size, device);
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            (0..batch as i64).map(|i| i % 2).collect::<Vec<_>>(),
            [batch],
        ),
        device,
    );
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optim = crate::optim::adamw(&AdamWConfig::new());
    let mut holder = Some(model);
    let mut failed = None;
    let ms = median_ms(
        || {
            let m = holder.take().expect("the model is put back every step");
            let result = shards::gradients(&m, batch, parts, 0, |m, p| {
                let r = p.range.clone();
                let (ids, mask) = (ids.clone().slice(r.clone()), mask.clone().slice(r.clone()));
                let loss = loss_fn.forward(m.forward(ids, mask), labels.clone().slice(r));
                let _ = loss.clone().into_data();
                (loss.mul_scalar(p.share), ())
            });
            holder = Some(match result {
                Ok((grads, _)) => optim.step(1e-5, m, grads),
                Err(e) => {
                    failed = Some(e);
                    m
                }
            });
        },
        2,
        budget_s,
    );
    match failed {
        Some(e) => Err(e),
        None => Ok((ms, trainable)),
    }
}

/// Median milliseconds of one training step of a single frozen `d_in × d_out` linear layer
/// (no bias) with the adapter `adapter` describes, on `tokens` rows of random input: forward,
/// a mean-squared loss, backward, AdamW on the trainable parameters, the rows computed in
/// `parts` parts at once ([`crate::shards`]; 1: whole); and their count. With
/// `adapter` = `None` the layer itself is trained (full fine-tuning of the layer). For the
/// cost of an adapter at an LLM's widths without the rest of the model.
pub fn layer_step_ms<B: AutodiffBackend>(
    d_in: usize,
    d_out: usize,
    adapter: Option<&AdapterConfig>,
    tokens: usize,
    parts: usize,
    budget_s: f64,
    device: &B::Device,
) -> Result<(f64, usize), AdapterError> {
    let linear = LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .init::<B>(device);
    let layer = match adapter {
        Some(config) => AdaptedLinear::new(linear, config, device)?,
        None => AdaptedLinear {
            base: linear,
            adapter: None,
        },
    };
    let trainable = count_params(&layer).trainable;
    let x = Tensor::<B, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), device);
    let mut optim = crate::optim::adamw(&AdamWConfig::new());
    let elements = (tokens * d_out) as f64;
    let mut holder = Some(layer);
    let mut failed = None;
    let ms = median_ms(
        || {
            let l = holder.take().expect("the layer is put back every step");
            let result = shards::gradients(&l, tokens, parts, 0, |l, p| {
                let y = l.forward(x.clone().slice(p.range.clone()));
                let loss = y.powi_scalar(2).sum().div_scalar(elements);
                let _ = loss.clone().into_data();
                (loss, ())
            });
            holder = Some(match result {
                Ok((grads, _)) => optim.step(1e-5, l, grads),
                Err(e) => {
                    failed = Some(e);
                    l
                }
            });
        },
        2,
        budget_s,
    );
    match failed {
        Some(e) => Err(e),
        None => Ok((ms, trainable)),
    }
}

/// This process's resident and peak resident memory in bytes (Linux's `VmRSS` and `VmHWM`;
/// `None` where `/proc/self/status` does not exist). For peak-memory figures, measure one setup
/// per process.
pub fn memory_bytes() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((get("VmRSS:")?, get("VmHWM:")?))
}

/// Median milliseconds of the classifier's forward pass on a `[batch, seq]` batch, computed
/// in `parts` parts at once ([`shards::forward`]; 1: one forward pass on this thread).
///
/// Errors: `parts = 0`, or a part failing ([`shards::forward`]).
pub fn inference_ms<B: Backend>(
    model: &BertClassifier<B>,
    vocab: usize,
    batch: usize,
    seq: usize,
    parts: usize,
    budget_s: f64,
    device: &B::Device,
) -> Result<f64, AdapterError> {
    let (ids, mask) = random_batch::<B>(3, batch, seq, vocab, device);
    let run = || {
        shards::forward::<B, _, _>(device, batch, parts, |p| {
            let rows = p.range.clone();
            let ids = ids.clone().slice(rows.clone());
            model.forward(ids, mask.clone().slice(rows)).into_data()
        })
    };
    // A failure shows on the first call; the timed ones then run the same way.
    run()?;
    Ok(median_ms(
        || {
            let _ = run();
        },
        10,
        budget_s,
    ))
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_upper_middle_of_unsorted_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
