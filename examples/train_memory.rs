//! Peak memory and step time of one training setup — MiniLM with KronA or SmolLM2-135M with
//! Kron-LoRA (random weights: cost does not depend on them), plain, with gradient accumulation
//! (the batch in micro-batches), or with Burn's activation checkpointing
//! (`Autodiff<_, BalancedCheckpointing>`: memory-bound ops recomputed in backward), with the
//! crate's backward of the Kronecker apply or (`--burn-backward`) Burn's. Peak memory
//! is the process's peak resident set above what the built model takes, so run one setup per
//! process; `scripts/train_memory.sh` runs them all and prints docs/training.md's table.
//!
//! ```text
//! cargo run --release --features full --example train_memory -- --model minilm --mode accum
//! ```

mod common;

use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, ValueEnum};
use common::Inner;
use kron_adapters::finetune::timing::random_batch;
use kron_adapters::llm::score::{continuation_batch, continuation_logits, Encoded};
use kron_adapters::model::{
    BertClassifier, BertConfig, LlamaConfig, LlamaForCausalLM, TensorSource,
};
use kron_adapters::{AdapterConfig, KronAConfig, KronLoraConfig, PlacementConfig};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum ModelArg {
    Minilm,
    Smollm2,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    /// One batch, no checkpointing.
    Plain,
    /// The batch in `--micro` micro-batches.
    Accum,
    /// Burn's BalancedCheckpointing.
    Checkpointing,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value = "minilm")]
    model: ModelArg,
    #[arg(long, value_enum, default_value = "plain")]
    mode: Mode,
    /// Sequences per optimizer step (default: 32 for MiniLM, 8 for SmolLM2).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Micro-batches with `--mode accum`.
    #[arg(long, default_value_t = 4)]
    micro: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Differentiate the Kronecker apply with Burn's generic backward instead of the crate's
    /// (which keeps no intermediates; the training loops register it).
    #[arg(long)]
    burn_backward: bool,
}

/// Resident and peak resident memory of this process, bytes (Linux; zeros elsewhere).
fn rss() -> (u64, u64) {
    kron_adapters::finetune::timing::memory_bytes().unwrap_or((0, 0))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kron_adapters::finetune::keep_freed_memory();
    let args = Args::parse();
    match args.mode {
        Mode::Checkpointing => run::<Autodiff<Inner, BalancedCheckpointing>>(&args),
        _ => run::<Autodiff<Inner>>(&args),
    }
}

fn run<B: AutodiffBackend>(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if !args.burn_backward {
        kron_adapters::kron::autodiff::register_backward::<B>();
    }
    let device: B::Device = Default::default();
    let micro = if args.mode == Mode::Accum {
        args.micro
    } else {
        1
    };
    let mut times = Vec::new();
    let base;
    match args.model {
        ModelArg::Minilm => {
            let batch = args.batch.unwrap_or(32);
            let bert = BertConfig::minilm_l6();
            let placement = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()));
            let mut model = BertClassifier::<B>::new(
                &mut TensorSource::random(2),
                &bert,
                &placement,
                2,
                &device,
            )?;
            let mut optim = AdamWConfig::new().init();
            let (ids, mask) = random_batch::<B>(1, batch, args.seq, bert.vocab_size, &device);
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(
                    (0..batch as i64).map(|i| i % 2).collect::<Vec<_>>(),
                    [batch],
                ),
                &device,
            );
            base = rss().0;
            let per = batch.div_ceil(micro);
            for step in 0..=args.steps {
                let t = Instant::now();
                let mut acc = GradientsAccumulator::new();
                for m in 0..micro {
                    let r = m * per..((m + 1) * per).min(batch);
                    let logits = model.forward(
                        ids.clone().slice([r.clone(), 0..args.seq]),
                        mask.clone().slice([r.clone(), 0..args.seq]),
                    );
                    let loss = CrossEntropyLossConfig::new()
                        .init(&device)
                        .forward(logits, labels.clone().slice([r.clone()]))
                        .mul_scalar(r.len() as f64 / batch as f64);
                    acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
                }
                model = optim.step(1e-3, model, acc.grads());
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        ModelArg::Smollm2 => {
            let batch = args.batch.unwrap_or(8);
            let cfg = LlamaConfig::smollm2_135m();
            let placement =
                PlacementConfig::linear(AdapterConfig::KronLora(KronLoraConfig::auto(8)));
            let mut model = LlamaForCausalLM::<B>::new(
                &mut TensorSource::random(2),
                &cfg,
                &placement,
                &device,
            )?;
            let mut optim = AdamWConfig::new().init();
            let mut rng = kron_adapters::rng::SplitMix64::new(3);
            let items: Vec<Encoded> = (0..batch)
                .map(|_| Encoded {
                    ids: (0..args.seq)
                        .map(|_| 100 + rng.below(40000) as u32)
                        .collect(),
                    start: 1,
                })
                .collect();
            base = rss().0;
            let per = batch.div_ceil(micro);
            for step in 0..=args.steps {
                let t = Instant::now();
                let mut acc = GradientsAccumulator::new();
                for part in items.chunks(per) {
                    let refs: Vec<&Encoded> = part.iter().collect();
                    let b = continuation_batch::<B>(&refs, &device);
                    let targets = b.targets.clone();
                    let logits = continuation_logits(&model, b);
                    let loss = CrossEntropyLossConfig::new()
                        .init(&device)
                        .forward(logits, targets)
                        .mul_scalar(part.len() as f64 / batch as f64);
                    acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
                }
                model = optim.step(1e-3, model, acc.grads());
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let (_, peak) = rss();
    println!(
        "{}",
        serde_json::json!({
            "model": format!("{:?}", args.model).to_lowercase(),
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "micro": micro,
            "burn_backward": args.burn_backward,
            "backend": common::backend_name(),
            "median_step_ms": times[times.len() / 2],
            "model_mb": base as f64 / 1e6,
            "peak_above_model_mb": peak.saturating_sub(base) as f64 / 1e6,
        })
    );
    Ok(())
}
