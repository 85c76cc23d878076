//! One batch's gradient from parts computed at once on one device ([`gradients`]): each part's
//! forward and backward runs in a rayon thread pool of its own (the cores shared out between
//! the parts), on its own copy of the model, and the parts' gradients are summed. The same for
//! inference ([`forward`]): each part's forward pass in a pool of its own, the outputs in order
//! (the crate's evaluation loops use it).
//!
//! Why: Burn 0.21's CPU backends run every element-wise operation (adds, products, activations,
//! masks, the softmax's passes) on the calling thread; only large GEMMs use the other cores. A
//! MiniLM training step on flex keeps 1.25 of 2 cores busy. Two parts of the batch at once
//! keep both busy: the element-wise work of one part runs while the other part's GEMM does.
//! Measured on 2 cores (docs/benchmarks-history.md, "Parts of a batch at once"): a MiniLM LoRA
//! step 1.4–1.8× faster, KronA 1.4–1.6×, full fine-tuning 1.06–1.6×, SmolLM2's LoRA step
//! 1.2–1.5×; 4 parts gain nothing over 2 there. A MiniLM forward pass over 32 × 64 tokens:
//! 1.47× faster in two parts ("Inference in parts").
//!
//! The update is the whole batch's: the caller builds each part's loss so that the parts'
//! losses add up to the batch's (a mean over `n` examples: each part's mean times its share
//! `n_part / n`), and gradients add like losses. Dropout stays reproducible: in a part, the
//! crate's models draw their dropout masks with [`dropout`] from a generator of the part's own
//! (seeded by the caller's seed and the part's index), not from the backend's one generator,
//! whose draws two threads would take in a different order in every run.
//!
//! On a GPU backend the parts would only split the device's queue: [`default_parts`] is 1
//! there, and a part's work is synchronized before its gradients leave its thread (CubeCL
//! backends run each thread's work on that thread's own stream).

use std::cell::Cell;
use std::ops::Range;

use burn::module::AutodiffModule;
use burn::nn::Dropout;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use crate::error::{AdapterError, ConfigError};
use crate::rng::SplitMix64;

/// Parts of each batch computed at once when a training loop is not told: 2 on the CPU
/// backends whose element-wise operations run on one thread (flex, ndarray; under autodiff or
/// not), 1 on every other backend (a GPU's queue, LibTorch's own threads). A fixed number, not
/// the core count, so that a run gives the same result on any machine (the parts decide how
/// dropout masks are drawn and how the gradients' sums are rounded).
pub fn default_parts<B: Backend>(device: &B::Device) -> usize {
    if crate::quirks::element_wise_on_one_thread::<B>(device) {
        2
    } else {
        1
    }
}

/// Checks a configuration's `batch_parts` (`None`: the default) against its `batch_size`: a
/// typed error for 0 parts or more parts than examples, naming `owner`'s field.
pub fn check_parts(
    owner: &str,
    parts: Option<usize>,
    batch_size: usize,
) -> Result<(), ConfigError> {
    match parts {
        Some(p) if p == 0 || p > batch_size => Err(ConfigError::invalid(
            owner,
            "batch_parts",
            format!("{p} parts for batches of {batch_size}: use 1 to batch_size"),
        )),
        _ => Ok(()),
    }
}

/// `0..n` in `parts` contiguous ranges whose sizes differ by at most one (the first `n % parts`
/// are the longer ones); fewer ranges when `n < parts` (no empty range), none when `n = 0`.
pub fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// One part of a batch, as [`gradients`] hands it to the caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// The part's examples (rows) in the batch: one of [`split`]`(len, parts)`.
    pub range: Range<usize>,
    /// Its share of the batch, `range.len() / len`: what a mean over the batch's examples
    /// weighs the part's own mean by.
    pub share: f64,
}

/// The gradients of the loss of a batch of `len` examples (rows) from `parts` parts computed
/// at once, and each part's output `R` in order.
///
/// The batch is cut by [`split`]; `part(model, p)` computes the loss *contribution* of the
/// examples `p.range` (the parts' losses must add up to the batch's loss: a mean over the
/// examples is the part's mean times `p.share`, see the module's docs) and anything else the
/// caller wants back (its loss value, its correct predictions). With one part it runs once on
/// `model` on this thread, drawing dropout from the backend's generator as Burn's `Dropout`
/// does. With more, part `i` runs on a fork of `model` (the same weights, its own autodiff
/// graph) in a rayon thread pool of its own (the global pool's threads divided between the
/// parts, at least one each), and [`dropout`] in it draws from a generator seeded by `seed` and
/// `i`. The gradients are summed in part order, so a run is reproducible.
///
/// Errors: `parts = 0`, an empty batch, or a backend failing to synchronize a part's work.
pub fn gradients<B, M, R, F>(
    model: &M,
    len: usize,
    parts: usize,
    seed: u64,
    part: F,
) -> Result<(GradientsParams, Vec<R>), AdapterError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Send + Sync,
    R: Send,
    F: Fn(&M, &Part) -> (Tensor<B, 1>, R) + Sync,
{
    let parts = parts_of("batch parts", len, parts)?;
    if parts.len() == 1 {
        let (loss, out) = part(model, &parts[0]);
        return Ok((
            crate::training::gradients_params(loss.backward(), model),
            vec![out],
        ));
    }
    let device =
        model.devices().into_iter().next().ok_or_else(|| {
            ConfigError::invalid("batch parts", "model", "the model has no tensors")
        })?;
    let results = in_pools("batch parts", parts.len(), |i| {
        let copy = crate::training::fork(model.clone(), &device);
        let _stream = DropoutStream::enter(part_seed(seed, i));
        let (loss, out) = part(&copy, &parts[i]);
        let grads = crate::training::gradients_params(loss.backward(), &copy);
        synced::<B>("batch parts", &device, i)?;
        Ok((grads, out))
    });
    let mut acc = GradientsAccumulator::<M>::new();
    let mut outs = Vec::with_capacity(parts.len());
    for r in results {
        let (grads, out) = r?;
        acc.accumulate(model, grads);
        outs.push(out);
    }
    Ok((acc.grads(), outs))
}

/// Each part's output of a batch of `len` examples (rows) computed at once, in part order: the
/// inference counterpart of [`gradients`], for the same reason (Burn's CPU backends run
/// element-wise work on the calling thread; a second part keeps the other core busy).
///
/// The batch is cut by [`split`]; `part(p)` computes the examples `p.range` (typically a
/// forward pass over `x.slice(p.range)`), and the caller joins the outputs (e.g.
/// `Tensor::cat(outs, 0)`). With one part it runs on this thread; with more, part `i` runs in a
/// rayon thread pool of its own (the global pool's threads divided between the parts), its
/// work synchronized on `device` before its output leaves the thread. A model's output for an
/// example depends only on that example, so the parts change no result beyond float rounding
/// (a backend may block a product differently for fewer rows).
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use kron_adapters::shards;
///
/// type B = NdArray;
/// let device = Default::default();
/// let x = Tensor::<B, 2>::random([5, 3], Distribution::Default, &device);
/// let outs = shards::forward::<B, _, _>(&device, 5, 2, |p| x.clone().slice(p.range.clone()).exp())
///     .unwrap();
/// assert_eq!(outs.len(), 2);
/// let y = Tensor::cat(outs, 0);
/// assert_eq!(y.into_data(), x.exp().into_data());
/// ```
///
/// Errors: `parts = 0`, an empty batch, no thread pool, or a backend failing to synchronize a
/// part's work.
pub fn forward<B, R, F>(
    device: &B::Device,
    len: usize,
    parts: usize,
    part: F,
) -> Result<Vec<R>, ConfigError>
where
    B: Backend,
    R: Send,
    F: Fn(&Part) -> R + Sync,
{
    let parts = parts_of("forward parts", len, parts)?;
    if parts.len() == 1 {
        return Ok(vec![part(&parts[0])]);
    }
    in_pools("forward parts", parts.len(), |i| {
        let out = part(&parts[i]);
        synced::<B>("forward parts", device, i)?;
        Ok(out)
    })
    .into_iter()
    .collect()
}

/// `split(len, parts)` with each part's share; a typed error for `parts = 0` or `len = 0`.
fn parts_of(what: &str, len: usize, parts: usize) -> Result<Vec<Part>, ConfigError> {
    if parts == 0 || len == 0 {
        return Err(ConfigError::invalid(
            what,
            "parts",
            format!("{parts} parts of a batch of {len}: use 1 (one at a time) or more, of a non-empty batch"),
        ));
    }
    Ok(split(len, parts)
        .into_iter()
        .map(|range| Part {
            share: range.len() as f64 / len as f64,
            range,
        })
        .collect())
}

/// `run(i)` for `i` in `0..n`, each on a thread of its own in a rayon pool of its own (the
/// global pool's threads divided between them, at least one each); the results in order.
///
/// A pool per part: a thread waiting inside one part's parallel GEMM may run any queued job of
/// its pool, and a part run that way inside another part's backward pass deadlocks (Burn's
/// autodiff holds the graph's lock through the backward pass, and a finished backward pass
/// locks every graph to clean them up). With a pool per part, only that part's own jobs are
/// there to run.
fn in_pools<T, F>(what: &str, n: usize, run: F) -> Vec<Result<T, ConfigError>>
where
    T: Send,
    F: Fn(usize) -> Result<T, ConfigError> + Sync,
{
    let threads = (rayon::current_num_threads() / n.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let run = &run;
                s.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |t| format!("batch-part-{i}-{t}"))
                        .build()
                        .map_err(|e| {
                            ConfigError::invalid(
                                what,
                                "threads",
                                format!("part {i}: no thread pool: {e}"),
                            )
                        })?;
                    pool.install(|| run(i))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Finishes the work this thread queued on `device` (a CubeCL backend computes each thread's
/// work on its own stream) before another thread reads part `i`'s results.
fn synced<B: Backend>(what: &str, device: &B::Device, i: usize) -> Result<(), ConfigError> {
    B::sync(device).map_err(|e| {
        ConfigError::invalid(
            what,
            "backend",
            format!("part {i}: synchronizing the device failed: {e:?}"),
        )
    })
}

/// The seed of part `i`'s dropout generator.
fn part_seed(seed: u64, i: usize) -> u64 {
    SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

thread_local! {
    /// The dropout generator of the part this thread is computing, if any.
    static STREAM: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Sets this thread's dropout generator for the part being computed, and restores the previous
/// one when dropped (a thread waiting inside one part's GEMM may run another part to the end).
struct DropoutStream(Option<u64>);

impl DropoutStream {
    fn enter(seed: u64) -> Self {
        Self(STREAM.with(|s| s.replace(Some(seed))))
    }
}

impl Drop for DropoutStream {
    fn drop(&mut self) {
        STREAM.with(|s| s.set(self.0));
    }
}

/// `dropout`'s forward (Burn's `Dropout`: with autodiff, each element kept with probability
/// `1 − prob` and scaled by `1 / (1 − prob)`; without, unchanged), drawing its mask from the
/// current part's generator inside [`gradients`] and from the backend's generator (Burn's own
/// `Dropout::forward`) everywhere else. A model whose dropout goes through this function
/// trains reproducibly with parts computed at once.
///
/// Shapes: `x` any, output the same.
pub fn dropout<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || dropout.prob == 0.0 {
        return x;
    }
    let Some(state) = STREAM.with(Cell::get) else {
        return dropout.forward(x);
    };
    let keep = 1.0 - dropout.prob;
    // Kept when a uniform 32-bit draw is below keep · 2³², two draws per 64 random bits.
    let threshold = (keep * 4_294_967_296.0) as u64;
    let scale = (1.0 / keep) as f32;
    let shape = x.shape();
    let n = shape.num_elements();
    let mut rng = SplitMix64::new(state);
    let mut mask = Vec::with_capacity(n + 1);
    while mask.len() < n {
        let bits = rng.next_u64();
        for half in [bits & 0xFFFF_FFFF, bits >> 32] {
            mask.push(if half < threshold { scale } else { 0.0 });
        }
    }
    mask.truncate(n);
    STREAM.with(|s| s.set(Some(rng.state())));
    let mask = TensorData::new(mask, shape).convert_dtype(x.dtype());
    x * Tensor::from_data(mask, &device)
}
