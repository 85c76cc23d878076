//! Peak memory and step time of one training setup — MiniLM with KronA, or SmolLM2-135M or a
//! Mistral-7B-shaped decoder with Kron-LoRA (random weights: cost does not depend on them), its
//! frozen weights in f32 or (`--base-weights int8`) int8, plain, with gradient accumulation
//! (the batch in micro-batches), or with Burn's activation checkpointing
//! (`Autodiff<_, BalancedCheckpointing>`: memory-bound ops recomputed in backward), with the
//! crate's backward of the Kronecker apply or (`--burn-backward`) Burn's. Peak memory
//! is the process's peak resident set above what the built model takes (the peak reset once it
//! is built, so the loader's transients do not count), so run one setup per
//! process; `scripts/train_memory.sh` runs them all and prints docs/training.md's table.
//!
//! ```text
//! cargo run --release --features full --example train_memory -- --model minilm --mode accum
//! cargo run --release --features full --example train_memory -- --model mistral7b --base-weights int8 --seq 32 --steps 1
//! ```

mod common;

use std::time::Instant;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, ValueEnum};
use common::Inner;
use kron_adapters::finetune::timing::random_batch;
use kron_adapters::llm::score::{continuation_batch, continuation_logits, Encoded};
use kron_adapters::model::{
    BertClassifier, BertConfig, LlamaConfig, LlamaForCausalLM, TensorSource,
};
use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::training::gradients_params;
use kron_adapters::{AdapterConfig, KronAConfig, KronLoraConfig, PlacementConfig};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum ModelArg {
    Minilm,
    Smollm2,
    /// Mistral-7B's shapes (7.2B parameters: 29 GB in f32, 8 GB with `--base-weights int8`).
    Mistral7b,
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
    /// Decoder layers of a decoder (default: the model's own count).
    #[arg(long)]
    layers: Option<usize>,
    /// A decoder's frozen weights in memory: f32, or int8 (one scale per 32 values; the adapters
    /// train on the int8 base).
    #[arg(long, default_value = "f32")]
    base_weights: String,
}

/// The resident memory once the model is built, the peak reset to it (Linux's `clear_refs`),
/// so that the peak measured after training is training's, not the loader's transients.
fn built() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss().0
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
            base = built();
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
                    acc.accumulate(&model, gradients_params(loss.backward(), &model));
                }
                model = optim.step(1e-3, model, acc.grads());
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        ModelArg::Smollm2 | ModelArg::Mistral7b => {
            let (batch, cfg) = match args.model {
                ModelArg::Smollm2 => (args.batch.unwrap_or(8), LlamaConfig::smollm2_135m()),
                _ => (args.batch.unwrap_or(1), LlamaConfig::mistral_7b()),
            };
            let mut cfg = cfg;
            cfg.num_hidden_layers = args.layers.unwrap_or(cfg.num_hidden_layers);
            let placement =
                PlacementConfig::linear(AdapterConfig::KronLora(KronLoraConfig::auto(8)));
            let mut source = TensorSource::random(2);
            match args.base_weights.as_str() {
                "f32" => {}
                "int8" => {
                    // The crate's int8 products under Burn's autodiff (registered above).
                    kron_adapters::kron::autodiff::register_backward::<B>();
                    let int8 = QuantConfig::new(8, Level::Block(32))?;
                    source.quantize_frozen::<B>(int8, &device)?;
                }
                other => return Err(format!("--base-weights {other:?}: use f32 or int8").into()),
            }
            let mut model = LlamaForCausalLM::<B>::new(&mut source, &cfg, &placement, &device)?;
            let mut optim = AdamWConfig::new().init();
            let mut rng = kron_adapters::rng::SplitMix64::new(3);
            let items: Vec<Encoded> = (0..batch)
                .map(|_| Encoded {
                    ids: (0..args.seq)
                        .map(|_| 100 + rng.below(cfg.vocab_size - 100) as u32)
                        .collect(),
                    start: 1,
                })
                .collect();
            base = built();
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
                    acc.accumulate(&model, gradients_params(loss.backward(), &model));
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
            "base_weights": args.base_weights,
            "layers": args.layers,
            "backend": common::backend_name(),
            "median_step_ms": times[times.len() / 2],
            "model_mb": base as f64 / 1e6,
            "peak_above_model_mb": peak.saturating_sub(base) as f64 / 1e6,
        })
    );
    Ok(())
}
