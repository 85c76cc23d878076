//! The Kron-LoRA paper's experiments on a real decoder, SmolLM2-135M-Instruct: zero-shot
//! accuracy on five commonsense tasks; LoRA-8, LoRA-16, Kron-LoRA (about a quarter of LoRA-8's
//! parameters) and KronA (LoRA-8's) on the seven projections, the learning rate chosen on dev
//! per method; sequential fine-tuning ARC-Challenge → ARC-Easy; int8/int4 quantized adapters;
//! training step time and peak memory against LoRA-8 at SmolLM2's width and a Mistral-7B
//! layer's. Writes the tables into `docs/results-llm.md` between markers (the reading around
//! them stays) and every run's report under `runs/llm-compare/`.
//!
//! ```text
//! cargo run --release --features full --example llm_compare                  # the CPU budget (about 2 hours on 2 cores)
//! cargo run --release --features full,cuda --example llm_compare -- --full    # full splits, 3 seeds, on a GPU
//! cargo run --release --features full --example llm_compare -- --parts zero-shot,methods
//! ```
//!
//! Resumable: a run whose report exists is read back instead of trained again, so a stopped
//! invocation continues where it was. Step time and peak memory are measured in a child process
//! per method (the program re-runs itself with `--measure`), every method once a round over
//! `--timing-rounds` rounds (3), the table giving medians: one figure moves by ±10% on a
//! shared machine. To measure them again, remove `runs/llm-compare/timing/` and run
//! `-- --parts timing` (the other parts are read back).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, Optimizer};
use clap::Parser;
use common::{backend_name, Inner, Train};
use kron_adapters::finetune::timing::median;
use kron_adapters::finetune::AssetCache;
use kron_adapters::llm::score::{masked_nll_share, Encoded};
use kron_adapters::llm::train::{finetune_mc, LlmFinetuneConfig, LlmRunReport};
use kron_adapters::llm::{self, EvalResult, Question, Split, TaskKind, TextTokenizer};
use kron_adapters::model::llama::{self, LlamaConfig, LlamaForCausalLM};
use kron_adapters::model::TensorSource;
use kron_adapters::quant::{Level, QuantConfig};
use kron_adapters::store::{attach, QuantizedAdapters};
use kron_adapters::{
    AdapterConfig, KronAConfig, KronLoraConfig, LoraConfig, NameMap, NativeAdapters,
    PlacementConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "The Kron-LoRA paper's experiments on SmolLM2-135M")]
struct Args {
    /// Parts to run: zero-shot, select, methods, sequential, quant, timing (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "zero-shot,select,methods,sequential,quant,timing"
    )]
    parts: Vec<String>,
    /// Full splits and 3 seeds (for a GPU); otherwise the CPU subsets below.
    #[arg(long)]
    full: bool,
    /// Training questions per task.
    #[arg(long, default_value_t = 320)]
    train: usize,
    /// Dev questions per task (from validation).
    #[arg(long, default_value_t = 60)]
    dev: usize,
    /// Evaluation questions per task (ARC: test; others: validation after the dev questions).
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Training questions of the learning-rate selection runs (ARC-Easy).
    #[arg(long, default_value_t = 160)]
    select_train: usize,
    /// Seeds per (method, task).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Rounds of the timing part: every method measured once a round, each in a process of
    /// its own; the table gives each method's median and the median of the rounds' own ratios
    /// to LoRA-8 (one figure moves by ±10% on a shared machine).
    #[arg(long, default_value_t = 3)]
    timing_rounds: usize,
    /// Where runs go.
    #[arg(long, default_value = "runs/llm-compare")]
    runs: PathBuf,
    /// The results file.
    #[arg(long, default_value = "docs/results-llm.md")]
    results: PathBuf,
    /// Internal: measure one training step's time and peak memory in this process
    /// (`METHOD:WIDTH`), print JSON, exit.
    #[arg(long)]
    measure: Option<String>,
    /// With `--measure`: compute each batch in this many parts at once
    /// (`kron_adapters::shards`; default: the training loops', 2 on flex and ndarray).
    #[arg(long)]
    batch_parts: Option<usize>,
    /// With `--measure`: training steps, the first a warm-up the mean leaves out (more on a
    /// GPU, whose steps are short and whose first compiles the kernels).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..))]
    measure_steps: u64,
    /// With `--measure`: sequences × tokens of the batch (`8x64`; default: the width's, 8 × 64
    /// at SmolLM2, 1 × 2,048 at the Mistral layer). The loss is on each sequence's second half.
    #[arg(long, value_parser = parse_shape)]
    measure_shape: Option<(usize, usize)>,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let parsed = s
        .split_once('x')
        .and_then(|(b, t)| Some((b.trim().parse().ok()?, t.trim().parse().ok()?)));
    match parsed {
        Some((b, t)) if b > 0 && t > 1 => Ok((b, t)),
        _ => Err(format!(
            "`{s}`: expected SEQUENCESxTOKENS with at least one sequence of two tokens, e.g. 8x64"
        )),
    }
}

const TASKS: [TaskKind; 5] = [
    TaskKind::ArcEasy,
    TaskKind::ArcChallenge,
    TaskKind::Piqa,
    TaskKind::Hellaswag,
    TaskKind::Winogrande,
];

/// The compared methods: key, name, and the adapter for a `[d_in, d_out]` projection.
fn methods() -> Vec<(&'static str, &'static str)> {
    vec![
        ("lora8", "LoRA r=8"),
        ("lora16", "LoRA r=16"),
        ("kron-lora", "Kron-LoRA r=8, ≈¼ of LoRA-8's parameters"),
        ("krona", "KronA, ≈ LoRA-8's parameters"),
    ]
}

/// The placement of a method: every projection gets its own config (budgets are per layer),
/// through per-path patterns.
fn placement(method: &str, config: &LlamaConfig) -> PlacementConfig {
    let lora8 = |i: usize, o: usize| 8 * (i + o);
    let one = |i: usize, o: usize| -> AdapterConfig {
        match method {
            "lora8" => AdapterConfig::Lora(LoraConfig::new(8).with_alpha(16.0)),
            "lora16" => AdapterConfig::Lora(LoraConfig::new(16).with_alpha(32.0)),
            "kron-lora" => AdapterConfig::KronLora(
                KronLoraConfig::auto(8)
                    .with_alpha(16.0)
                    .with_budget(lora8(i, o) / 4),
            ),
            "krona" => AdapterConfig::KronA(KronAConfig::auto().with_budget(lora8(i, o))),
            other => panic!("unknown method {other}"),
        }
    };
    let (d, hd, f) = (
        config.hidden_size,
        config.head_dim,
        config.intermediate_size,
    );
    let (q, kv) = (
        config.num_attention_heads * hd,
        config.num_key_value_heads * hd,
    );
    let mut p = PlacementConfig::linear(one(d, q));
    for (name, i, o) in [
        ("k_proj", d, kv),
        ("v_proj", d, kv),
        ("o_proj", q, d),
        ("gate_proj", d, f),
        ("up_proj", d, f),
        ("down_proj", f, d),
    ] {
        p = p.with_pattern(name, one(i, o));
    }
    p
}

/// What a (method, task, seed) run keeps.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunResult {
    method: String,
    task: String,
    seed: u64,
    lr: f64,
    trainable: usize,
    test: EvalResult,
    report: LlmRunReport,
}

struct Data {
    train: Vec<Question>,
    dev: Vec<Question>,
    test: Vec<Question>,
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    common::exit_on_error(run());
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn run() -> Res<()> {
    let args = Args::parse();
    if let Some(spec) = &args.measure {
        return measure(
            spec,
            args.batch_parts,
            args.measure_steps as usize,
            args.measure_shape,
        );
    }
    let cache = AssetCache::default();
    let log = |m: &str| eprintln!("{m}");
    let gguf = cache.smollm2(&log)?;
    let tasks_dir = cache.olmo_tasks(&log)?;
    let tok = TextTokenizer::load(&gguf)?;
    let (n_train, n_dev, n_test, seeds) = if args.full {
        (0, 500, 0, 3)
    } else {
        (args.train, args.dev, args.test, args.seeds)
    };
    let cut = |v: Vec<Question>, n: usize| {
        if n == 0 {
            v
        } else {
            v.into_iter().take(n).collect()
        }
    };
    let mut data = BTreeMap::new();
    for task in TASKS {
        let validation = llm::tasks::load(&tasks_dir, task, Split::Validation)?;
        let dev = cut(validation.clone(), n_dev);
        let test = if task.has_test() {
            cut(llm::tasks::load(&tasks_dir, task, Split::Test)?, n_test)
        } else {
            cut(validation[dev.len()..].to_vec(), n_test)
        };
        let train = cut(llm::tasks::load(&tasks_dir, task, Split::Train)?, n_train);
        data.insert(task, Data { train, dev, test });
    }
    let device = Default::default();
    let base_config = llama::load::<Inner>(&gguf, &PlacementConfig::new(), &device)?
        .config()
        .clone();
    let cfg = LlmFinetuneConfig::new()
        .with_max_len(256)
        .with_batch_size(8);
    let mut sections = vec![header(&args, &data, &cfg)];
    let has = |p: &str| args.parts.iter().any(|x| x == p);
    let t0 = Instant::now();

    // 1. Zero-shot.
    let mut zero = BTreeMap::new();
    for task in TASKS {
        let path = args
            .runs
            .join("zero-shot")
            .join(format!("{}.json", task.name()));
        let r: EvalResult = cached(
            &path,
            || {
                let m = llama::load::<Inner>(&gguf, &PlacementConfig::new(), &device)?;
                Ok(llm::evaluate(
                    &m,
                    &tok,
                    &data[&task].test,
                    cfg.max_len,
                    cfg.eval_batch_tokens,
                    &device,
                )?)
            },
            has("zero-shot"),
        )?;
        eprintln!(
            "[{:.0} s] zero-shot {}: {:.4}",
            t0.elapsed().as_secs_f64(),
            task.name(),
            r.acc
        );
        zero.insert(task, r);
    }
    sections.push(zero_table(&zero));

    // 2. Learning rate per method, on ARC-Easy's dev questions.
    let lrs = [1e-3, 3e-3];
    let mut chosen = BTreeMap::new();
    let arc_e = &data[&TaskKind::ArcEasy];
    let select_data = Data {
        train: if args.full {
            arc_e.train.clone()
        } else {
            arc_e
                .train
                .iter()
                .take(args.select_train)
                .cloned()
                .collect()
        },
        dev: arc_e.dev.clone(),
        test: Vec::new(),
    };
    for (m, _) in methods() {
        let mut best = (lrs[0], -1.0);
        for lr in lrs {
            let path = args.runs.join("select").join(format!("{m}-lr{lr}.json"));
            let r: RunResult = cached(
                &path,
                || {
                    train_run(
                        &gguf,
                        &tok,
                        m,
                        TaskKind::ArcEasy,
                        &select_data,
                        lr,
                        0,
                        &cfg,
                        &base_config,
                        &device,
                        None,
                        false,
                    )
                    .map(|(r, _)| r)
                },
                has("select"),
            )?;
            if r.report.best.acc > best.1 {
                best = (lr, r.report.best.acc);
            }
        }
        eprintln!(
            "[{:.0} s] {m}: lr {} (dev {:.3})",
            t0.elapsed().as_secs_f64(),
            best.0,
            best.1
        );
        chosen.insert(m, best.0);
    }

    // 3. Every method on every task.
    let mut results: BTreeMap<(&str, TaskKind), Vec<RunResult>> = BTreeMap::new();
    for (m, _) in methods() {
        for task in TASKS {
            for seed in 0..seeds {
                let dir = args
                    .runs
                    .join("methods")
                    .join(format!("{m}-{}-seed{seed}", task.name()));
                let r: RunResult = cached(
                    &dir.join("result.json"),
                    || {
                        let (r, adapters) = train_run(
                            &gguf,
                            &tok,
                            m,
                            task,
                            &data[&task],
                            chosen[m],
                            seed,
                            &cfg,
                            &base_config,
                            &device,
                            None,
                            true,
                        )?;
                        std::fs::create_dir_all(&dir)?;
                        adapters.write(dir.join("adapter.safetensors"))?;
                        Ok(r)
                    },
                    has("methods"),
                )?;
                eprintln!(
                    "[{:.0} s] {m} {}: {:.4}",
                    t0.elapsed().as_secs_f64(),
                    task.name(),
                    r.test.acc
                );
                results.entry((m, task)).or_default().push(r);
            }
        }
    }
    sections.push(methods_table(&zero, &results, &chosen));

    // 4. Sequential: ARC-Challenge, then ARC-Easy starting from that adapter.
    let mut sequential = Vec::new();
    for m in ["lora8", "kron-lora"] {
        let first = args
            .runs
            .join("methods")
            .join(format!("{m}-arc_challenge-seed0"));
        let path = args.runs.join("sequential").join(format!("{m}.json"));
        let r: SequentialResult = cached(
            &path,
            || {
                let adapters = NativeAdapters::read(first.join("adapter.safetensors"))?;
                let before: RunResult =
                    serde_json::from_slice(&std::fs::read(first.join("result.json"))?)?;
                let (after_e, adapters_e) = train_run(
                    &gguf,
                    &tok,
                    m,
                    TaskKind::ArcEasy,
                    &data[&TaskKind::ArcEasy],
                    chosen[m],
                    0,
                    &cfg,
                    &base_config,
                    &device,
                    Some(&adapters),
                    true,
                )?;
                let model = with_adapters(&gguf, &adapters_e, &device)?;
                let c_after = llm::evaluate(
                    &model,
                    &tok,
                    &data[&TaskKind::ArcChallenge].test,
                    cfg.max_len,
                    cfg.eval_batch_tokens,
                    &device,
                )?;
                Ok(SequentialResult {
                    method: m.into(),
                    arc_c_after_c: before.test.acc,
                    arc_e_after_e: after_e.test.acc,
                    arc_c_after_e: c_after.acc,
                })
            },
            has("sequential"),
        )?;
        eprintln!(
            "[{:.0} s] sequential {m}: {r:?}",
            t0.elapsed().as_secs_f64()
        );
        sequential.push(r);
    }
    sections.push(sequential_table(&sequential, &zero));

    // 5. Quantized adapters: Kron-LoRA and LoRA-8 on ARC-Easy and PIQA.
    let schemes = [
        QuantConfig::new(8, Level::Tensor)?,
        QuantConfig::new(8, Level::Block(32))?,
        QuantConfig::new(4, Level::Tensor)?,
        QuantConfig::new(4, Level::Block(32))?,
    ];
    let mut quant = Vec::new();
    for m in ["lora8", "kron-lora"] {
        for task in [TaskKind::ArcEasy, TaskKind::Piqa] {
            let run = args
                .runs
                .join("methods")
                .join(format!("{m}-{}-seed0", task.name()));
            let path = args
                .runs
                .join("quant")
                .join(format!("{m}-{}.json", task.name()));
            let r: QuantResult = cached(
                &path,
                || {
                    let float = NativeAdapters::read(run.join("adapter.safetensors"))?;
                    let base: RunResult =
                        serde_json::from_slice(&std::fs::read(run.join("result.json"))?)?;
                    let mut rows = Vec::new();
                    for s in schemes {
                        let q = QuantizedAdapters::quantize(&float, s)?;
                        let bytes = q.to_bytes()?.len();
                        let model = with_adapters(&gguf, &q.dequantize(), &device)?;
                        let e = llm::evaluate(
                            &model,
                            &tok,
                            &data[&task].test,
                            cfg.max_len,
                            cfg.eval_batch_tokens,
                            &device,
                        )?;
                        rows.push((s.to_string(), e.acc, bytes));
                    }
                    Ok(QuantResult {
                        method: m.into(),
                        task: task.name().into(),
                        float_acc: base.test.acc,
                        float_bytes: float.to_bytes()?.len(),
                        rows,
                    })
                },
                has("quant"),
            )?;
            eprintln!(
                "[{:.0} s] quant {m} {}",
                t0.elapsed().as_secs_f64(),
                task.name()
            );
            quant.push(r);
        }
    }
    sections.push(quant_table(&quant));

    // 6. Step time and peak memory at two widths, each method in its own process, in
    // alternating rounds (skipped, with its table, when not asked for and not measured before).
    let mut timing = Vec::new();
    let measured_before = args.runs.join("timing").join("lora8-smollm2.json").exists();
    let rounds = args.timing_rounds.max(1);
    for width in ["smollm2", "mistral7b-layer"]
        .into_iter()
        .filter(|_| has("timing") || measured_before)
    {
        let path = |m: &str| args.runs.join("timing").join(format!("{m}-{width}.json"));
        // Any method missing: every method again, so that the rounds pair up (LoRA-8's round
        // `i` ran beside every other method's round `i`).
        let missing = methods().iter().any(|(m, _)| !path(m).exists());
        if missing && has("timing") {
            let mut runs: BTreeMap<&str, Vec<Measured>> = BTreeMap::new();
            for round in 1..=rounds {
                for (m, _) in methods() {
                    let r = measure_child(m, width)?;
                    eprintln!(
                        "[{:.0} s] timing {m} {width}, round {round}/{rounds}: {:.0} ms, {:.0} MB",
                        t0.elapsed().as_secs_f64(),
                        r.step_ms,
                        r.peak_mb
                    );
                    runs.entry(m).or_default().push(r);
                }
            }
            for (m, v) in runs {
                let median_of =
                    |f: fn(&Measured) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
                let r = Measured {
                    step_ms: median_of(|r| r.step_ms),
                    peak_mb: median_of(|r| r.peak_mb),
                    start_mb: median_of(|r| r.start_mb),
                    trainable: v[0].trainable,
                    tokens: v[0].tokens,
                    rounds_ms: v.iter().map(|r| r.step_ms).collect(),
                };
                save(&path(m), &r)?;
            }
        }
        for (m, _) in methods() {
            let r: Measured = cached(
                &path(m),
                || Err(format!("timing {m} {width}: not measured").into()),
                false,
            )?;
            timing.push((width, m, r));
        }
    }
    if !timing.is_empty() {
        sections.push(timing_table(&timing));
    }

    common::write_between(
        &args.results,
        "# Results on a decoder",
        BEGIN,
        END,
        &sections.join("\n"),
    )?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.results.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

const BEGIN: &str = "<!-- llm-compare:begin (written by examples/llm_compare.rs) -->";
const END: &str = "<!-- llm-compare:end -->";

/// Reads a result back if it exists; otherwise runs `f` (when `allowed`) and stores it.
fn cached<T: Serialize + for<'de> Deserialize<'de>>(
    path: &Path,
    f: impl FnOnce() -> Res<T>,
    allowed: bool,
) -> Res<T> {
    if let Ok(bytes) = std::fs::read(path) {
        return Ok(serde_json::from_slice(&bytes)?);
    }
    if !allowed {
        return Err(format!(
            "{} is missing and its part was not asked for",
            path.display()
        )
        .into());
    }
    let value = f()?;
    save(path, &value)?;
    Ok(value)
}

/// Writes `value` to `path` as JSON (its folder made, the file replaced atomically).
fn save<T: Serialize>(path: &Path, value: &T) -> Res<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    kron_adapters::store::st::write_atomic(path, &serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

/// The base with `adapters` attached (inference backend).
fn with_adapters(
    gguf: &Path,
    adapters: &NativeAdapters,
    device: &burn::tensor::Device<Inner>,
) -> Res<LlamaForCausalLM<Inner>> {
    let m = llama::load::<Inner>(gguf, &PlacementConfig::new(), device)?;
    Ok(attach(m, adapters, &NameMap::new(), device)?)
}

/// One fine-tuning run (optionally starting from `start`'s adapters); with `test`, the test
/// accuracy of the best dev model. Returns the result and the adapters.
#[allow(clippy::too_many_arguments)]
fn train_run(
    gguf: &Path,
    tok: &TextTokenizer,
    method: &str,
    task: TaskKind,
    data: &Data,
    lr: f64,
    seed: u64,
    cfg: &LlmFinetuneConfig,
    base: &LlamaConfig,
    device: &burn::tensor::Device<Train>,
    start: Option<&NativeAdapters>,
    test: bool,
) -> Res<(RunResult, NativeAdapters)> {
    <Train as burn::tensor::backend::Backend>::seed(device, seed);
    let cfg = cfg
        .clone()
        .with_placement(placement(method, base))
        .with_lr(lr)
        .with_seed(seed);
    let model = match start {
        None => llama::load::<Train>(gguf, &cfg.placement, device)?,
        Some(a) => attach(
            llama::load::<Train>(gguf, &PlacementConfig::new(), device)?,
            a,
            &NameMap::new(),
            device,
        )?,
    };
    let (model, report) = finetune_mc(model, tok, &data.train, &data.dev, &cfg, device, &|m| {
        eprintln!("  {method} {}: {m}", task.name())
    })?;
    let adapters = NativeAdapters::from_model(&model);
    let test = if test {
        llm::evaluate(
            &model.valid(),
            tok,
            &data.test,
            cfg.max_len,
            cfg.eval_batch_tokens,
            device,
        )?
    } else {
        report.best.clone()
    };
    let trainable = adapters.num_params();
    Ok((
        RunResult {
            method: method.into(),
            task: task.name().into(),
            seed,
            lr,
            trainable,
            test,
            report,
        },
        adapters,
    ))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SequentialResult {
    method: String,
    arc_c_after_c: f64,
    arc_e_after_e: f64,
    arc_c_after_e: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct QuantResult {
    method: String,
    task: String,
    float_acc: f64,
    float_bytes: usize,
    rows: Vec<(String, f64, usize)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Measured {
    step_ms: f64,
    /// The process's peak resident memory, MB.
    peak_mb: f64,
    /// Its resident memory before the model was built, MB (0 in runs from before stop 46).
    #[serde(default)]
    start_mb: f64,
    trainable: usize,
    tokens: usize,
    /// Each round's `step_ms` (the timing part's rounds; empty in one measurement).
    #[serde(default)]
    rounds_ms: Vec<f64>,
}

/// One method's training step at one width, measured in a child process (`--measure`).
fn measure_child(method: &str, width: &str) -> Res<Measured> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--measure", &format!("{method}:{width}")])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "measure {method} {width}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A Mistral-7B layer: one block at its widths, a small vocabulary.
fn mistral_layer() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 256,
        num_hidden_layers: 1,
        max_position_embeddings: 4096,
        bos_token_id: None,
        eos_token_ids: vec![],
        ..LlamaConfig::mistral_7b()
    }
}

/// Peak resident memory of this process, MB (Linux: VmHWM).
fn peak_mb() -> f64 {
    kron_adapters::finetune::timing::memory_bytes().map_or(0.0, |(_, peak)| peak as f64 / 1048576.0)
}

/// Times training steps (forward, masked loss, backward, AdamW) of one method at one width:
/// `smollm2` (the GGUF's weights), `smollm2-random` (its shapes, random weights: no asset
/// needed, for `scripts/side_by_side.py --decoder` and a GPU machine without network),
/// `mistral7b-layer`.
fn measure(
    spec: &str,
    parts: Option<usize>,
    steps: usize,
    shape: Option<(usize, usize)>,
) -> Res<()> {
    let start_mb = kron_adapters::finetune::timing::memory_bytes()
        .map_or(0.0, |(resident, _)| resident as f64 / 1048576.0);
    let (method, width) = spec.split_once(':').ok_or("METHOD:WIDTH")?;
    // As the training loops (`finetune_mc`) do: the Kronecker apply's own backward and, on
    // flex, the host GELU/SiLU nodes.
    kron_adapters::kron::autodiff::register_backward::<Train>();
    let device = Default::default();
    // The file outlives the source, which dequantizes from it as the model takes tensors.
    let file;
    let (config, source, batch, seq) = match width {
        "smollm2" => {
            let gguf = AssetCache::default().smollm2(&|_| {})?;
            file = kron_adapters::store::gguf::GgufFile::read(&gguf)?;
            let (source, config) = llama::gguf_source(&file, &gguf.display().to_string())?;
            (config, source, 8, 64)
        }
        "smollm2-random" => (LlamaConfig::smollm2_135m(), TensorSource::random(1), 8, 64),
        "mistral7b-layer" => (mistral_layer(), TensorSource::random(1), 1, 2048),
        other => {
            return Err(format!(
                "width `{other}`: expected smollm2, smollm2-random or mistral7b-layer"
            )
            .into())
        }
    };
    let (batch, seq) = shape.unwrap_or((batch, seq));
    if seq > config.max_position_embeddings {
        return Err(format!(
            "--measure-shape: {seq} tokens a sequence; {width} has {} positions",
            config.max_position_embeddings
        )
        .into());
    }
    let mut source = source;
    let p = placement(method, &config);
    let model = LlamaForCausalLM::<Train>::new(&mut source, &config, &p, &device)?;
    let trainable = NativeAdapters::from_model(&model).num_params();
    let mut rng = kron_adapters::rng::SplitMix64::new(1);
    let batch: Vec<Encoded> = (0..batch)
        .map(|_| Encoded {
            ids: (0..seq)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect(),
            start: seq / 2,
        })
        .collect();
    let refs: Vec<&Encoded> = batch.iter().collect();
    let parts = parts.unwrap_or_else(|| kron_adapters::shards::default_parts::<Train>(&device));
    let tokens: usize = refs.iter().map(|e| e.continuation().len()).sum();
    let mut optim = kron_adapters::optim::adamw(&AdamWConfig::new());
    let mut model = Some(model);
    let mut times = Vec::new();
    for _ in 0..steps {
        let m = model.take().expect("put back");
        let t = Instant::now();
        let (grads, _) = kron_adapters::shards::gradients(&m, refs.len(), parts, 0, |m, p| {
            let loss = masked_nll_share(m, &refs[p.range.clone()], tokens, &device);
            let _ = loss.clone().into_data();
            (loss, ())
        })?;
        let m = optim.step(1e-4, m, grads);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        model = Some(m);
    }
    let step_ms = times[1..].iter().sum::<f64>() / (times.len() - 1) as f64;
    let r = Measured {
        step_ms,
        peak_mb: peak_mb(),
        start_mb,
        trainable,
        tokens: refs.len() * seq,
        rounds_ms: Vec::new(),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn header(args: &Args, data: &BTreeMap<TaskKind, Data>, cfg: &LlmFinetuneConfig) -> String {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sizes: Vec<String> = data
        .iter()
        .map(|(t, d)| {
            format!(
                "{} {}/{}/{}",
                t.name(),
                d.train.len(),
                d.dev.len(),
                d.test.len()
            )
        })
        .collect();
    format!(
        "Produced by `cargo run --release --features full --example llm_compare{}` at commit `{commit}`, on {cpu} ({cores} cores), backend {}. SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32). Questions per task train/dev/eval: {}; evaluation on ARC's test split, elsewhere on validation questions after the dev ones. One epoch, batch {}, AdamW, warm-up 6% and linear decay, {} dev evaluations (the best kept), sequences cut at {} tokens; the learning rate of each method chosen from 1e-3 and 3e-3 on ARC-Easy's dev questions ({} training questions).\n",
        if args.full { " -- --full" } else { "" },
        backend_name(),
        sizes.join(", "),
        cfg.batch_size,
        cfg.evals,
        cfg.max_len,
        if args.full { "all".to_string() } else { args.select_train.to_string() }
    )
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

fn mean_std(v: &[f64]) -> String {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return pct(m);
    }
    let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    format!("{} ± {}", pct(m), pct(s))
}

fn zero_table(zero: &BTreeMap<TaskKind, EvalResult>) -> String {
    let mut s = String::from("### Zero-shot (the floor)\n\n| task | questions | acc | acc_norm |\n| --- | ---: | ---: | ---: |\n");
    for (t, r) in zero {
        s += &format!(
            "| {} | {} | {} | {} |\n",
            t.name(),
            r.n,
            pct(r.acc),
            pct(r.acc_norm)
        );
    }
    s
}

fn methods_table(
    zero: &BTreeMap<TaskKind, EvalResult>,
    results: &BTreeMap<(&str, TaskKind), Vec<RunResult>>,
    chosen: &BTreeMap<&str, f64>,
) -> String {
    let mut s = String::from(
        "### Methods (accuracy %, mean ± std over seeds)\n\n| method | trainable params | lr |",
    );
    for t in TASKS {
        s += &format!(" {} |", t.name());
    }
    s += " mean |\n| --- | ---: | ---: |";
    for _ in TASKS {
        s += " ---: |";
    }
    s += " ---: |\n| zero-shot | 0 | — |";
    for t in TASKS {
        s += &format!(" {} |", pct(zero[&t].acc));
    }
    s += &format!(
        " {} |\n",
        pct(TASKS.iter().map(|t| zero[t].acc).sum::<f64>() / TASKS.len() as f64)
    );
    for (m, name) in methods() {
        let params = results
            .get(&(m, TaskKind::ArcEasy))
            .and_then(|r| r.first())
            .map_or(0, |r| r.trainable);
        s += &format!("| {name} | {params} | {:e} |", chosen[m]);
        let mut means = Vec::new();
        for t in TASKS {
            let accs: Vec<f64> = results
                .get(&(m, t))
                .map(|v| v.iter().map(|r| r.test.acc).collect())
                .unwrap_or_default();
            means.push(accs.iter().sum::<f64>() / accs.len().max(1) as f64);
            s += &format!(" {} |", mean_std(&accs));
        }
        s += &format!(
            " {} |\n",
            pct(means.iter().sum::<f64>() / means.len() as f64)
        );
    }
    let step = |m: &str| {
        let v: Vec<f64> = TASKS
            .iter()
            .filter_map(|t| results.get(&(m, *t)))
            .flatten()
            .map(|r| r.report.median_step_ms)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    s += "\nMedian training step (ms, mean over the tasks): ";
    s += &methods()
        .iter()
        .map(|(m, _)| format!("{m} {:.0}", step(m)))
        .collect::<Vec<_>>()
        .join(", ");
    s += &format!(
        " — Kron-LoRA / LoRA-8 = {:.3}, KronA / LoRA-8 = {:.3}.\n",
        step("kron-lora") / step("lora8"),
        step("krona") / step("lora8")
    );
    s
}

fn sequential_table(seq: &[SequentialResult], zero: &BTreeMap<TaskKind, EvalResult>) -> String {
    let mut s = String::from("### Sequential fine-tuning: ARC-Challenge, then ARC-Easy\n\n| method | ARC-C after ARC-C | ARC-E after ARC-E | ARC-C after ARC-E (retained) | retained / after ARC-C |\n| --- | ---: | ---: | ---: | ---: |\n");
    s += &format!(
        "| zero-shot | {} | {} | — | — |\n",
        pct(zero[&TaskKind::ArcChallenge].acc),
        pct(zero[&TaskKind::ArcEasy].acc)
    );
    for r in seq {
        s += &format!(
            "| {} | {} | {} | {} | {:.3} |\n",
            r.method,
            pct(r.arc_c_after_c),
            pct(r.arc_e_after_e),
            pct(r.arc_c_after_e),
            r.arc_c_after_e / r.arc_c_after_c
        );
    }
    s
}

fn quant_table(q: &[QuantResult]) -> String {
    let mut s = String::from("### Quantized adapters (accuracy %, change from float32; file bytes)\n\n| method | task | float32 |");
    let names: Vec<String> = q
        .first()
        .map(|r| r.rows.iter().map(|x| x.0.clone()).collect())
        .unwrap_or_default();
    for n in &names {
        s += &format!(" {n} |");
    }
    s += "\n| --- | --- | ---: |";
    for _ in &names {
        s += " ---: |";
    }
    s += "\n";
    for r in q {
        s += &format!(
            "| {} | {} | {} ({} B) |",
            r.method,
            r.task,
            pct(r.float_acc),
            r.float_bytes
        );
        for (_, acc, bytes) in &r.rows {
            s += &format!(
                " {} ({:+.2}; {} B) |",
                pct(*acc),
                100.0 * (acc - r.float_acc),
                bytes
            );
        }
        s += "\n";
    }
    s
}

fn timing_table(t: &[(&str, &str, Measured)]) -> String {
    let rounds = t
        .iter()
        .map(|x| x.2.rounds_ms.len().max(1))
        .max()
        .unwrap_or(1);
    let how = if rounds > 1 {
        format!(
            "; each figure the median of {rounds} alternating rounds (every method once a round, each in a process of its own), the step's × LoRA-8 the median of the rounds' own ratios"
        )
    } else {
        String::new()
    };
    let mut s = format!("### Training step and peak memory against LoRA-8\n\nOne step (forward, loss on the second half of each sequence, backward, AdamW), mean of steps 2–3; peak resident memory of a process that builds the model and runs the steps{how}. SmolLM2: the real model, batch 8 × 64 tokens. Mistral-7B layer: one decoder block at its widths (hidden 4096, 32/8 heads, FFN 14,336), random weights, 1 × 2,048 tokens.\n\n| width | method | trainable params | ms / step | × LoRA-8 | peak MB | × LoRA-8 |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for (w, m, r) in t {
        let base = t
            .iter()
            .find(|(w2, m2, _)| w2 == w && *m2 == "lora8")
            .map(|x| &x.2)
            .unwrap_or(r);
        // Round by round where both have the same rounds; else the medians' ratio.
        let ratio = if !r.rounds_ms.is_empty() && r.rounds_ms.len() == base.rounds_ms.len() {
            median(
                &r.rounds_ms
                    .iter()
                    .zip(&base.rounds_ms)
                    .map(|(a, b)| a / b)
                    .collect::<Vec<_>>(),
            )
        } else {
            r.step_ms / base.step_ms
        };
        s += &format!(
            "| {w} | {m} | {} | {:.0} | {:.3} | {:.0} | {:.3} |\n",
            r.trainable,
            r.step_ms,
            ratio,
            r.peak_mb,
            r.peak_mb / base.peak_mb
        );
    }
    s
}
