//! A bounded load generator for the adapter server (docs/serving.md): MiniLM with N resident
//! KronA adapters (synthetic run folders: random factors, random heads), classification requests
//! of Rotten Tomatoes test sentences spread uniformly over the adapters, from a fixed number of
//! client threads over loopback — a fixed request count and a time limit per setup. For each
//! batching mode (mixed, one adapter a batch, a merged model per adapter) and each N it prints
//! throughput, p50/p99 latency, the mean batch, the time to load the adapters and the memory the
//! model and adapters take.
//!
//! ```text
//! cargo run --release --features serve,flex --example loadgen -- --adapters 1,10,100,1000
//! ```

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::nn::LinearConfig;
use clap::Parser;
use common::Inner as Cpu;
use kron_adapters::finetune::data::{rotten_tomatoes, SPLIT_SEED};
use kron_adapters::finetune::AssetCache;
use kron_adapters::model::bert::load_pretrained;
use kron_adapters::rng::SplitMix64;
use kron_adapters::serve::{client, spawn, Batching, Model, ServeConfig};
use kron_adapters::store::{save_params_matching, CheckpointMeta};
use kron_adapters::{
    place, AdapterConfig, AdapterError, AdapterLayers, FactorInit, KronAConfig, NativeAdapters,
    PlacementConfig,
};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Resident adapter counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    adapters: Vec<usize>,
    /// Batching modes: mixed, per-adapter, merged.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mixed,per-adapter,merged"
    )]
    modes: Vec<String>,
    /// Requests per setup (after a warm-up of one per client).
    #[arg(long, default_value_t = 512)]
    requests: usize,
    /// Concurrent clients (each waits for its answer before sending again).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds a setup may send requests at most.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// The server's batching window, milliseconds.
    #[arg(long, default_value_t = 5)]
    window_ms: u64,
    /// The server's largest batch.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Skip a merged setup whose weights would take more than this share of the available
    /// memory.
    #[arg(long, default_value_t = 0.5)]
    memory_share: f64,
    /// Where the synthetic adapters are written (reused across runs).
    #[arg(long, default_value = "runs/loadgen")]
    dir: PathBuf,
    /// Write the rows as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<(), AdapterError> {
    let args = Args::parse();
    // As `kron-adapters serve` does: freed buffers stay in the process.
    kron_adapters::finetune::keep_freed_memory();
    let modes: Vec<Batching> = args
        .modes
        .iter()
        .map(|m| match m.as_str() {
            "mixed" => Ok(Batching::Mixed),
            "per-adapter" => Ok(Batching::PerAdapter),
            "merged" => Ok(Batching::Merged),
            _ => Err(kron_adapters::ConfigError::invalid(
                "loadgen",
                "modes",
                format!("{m:?}: use mixed, per-adapter or merged"),
            )),
        })
        .collect::<Result<_, _>>()?;
    if args.requests == 0 || args.concurrency == 0 || args.adapters.contains(&0) {
        return Err(kron_adapters::ConfigError::invalid(
            "loadgen",
            "requests",
            "requests, concurrency and adapter counts must be at least 1",
        )
        .into());
    }
    let cache = AssetCache::default();
    let log = |m: &str| eprintln!("{m}");
    let minilm = cache.minilm(&log)?;
    let texts: Vec<String> = rotten_tomatoes(&cache.rotten_tomatoes(&log)?, SPLIT_SEED)?
        .test
        .into_iter()
        .map(|e| e.text)
        .collect();
    let device = Default::default();
    let most = args.adapters.iter().copied().max().unwrap_or(1);
    let (base_params, merged_bytes) = make_adapters(&minilm, &args.dir, most, &device)?;
    let available = mem_available().unwrap_or(u64::MAX);
    eprintln!(
        "{} backend; {} test sentences; base model {base_params} parameters ({:.1} MB); a merged \
         copy adds {:.1} MB",
        common::backend_name(),
        texts.len(),
        base_params as f64 * 4e-6,
        merged_bytes as f64 * 1e-6
    );
    println!(
        "| mode | adapters | requests | req/s | p50 ms | p99 ms | mean batch (rows) | load s | memory MB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &mode in &modes {
        for &n in &args.adapters {
            let need = n as u64 * merged_bytes as u64;
            if mode == Batching::Merged && need as f64 > args.memory_share * available as f64 {
                println!(
                    "| {mode:?} | {n} | — | not run: {:.1} GB of merged weights | | | | | {:.0} |",
                    need as f64 * 1e-9,
                    (base_params * 4) as f64 * 1e-6 + need as f64 * 1e-6
                );
                rows.push(json!({"mode": format!("{mode:?}"), "adapters": n, "skipped": true,
                                 "memory_mb": (base_params * 4) as f64 * 1e-6 + need as f64 * 1e-6}));
                continue;
            }
            let row = run_setup(&args, mode, n, &minilm, &texts, base_params, &device)?;
            println!(
                "| {mode:?} | {n} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
                row["completed"],
                row["throughput"].as_f64().unwrap_or(0.0),
                row["p50_ms"].as_f64().unwrap_or(0.0),
                row["p99_ms"].as_f64().unwrap_or(0.0),
                row["mean_batch_rows"].as_f64().unwrap_or(0.0),
                row["load_seconds"].as_f64().unwrap_or(0.0),
                row["memory_mb"].as_f64().unwrap_or(0.0),
            );
            rows.push(row);
        }
    }
    if let Some(out) = &args.out {
        let v = json!({"backend": common::backend_name(), "requests": args.requests,
                       "concurrency": args.concurrency, "window_ms": args.window_ms,
                       "max_batch": args.max_batch, "rows": rows});
        kron_adapters::store::st::write_atomic(out, v.to_string().as_bytes())?;
    }
    Ok(())
}

/// Writes `n` synthetic run folders (KronA on every linear layer, random factors, a random
/// 2-class head) under `dir`, keeping those already there; returns the base model's
/// parameters and the bytes a merged copy's adapted weights take.
fn make_adapters(
    minilm: &Path,
    dir: &Path,
    n: usize,
    device: &burn::tensor::Device<Cpu>,
) -> Result<(usize, usize), AdapterError> {
    let (clf, cfg) = load_pretrained::<Cpu>(minilm, &PlacementConfig::new(), 2, device)?;
    let base_params = burn::module::Module::num_params(&clf.encoder);
    let placement = PlacementConfig::linear(AdapterConfig::KronA(
        KronAConfig::auto().with_init(FactorInit::Normal),
    ));
    let merged_bytes = place(clf.clone(), &placement, device)?
        .adapter_specs()
        .iter()
        .map(|(_, s)| s.d_in * s.d_out * 4)
        .sum();
    for i in 0..n {
        let run = dir.join(format!("adapter-{i:04}"));
        if run.join("report.json").exists() {
            continue;
        }
        std::fs::create_dir_all(&run).map_err(|e| AdapterError::io(&run, e))?;
        let mut m = place(clf.clone(), &placement, device)?;
        m.head = LinearConfig::new(cfg.hidden_size, 2).init(device);
        NativeAdapters::from_model(&m).write(run.join("adapter.safetensors"))?;
        save_params_matching(
            &m,
            run.join("trainable.safetensors"),
            &[r"^head\."],
            &CheckpointMeta::new(m.adapter_specs()),
        )?;
        let report = json!({"config": {"max_len": 64, "placement": {"train": "Adapters"}},
                            "labels": ["rotten", "fresh"]});
        kron_adapters::store::st::write_atomic(
            &run.join("report.json"),
            report.to_string().as_bytes(),
        )?;
        if i % 100 == 99 {
            eprintln!("wrote {} adapters", i + 1);
        }
    }
    Ok((base_params, merged_bytes))
}

/// One setup: a server, `n` adapters loaded over HTTP, then the load.
fn run_setup(
    args: &Args,
    mode: Batching,
    n: usize,
    minilm: &Path,
    texts: &[String],
    base_params: usize,
    device: &burn::tensor::Device<Cpu>,
) -> Result<Value, AdapterError> {
    let config = ServeConfig::new()
        .with_window_ms(args.window_ms)
        .with_max_batch(args.max_batch)
        .with_batching(mode);
    let server = spawn(
        Model::<Cpu>::load(minilm, device)?,
        "127.0.0.1:0".parse().expect("a loopback address"),
        config,
        device,
    )?;
    let addr = server.addr;
    let t = Instant::now();
    for i in 0..n {
        let path = args.dir.join(format!("adapter-{i:04}"));
        let (st, v) = client::post_json(
            addr,
            "/v1/adapters",
            &json!({"name": format!("a{i}"), "path": path}),
        )
        .map_err(|e| AdapterError::io(addr.to_string(), e))?;
        if st != 201 {
            return Err(AdapterError::Incompatible {
                message: format!("loading {}: {st} {v}", path.display()),
            });
        }
    }
    let load_seconds = t.elapsed().as_secs_f64();
    let health = client::request(addr, "GET", "/health", b"", Duration::from_secs(10))
        .map_err(|e| AdapterError::io(addr.to_string(), e))?;
    let health: Value = serde_json::from_str(&health.1).unwrap_or_default();
    let adapter_bytes = health["adapters"]["bytes"].as_f64().unwrap_or(0.0);

    // One warm-up request per client, then the measured load.
    let send = |i: usize| {
        let mut rng = SplitMix64::new(i as u64);
        let adapter = format!("a{}", rng.below(n));
        let text = &texts[i % texts.len()];
        let t = Instant::now();
        let r = client::post_json(
            addr,
            "/v1/classify",
            &json!({"texts": [text], "adapter": adapter}),
        );
        (matches!(r, Ok((200, _))), t.elapsed())
    };
    std::thread::scope(|s| {
        for c in 0..args.concurrency {
            let send = &send;
            s.spawn(move || send(1_000_000 + c));
        }
    });
    let before = batch_totals(addr);
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(args.requests));
    let failed = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(args.time_limit);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.requests || Instant::now() > deadline {
                    break;
                }
                let (ok, took) = send(i);
                if ok {
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(took.as_secs_f64());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let wall = t.elapsed().as_secs_f64();
    let after = batch_totals(addr);
    let mut lat = latencies.into_inner().unwrap_or_else(|p| p.into_inner());
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
            * 1e3
    };
    let batches = after.0 - before.0;
    let mean_batch = if batches > 0.0 {
        (after.1 - before.1) / batches
    } else {
        0.0
    };
    drop(server);
    Ok(json!({
        "mode": format!("{mode:?}"),
        "adapters": n,
        "completed": lat.len(),
        "failed": failed.into_inner(),
        "seconds": wall,
        "throughput": lat.len() as f64 / wall,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_batch_rows": mean_batch,
        "load_seconds": load_seconds,
        "memory_mb": (base_params * 4) as f64 * 1e-6 + adapter_bytes * 1e-6,
    }))
}

/// Batches and rows the server has run so far.
fn batch_totals(addr: std::net::SocketAddr) -> (f64, f64) {
    let text = client::request(addr, "GET", "/metrics", b"", Duration::from_secs(10))
        .map(|r| r.1)
        .unwrap_or_default();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    (get("kron_batch_rows_count"), get("kron_batch_rows_sum"))
}

/// `MemAvailable` from /proc/meminfo, bytes (Linux).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
