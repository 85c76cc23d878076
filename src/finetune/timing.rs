//! Timing a training step and a forward pass of the classifier, the same way for the
//! benchmarks, the method comparison and the side-by-side runner against PyTorch.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::LinearConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
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

/// One method's training step, built once and run again and again: by [`train_step`] (the
/// MiniLM-sized classifier) or [`layer_step`] (one frozen layer), for [`median_ms`] alone or
/// [`interleaved_ms`] beside others.
pub struct Step<'a> {
    run: Box<dyn FnMut() -> Result<(), AdapterError> + 'a>,
    /// Trainable parameters of the model the step trains.
    pub trainable: usize,
}

impl<'a> Step<'a> {
    /// A step from a closure doing one whole step (forward, backward, optimizer).
    pub fn new(trainable: usize, run: impl FnMut() -> Result<(), AdapterError> + 'a) -> Self {
        Self {
            run: Box::new(run),
            trainable,
        }
    }

    /// Runs one step.
    ///
    /// Errors: whatever the step's forward or backward returns (e.g. a part failing in
    /// [`crate::shards::gradients`]).
    pub fn run(&mut self) -> Result<(), AdapterError> {
        (self.run)()
    }
}

/// Milliseconds of every step of `steps`, interleaved: `warmup` rounds untimed, then rounds in
/// which each step runs once, until about `budget_s` seconds have passed (at least 3 rounds, at
/// most 200). The order within a round rotates by one each round, so that no step always
/// follows the same other. Returns, per step in `steps`' order, its time in each timed round.
///
/// For ratios between methods on a machine whose speed drifts (a shared host): a round's times
/// are taken within the same second or so, and the median of the rounds' own ratios
/// ([`round_ratios`]) cancels what a method-after-method run pays for a slow minute.
///
/// Errors: the first step that fails, at the round it fails in.
pub fn interleaved_ms(
    steps: &mut [Step<'_>],
    warmup: usize,
    budget_s: f64,
) -> Result<Vec<Vec<f64>>, AdapterError> {
    let mut times = vec![Vec::new(); steps.len()];
    if steps.is_empty() {
        return Ok(times);
    }
    let mut timed_s = 0.0;
    for round in 0.. {
        let timed = round >= warmup;
        if timed {
            let done = times[0].len();
            if done >= 200 || (done >= 3 && timed_s >= budget_s) {
                break;
            }
        }
        let round_start = Instant::now();
        for k in 0..steps.len() {
            let i = (k + round) % steps.len();
            let t = Instant::now();
            steps[i].run()?;
            if timed {
                times[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        if timed {
            timed_s += round_start.elapsed().as_secs_f64();
        }
    }
    Ok(times)
}

/// Round by round, `times[i][r] / times[base][r]` for every `i` (`times` as
/// [`interleaved_ms`] returns them): each method's time over the `base` method's in the same
/// round. The median of one method's row is its ratio to `base`, with the rounds paired.
/// Empty when `base` is out of range; a row as long as the shorter of the two.
pub fn round_ratios(times: &[Vec<f64>], base: usize) -> Vec<Vec<f64>> {
    let Some(base_row) = times.get(base) else {
        return Vec::new();
    };
    times
        .iter()
        .map(|row| row.iter().zip(base_row).map(|(t, b)| t / b).collect())
        .collect()
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
/// [`train_step`] builds the step, for timing it beside others ([`interleaved_ms`]).
pub fn train_step_ms<B: AutodiffBackend>(
    bert: &BertConfig,
    placement: &PlacementConfig,
    batch: usize,
    seq: usize,
    parts: usize,
    budget_s: f64,
    device: &B::Device,
) -> Result<(f64, usize), AdapterError> {
    step_ms(
        train_step::<B>(bert, placement, batch, seq, parts, device)?,
        budget_s,
    )
}

/// [`median_ms`] of a built step (2 warm-up steps) for about `budget_s` seconds, and its
/// trainable parameters: [`train_step_ms`] and [`layer_step_ms`] of a step built by
/// [`train_step`] or [`layer_step`].
///
/// Errors: the first error of the step, which is not run again after it.
pub fn step_ms(mut step: Step<'_>, budget_s: f64) -> Result<(f64, usize), AdapterError> {
    let mut failed = None;
    let ms = median_ms(
        || {
            if failed.is_none() {
                if let Err(e) = step.run() {
                    failed = Some(e);
                }
            }
        },
        2,
        budget_s,
    );
    match failed {
        Some(e) => Err(e),
        None => Ok((ms, step.trainable)),
    }
}

/// The training step [`train_step_ms`] times, built: the classifier, its batch and its
/// optimizer held by the step.
///
/// Errors: `seq` beyond the encoder's positions; a placement that does not fit the encoder.
pub fn train_step<B: AutodiffBackend>(
    bert: &BertConfig,
    placement: &PlacementConfig,
    batch: usize,
    seq: usize,
    parts: usize,
    device: &B::Device,
) -> Result<Step<'static>, AdapterError> {
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
    Ok(Step::new(trainable, move || {
        let m = holder.take().expect("the model is put back every step");
        let result = shards::gradients(&m, batch, parts, 0, |m, p| {
            let r = p.range.clone();
            let (ids, mask) = (ids.clone().slice(r.clone()), mask.clone().slice(r.clone()));
            let loss = loss_fn.forward(m.forward(ids, mask), labels.clone().slice(r));
            let _ = loss.clone().into_data();
            (loss.mul_scalar(p.share), ())
        });
        let (m, done) = update(&mut optim, m, result);
        holder = Some(m);
        done
    }))
}

/// Median milliseconds of one training step of a single frozen `d_in × d_out` linear layer
/// (no bias) with the adapter `adapter` describes, on `tokens` rows of random input: forward,
/// a mean-squared loss, backward, AdamW on the trainable parameters, the rows computed in
/// `parts` parts at once ([`crate::shards`]; 1: whole); and their count. With
/// `adapter` = `None` the layer itself is trained (full fine-tuning of the layer). For the
/// cost of an adapter at an LLM's widths without the rest of the model. [`layer_step`] builds
/// the step, for timing it beside others ([`interleaved_ms`]).
pub fn layer_step_ms<B: AutodiffBackend>(
    d_in: usize,
    d_out: usize,
    adapter: Option<&AdapterConfig>,
    tokens: usize,
    parts: usize,
    budget_s: f64,
    device: &B::Device,
) -> Result<(f64, usize), AdapterError> {
    step_ms(
        layer_step::<B>(d_in, d_out, adapter, tokens, parts, device)?,
        budget_s,
    )
}

/// The training step [`layer_step_ms`] times, built: the layer, its input and its optimizer
/// held by the step.
///
/// Errors: an adapter configuration that does not fit a `d_in × d_out` layer.
pub fn layer_step<B: AutodiffBackend>(
    d_in: usize,
    d_out: usize,
    adapter: Option<&AdapterConfig>,
    tokens: usize,
    parts: usize,
    device: &B::Device,
) -> Result<Step<'static>, AdapterError> {
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
    Ok(Step::new(trainable, move || {
        let l = holder.take().expect("the layer is put back every step");
        let result = shards::gradients(&l, tokens, parts, 0, |l, p| {
            let y = l.forward(x.clone().slice(p.range.clone()));
            let loss = y.powi_scalar(2).sum().div_scalar(elements);
            let _ = loss.clone().into_data();
            (loss, ())
        });
        let (l, done) = update(&mut optim, l, result);
        holder = Some(l);
        done
    }))
}

/// The end of a built step: the optimizer's update where the gradients came, the model back
/// either way, with the part's error if one failed.
fn update<B: AutodiffBackend, M: AutodiffModule<B>, R>(
    optim: &mut impl Optimizer<M, B>,
    model: M,
    result: Result<(GradientsParams, R), AdapterError>,
) -> (M, Result<(), AdapterError>) {
    match result {
        Ok((grads, _)) => (optim.step(1e-5, model, grads), Ok(())),
        Err(e) => (model, Err(e)),
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
    use super::{interleaved_ms, median, round_ratios, Step};
    use crate::error::AdapterError;
    use std::cell::RefCell;

    #[test]
    fn interleaved_steps_rotate_and_only_timed_rounds_count() {
        let order = RefCell::new(Vec::new());
        let mut steps: Vec<Step<'_>> = (0..3)
            .map(|i| {
                let order = &order;
                Step::new(i, move || {
                    order.borrow_mut().push(i);
                    Ok(())
                })
            })
            .collect();
        // A budget of 0 s: the fewest timed rounds (3), after 2 warm-up rounds.
        let times = interleaved_ms(&mut steps, 2, 0.0).unwrap();
        assert_eq!(times.len(), 3);
        assert!(times.iter().all(|t| t.len() == 3), "{times:?}");
        assert!(times.iter().flatten().all(|&ms| ms >= 0.0));
        // Round r starts at step r mod 3 and runs each step once.
        let want: Vec<usize> = (0..5)
            .flat_map(|r| (0..3).map(move |k| (k + r) % 3))
            .collect();
        assert_eq!(*order.borrow(), want);
        assert_eq!(steps[2].trainable, 2);
    }

    #[test]
    fn interleaving_stops_at_the_first_failing_step_and_takes_none() {
        let calls = RefCell::new(0);
        let mut steps = vec![
            Step::new(0, || {
                *calls.borrow_mut() += 1;
                Ok(())
            }),
            Step::new(0, || {
                Err(AdapterError::from(crate::ConfigError::invalid(
                    "timing", "step", "fails",
                )))
            }),
        ];
        let err = interleaved_ms(&mut steps, 1, 0.0).unwrap_err();
        assert!(err.to_string().contains("fails"), "{err}");
        assert_eq!(*calls.borrow(), 1, "the round stops at the failing step");
        assert!(interleaved_ms(&mut [], 2, 1.0).unwrap().is_empty());
    }

    #[test]
    fn round_ratios_pair_each_round_with_the_base_rounds() {
        let times = vec![vec![10.0, 20.0, 40.0], vec![11.0, 30.0, 44.0]];
        let r = round_ratios(&times, 0);
        assert_eq!(r[0], vec![1.0, 1.0, 1.0]);
        assert_eq!(r[1], vec![1.1, 1.5, 1.1]);
        // The median of the paired ratios is 1.1; the ratio of the medians would be 30 / 20.
        assert_eq!(median(&r[1]), 1.1);
        assert!(round_ratios(&times, 2).is_empty());
    }

    #[test]
    fn median_takes_the_upper_middle_of_unsorted_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
