//! The main job through Burn's own `burn-train`: MiniLM with adapters on Rotten Tomatoes,
//! trained by `SupervisedTraining` (its data loaders, accuracy and loss metrics, file metric
//! logger, per-epoch checkpointer, early stopping on the dev loss, and a renderer), optionally
//! over several devices with `ExecutionStrategy::multi`. The test accuracy is then measured as
//! the main job measures it, for comparison (docs/training.md).
//!
//! ```text
//! cargo run --release --features full --example learner                  # KronA, 2 epochs, CPU
//! cargo run --release --features full --example learner -- --epochs 3 --patience 1
//! cargo run --release --features full,wgpu --example learner -- --devices 2
//! ```

mod common;

use std::path::PathBuf;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::AdamWConfig;
use burn::record::{BinFileRecorder, FullPrecisionSettings};
use burn::tensor::backend::Backend;
use burn::train::metric::store::{Aggregate, Direction, Split};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ExecutionStrategy, Learner, MetricEarlyStoppingStrategy, MultiDeviceOptim, StoppingCondition,
    SupervisedTraining,
};
use clap::Parser;
use common::{backend_name, Train};
use kron_adapters::finetune::train::{build_model, evaluate};
use kron_adapters::finetune::{prepare, preset, AssetCache, FinetuneConfig};
use kron_adapters::learner::{ClassifierBatcher, LineRenderer, WarmupLinear};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune MiniLM with adapters inside burn-train")]
struct Args {
    /// The method (as the main job: krona, kron-lora, lora, ...).
    #[arg(long, default_value = "krona")]
    method: String,
    /// Epochs at most (early stopping may end sooner).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Stop after this many epochs without a better dev loss.
    #[arg(long, default_value_t = 1)]
    patience: usize,
    /// Peak learning rate (default: the main job's for the method).
    #[arg(long)]
    lr: Option<f64>,
    /// Seed (data order).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-parallel over this many devices (`ExecutionStrategy::multi`; on a CPU backend they
    /// are the same device).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Distributed data parallel over this many CUDA devices (burn-train's `ddp` strategy,
    /// NCCL all-reduce; needs `--no-default-features --features ddp`).
    #[cfg(feature = "ddp")]
    #[arg(long)]
    ddp: Option<usize>,
    /// Use only this many training sentences.
    #[arg(long)]
    max_train: Option<usize>,
    /// Output directory (default runs/learner-<method>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    common::exit_on_error(run());
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cache = AssetCache::default();
    let method = preset(&args.method)?;
    let mut cfg = FinetuneConfig::new()
        .with_placement(method.placement)
        .with_lr(args.lr.unwrap_or(method.lr))
        .with_seed(args.seed)
        .with_epochs(args.epochs);
    cfg.max_train = args.max_train;
    cfg.validate()?;
    if args.devices == 0 {
        return Err("--devices 0: use at least 1".into());
    }
    #[cfg(feature = "ddp")]
    if args.ddp == Some(0) {
        return Err("--ddp 0: use at least 1 device".into());
    }
    let data = prepare(&cache, cfg.task, cfg.max_len, &|m| eprintln!("{m}"))?;
    let train: Vec<_> = match cfg.max_train {
        Some(n) => data.train[..n.min(data.train.len())].to_vec(),
        None => data.train.clone(),
    };
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("learner-{}-seed{}", args.method, args.seed))
    });
    // burn-train's file loggers panic (on their own thread, then abort in a destructor) when
    // they cannot create their files: make sure the folder can be made, with its path in the
    // error, before anything runs.
    std::fs::create_dir_all(&out).map_err(|e| kron_adapters::AdapterError::io(&out, e))?;
    let device: burn::tensor::Device<Train> = Default::default();
    Train::seed(&device, cfg.seed);
    let model = build_model::<Train>(&cfg, &data, &device)?;
    eprintln!(
        "burn-train on {}: {} train / {} dev sentences, {} epochs at most, {} device(s)",
        backend_name(),
        train.len(),
        data.dev.len(),
        cfg.epochs,
        args.devices
    );

    let loader_train = DataLoaderBuilder::new(ClassifierBatcher)
        .batch_size(cfg.batch_size)
        .shuffle(cfg.seed)
        .build(InMemDataset::new(train.clone()));
    let loader_valid = DataLoaderBuilder::new(ClassifierBatcher)
        .batch_size(cfg.eval_batch_size)
        .build(InMemDataset::new(data.dev.clone()));
    // The main job's optimizer and schedule: AdamW (its step one fused pass on flex) with its
    // weight decay and per-parameter clipping, linear warm-up and decay over the optimizer
    // steps of all epochs.
    let steps = train.len().div_ceil(cfg.batch_size * args.devices) * cfg.epochs;
    let warmup = (cfg.warmup * steps as f64).ceil() as usize;
    let optim = kron_adapters::optim::adamw(
        &AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay as f32)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.clip_norm as f32))),
    );
    let early = MetricEarlyStoppingStrategy::new(
        &LossMetric::<Train>::new(),
        Aggregate::Mean,
        Direction::Lowest,
        Split::Valid,
        StoppingCondition::NoImprovementSince {
            n_epochs: args.patience,
        },
    );
    let mut training = SupervisedTraining::new(&out, loader_train, loader_valid)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .with_file_checkpointer(BinFileRecorder::<FullPrecisionSettings>::new())
        .early_stopping(early)
        .num_epochs(cfg.epochs)
        .renderer(LineRenderer::new(50, |l| eprintln!("{l}")))
        .with_application_logger(None);
    if args.devices > 1 {
        let devices: Vec<_> = std::iter::repeat_n(&device, args.devices)
            .cloned()
            .collect();
        training = training.with_training_strategy(
            ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice).into(),
        );
    }
    #[cfg(feature = "ddp")]
    if let Some(n) = args.ddp {
        use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
        let devices = (0..n).map(burn::backend::cuda::CudaDevice::new).collect();
        let config = DistributedConfig {
            all_reduce_op: ReduceOperation::Mean,
        };
        training = training.with_training_strategy(ExecutionStrategy::ddp(devices, config).into());
    }
    let t = std::time::Instant::now();
    let result = training.launch(Learner::new(
        model,
        optim,
        WarmupLinear::new(cfg.lr, steps, warmup),
    ));
    let seconds = t.elapsed().as_secs_f64();
    let model = result.model;
    let dev_acc = evaluate(&model, &data.dev, cfg.eval_batch_size, &device)?;
    let test_acc = evaluate(&model, &data.test, cfg.eval_batch_size, &device)?;
    println!(
        "burn-train {}: {seconds:.0} s with validation ({:.1} training sentences/s overall), dev accuracy {dev_acc:.4}",
        args.method,
        (train.len() * cfg.epochs) as f64 / seconds
    );
    println!(
        "TEST ACCURACY {test_acc:.4}  ({} test sentences)",
        data.test.len()
    );
    println!("metrics and checkpoints in {}", out.display());
    Ok(())
}
