//! The method comparison: every method of the KronA paper's Table 1 plus Kron-LoRA, on
//! all-MiniLM-L6-v2 and Rotten Tomatoes, at matched trainable-parameter budgets, several seeds;
//! the initialisation ablation (Table 4), factor shapes (Table 9), training time per step
//! relative to full fine-tuning (Table 2) and inference latency at batch 1 × 10 tokens, merged
//! and unmerged. Writes the tables into `docs/results.md` (between markers, so the hand-written
//! analysis around them stays) and every run's report under `runs/compare/`.
//!
//! ```text
//! cargo run --release --features full --example compare                 # everything (hours on 2 CPU cores)
//! cargo run --release --features full --example compare -- --no-timing  # skip the timing tables
//! cargo run --release --features full --example compare -- --ablation-seeds 2   # fewer seeds for the ablations
//! cargo run --release --features full --example compare -- --seeds 1 --max-train 1000   # a quick smoke run
//! ```
//!
//! Runs are resumable: a run whose `report.json` exists with the same configuration is read
//! back instead of trained again, so a second invocation only redoes the timing tables (run
//! them on an otherwise idle machine).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use common::{backend_name, Inner, Train};
use kron_adapters::finetune::timing::{inference_ms, train_step_ms};
use kron_adapters::finetune::{
    finetune, prepare, presets, AssetCache, FinetuneConfig, Prepared, Preset, RunReport, TaskName,
};
use kron_adapters::model::{BertClassifier, BertConfig, TensorSource};
use kron_adapters::{AdapterConfig, FactorInit, KronAConfig, PlacementConfig};

#[derive(Parser, Debug)]
#[command(about = "Compare PEFT methods on all-MiniLM-L6-v2 / Rotten Tomatoes")]
struct Args {
    /// Seeds per configuration.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Training sentences per run (the dev and test sets are always whole).
    #[arg(long, default_value_t = 5000)]
    max_train: usize,
    /// Seeds per ablation configuration (default: `--seeds`).
    #[arg(long)]
    ablation_seeds: Option<u64>,
    /// Epochs per run.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Training sentences of the learning-rate selection runs.
    #[arg(long, default_value_t = 2000)]
    select_train: usize,
    /// Skip the timing tables.
    #[arg(long)]
    no_timing: bool,
    /// Only these methods (by key, comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where run reports go.
    #[arg(long, default_value = "runs/compare")]
    runs: PathBuf,
    /// The results file (tables are written between its markers).
    #[arg(long, default_value = "docs/results.md")]
    results: PathBuf,
}

fn main() {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    common::exit_on_error(run());
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cache = AssetCache::default();
    let base = FinetuneConfig {
        epochs: args.epochs,
        max_train: Some(args.max_train),
        ..FinetuneConfig::default()
    };
    let data = prepare(&cache, TaskName::RottenTomatoes, base.max_len, &|m| {
        eprintln!("{m}")
    })?;
    let device = Default::default();
    let methods: Vec<Preset> = presets()
        .into_iter()
        .filter(|m| args.only.is_empty() || args.only.iter().any(|k| k == m.key))
        .collect();
    let mut sections = Vec::new();
    sections.push(header(&args, &data));

    {
        // 1. Learning rate per method, on dev.
        let mut chosen = BTreeMap::new();
        for m in &methods {
            let mut best = (m.lrs[0], -1.0);
            if m.lrs.len() > 1 {
                for &lr in m.lrs {
                    let cfg = FinetuneConfig {
                        placement: m.placement.clone(),
                        lr,
                        seed: 0,
                        max_train: Some(args.select_train),
                        ..base.clone()
                    };
                    let r = run_one(
                        &args.runs,
                        &format!("select-{}-lr{lr}", m.key),
                        &cfg,
                        &data,
                        &device,
                    )?;
                    if r.best_dev_acc > best.1 {
                        best = (lr, r.best_dev_acc);
                    }
                }
            }
            chosen.insert(m.key, best.0);
        }
        // 2. Every method, several seeds.
        let mut rows = Vec::new();
        for m in &methods {
            let lr = chosen[m.key];
            let reports = (0..args.seeds)
                .map(|seed| {
                    let cfg = FinetuneConfig {
                        placement: m.placement.clone(),
                        lr,
                        seed,
                        ..base.clone()
                    };
                    run_one(
                        &args.runs,
                        &format!("{}-seed{seed}", m.key),
                        &cfg,
                        &data,
                        &device,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            rows.push((m.name.to_string(), lr, reports));
        }
        sections.push(accuracy_table("Methods", &rows));

        // 3. Ablations on KronA, with KronA's learning rate.
        if methods.iter().any(|m| m.key == "krona") {
            let lr = chosen["krona"];
            let ablation = |key: &str,
                            name: &str,
                            c: KronAConfig|
             -> Result<
                (String, f64, Vec<RunReport>),
                Box<dyn std::error::Error>,
            > {
                let reports = (0..args.ablation_seeds.unwrap_or(args.seeds))
                    .map(|seed| {
                        let cfg = FinetuneConfig {
                            placement: PlacementConfig::linear(AdapterConfig::KronA(c.clone())),
                            lr,
                            seed,
                            ..base.clone()
                        };
                        run_one(
                            &args.runs,
                            &format!("{key}-seed{seed}"),
                            &cfg,
                            &data,
                            &device,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((name.to_string(), lr, reports))
            };
            let init = vec![
                ablation(
                    "krona",
                    "a ~ Kaiming-uniform, b = 0 (default)",
                    KronAConfig::auto(),
                )?,
                ablation(
                    "krona-normal",
                    "a, b ~ Normal(0, 1/√d_in)",
                    KronAConfig::auto().with_init(FactorInit::Normal),
                )?,
            ];
            sections.push(accuracy_table(
                "Initialisation (the paper's Table 4)",
                &init,
            ));
            let shapes = vec![
                ablation("krona", "a (16, 16) near √d (default)", KronAConfig::auto())?,
                ablation(
                    "krona-a16x24",
                    "a (16, 24)",
                    KronAConfig::auto().with_a_shape([16, 24]),
                )?,
                ablation(
                    "krona-a2x192",
                    "a (2, 192)",
                    KronAConfig::auto().with_a_shape([2, 192]),
                )?,
                ablation(
                    "krona-a48x8",
                    "a (48, 8)",
                    KronAConfig::auto().with_a_shape([48, 8]),
                )?,
            ];
            sections.push(accuracy_table(
                "Factor shapes (the paper's Table 9; `b` is derived per layer)",
                &shapes,
            ));
        }
    }
    if !args.no_timing {
        sections.push(timing_tables(&methods, &device)?);
    }
    common::write_between(&args.results, "# Results", BEGIN, END, &sections.join("\n"))?;
    eprintln!("wrote {}", args.results.display());
    Ok(())
}

/// Trains one configuration, or reads its report back if it was already trained.
fn run_one(
    runs: &Path,
    name: &str,
    cfg: &FinetuneConfig,
    data: &Prepared,
    device: &burn::tensor::Device<Train>,
) -> Result<RunReport, Box<dyn std::error::Error>> {
    let dir = runs.join(name);
    if let Ok(text) = std::fs::read_to_string(dir.join("report.json")) {
        if let Ok(r) = serde_json::from_str::<RunReport>(&text) {
            if &r.config == cfg {
                eprintln!("{name}: cached, test {:.4}", r.test_acc);
                return Ok(r);
            }
        }
    }
    let t = Instant::now();
    let r = finetune::<Train>(cfg, data, Some(&dir), device, false)?;
    eprintln!(
        "{name}: lr {:e} dev {:.4} test {:.4} trainable {} ({:.0} s)",
        cfg.lr,
        r.best_dev_acc,
        r.test_acc,
        r.trainable,
        t.elapsed().as_secs_f64()
    );
    Ok(r)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn accuracy_table(title: &str, rows: &[(String, f64, Vec<RunReport>)]) -> String {
    let mut s = format!(
        "### {title}\n\n| method | trainable params | % of model | lr | test accuracy (mean ± std) | dev accuracy | seeds |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (name, lr, reports) in rows {
        let test: Vec<f64> = reports.iter().map(|r| 100.0 * r.test_acc).collect();
        let dev: Vec<f64> = reports.iter().map(|r| 100.0 * r.best_dev_acc).collect();
        let (tm, ts) = mean_std(&test);
        let (dm, ds) = mean_std(&dev);
        let r = &reports[0];
        // One seed has no spread to show.
        let (tm, dm) = if reports.len() > 1 {
            (format!("{tm:.2} ± {ts:.2}"), format!("{dm:.2} ± {ds:.2}"))
        } else {
            (format!("{tm:.2}"), format!("{dm:.2}"))
        };
        s += &format!(
            "| {name} | {} | {:.3} | {lr:e} | {tm} | {dm} | {} |\n",
            r.trainable,
            100.0 * r.trainable as f64 / r.total as f64,
            reports.len()
        );
    }
    s
}

/// Training step time per method relative to full fine-tuning, and inference latency at
/// batch 1 × 10 tokens, merged and unmerged (all-MiniLM-L6-v2's architecture; the cost does not
/// depend on the weights' values).
fn timing_tables(
    methods: &[Preset],
    device: &burn::tensor::Device<Train>,
) -> Result<String, Box<dyn std::error::Error>> {
    let bert = BertConfig::minilm_l6();
    let mut steps = Vec::new();
    let mut latency = Vec::new();
    let parts = kron_adapters::shards::default_parts::<Train>(device);
    for m in methods {
        let (ms, _) = train_step_ms::<Train>(&bert, &m.placement, 32, 64, parts, 8.0, device)?;
        let model = BertClassifier::<Inner>::new(
            &mut TensorSource::random(2),
            &bert,
            &m.placement,
            2,
            device,
        )?;
        let unmerged = inference_ms(&model, bert.vocab_size, 1, 10, 1, 3.0, device)?;
        let mut merged = model.clone();
        merged.encoder = merged.encoder.merge()?;
        let merged_ms = inference_ms(&merged, bert.vocab_size, 1, 10, 1, 3.0, device)?;
        eprintln!(
            "timing {}: step {ms:.0} ms, latency {unmerged:.2} / {merged_ms:.2} ms",
            m.name
        );
        steps.push((m.key, m.name, ms));
        latency.push((
            m.name,
            unmerged,
            merged_ms,
            model.encoder.block_adapters.is_some(),
        ));
    }
    let full = steps.iter().find(|s| s.0 == "full").map(|s| s.2);
    let base = latency
        .iter()
        .find(|l| l.0.starts_with("Frozen"))
        .map(|l| l.1);
    let mut s = String::from("### Training time per step (the paper's Table 2, second row)\n\nMedian ms of a training step (forward, backward, AdamW) on a batch of 32 × 64 tokens.\n\n| method | ms per step | relative to full fine-tuning |\n| --- | ---: | ---: |\n");
    for (_, name, ms) in &steps {
        s += &format!(
            "| {name} | {ms:.0} | {} |\n",
            full.map_or("—".into(), |f| format!("{:.2}", ms / f))
        );
    }
    s += "\n### Inference latency, batch 1 × 10 tokens (the paper's Table 2, first row)\n\nMedian ms of a forward pass. Merged: linear adapters folded into the weights (`BertEncoder::merge`); block adapters cannot merge.\n\n| method | unmerged ms | merged ms | merged relative to the frozen base |\n| --- | ---: | ---: | ---: |\n";
    for (name, un, me, block) in &latency {
        let rel = base.map_or("—".into(), |b| format!("{:.2}", me / b));
        s += &format!(
            "| {name} | {un:.2} | {}{me:.2} | {rel} |\n",
            if *block { "(not mergeable) " } else { "" }
        );
    }
    Ok(s)
}

fn header(args: &Args, data: &Prepared) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "Produced by `cargo run --release --features full --example compare -- --seeds {} --ablation-seeds {} --max-train {} --epochs {}{}` at commit `{commit}`, on {cpu} ({cores} cores), backend {}. Task: Rotten Tomatoes ({} training sentences used of {}, dev {}, test {}); all-MiniLM-L6-v2. Learning rates chosen on dev per method ({} training sentences, seed 0).\n",
        args.seeds,
        args.ablation_seeds.unwrap_or(args.seeds),
        args.max_train,
        args.epochs,
        if args.no_timing { " --no-timing" } else { "" },
        backend_name(),
        args.max_train.min(data.train.len()),
        data.train.len(),
        data.dev.len(),
        data.test.len(),
        args.select_train,
    )
}

const BEGIN: &str = "<!-- compare:begin (written by examples/compare.rs) -->";
const END: &str = "<!-- compare:end -->";
