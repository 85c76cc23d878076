//! Training-step times per method, as JSON (for the side-by-side runner against PyTorch + PEFT,
//! `scripts/side_by_side.py`): of the MiniLM encoder, or with `--layer D_IN,D_OUT` of one frozen
//! linear layer at an LLM's width. With `--methods` naming one method the JSON's `peak_mb` is
//! that method's peak resident memory (the process's peak; `start_mb`: what it held at start).
//! With `--interleave` the methods' steps alternate, one step each a round, and the JSON gains
//! each method's `round_ms` and `vs_first` (the median of its rounds' ratios to the first method
//! `--methods` names, or the first of the list without it): ratios that a drifting shared
//! machine moves less than method-after-method timing.
//!
//! ```text
//! cargo run --release --features full --example step_time -- --batch 32 --seq 64
//! cargo run --release --features full --example step_time -- --layer 4096,14336 --tokens 2048 --methods kron_lora_r8
//! cargo run --release --features full,cuda --example step_time -- --layer 4096,4096 --fused-kernel
//! cargo run --release --features full --example step_time -- --interleave --methods lora_r1,krona_48x8 --budget 30
//! ```

mod common;

use clap::Parser;
use common::{backend_name, Train};
use kron_adapters::finetune::timing::{
    interleaved_ms, layer_step, median, memory_bytes, round_ratios, step_ms, train_step,
};
use kron_adapters::model::BertConfig;
use kron_adapters::{
    AdapterConfig, KronAConfig, KronLoraConfig, LoraConfig, PlacementConfig, TrainMode,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Seconds of timing per method.
    #[arg(long, default_value_t = 10.0)]
    budget: f64,
    /// Time one frozen linear layer of this width (`D_IN,D_OUT`, e.g. `4096,14336`) with each
    /// adapter instead of the MiniLM encoder; methods `full` (the layer trained), `lora_r8`,
    /// `krona` (PEFT's factor shapes), `kron_lora_r8`.
    #[arg(long, value_parser = parse_width)]
    layer: Option<(usize, usize)>,
    /// Rows of the layer's input with `--layer`.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Parts of each batch (or the layer's rows) computed at once (`kron_adapters::shards`);
    /// the training loops' default when absent (2 on flex and ndarray, 1 elsewhere).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    parts: Option<u64>,
    /// Only these methods (comma-separated keys of the JSON); all when absent.
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Differentiate the Kronecker apply's `a` contraction with Burn's generic backward instead
    /// of the crate's hand-written one (which the training loops use).
    #[arg(long)]
    burn_backward: bool,
    /// Run the Kronecker apply's adjacent `a`/`b` steps as one launch of the fused CubeCL kernel
    /// (`kron::cube`; GPU backends without `fusion`).
    #[arg(long)]
    fused_kernel: bool,
    /// Alternate the methods' steps (one step of each a round, the order rotating) for `budget`
    /// seconds per method in all, all models held at once; adds each method's `round_ms` and
    /// `vs_first` (the median of its rounds' ratios to the first method `--methods` names). Its
    /// `peak_mb` is all the methods' together.
    #[arg(long)]
    interleave: bool,
}

fn parse_width(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("`{s}`: expected D_IN,D_OUT, e.g. 4096,14336"))?;
    let parse = |v: &str| match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{v}` in `{s}`: expected a positive width")),
    };
    Ok((parse(a)?, parse(b)?))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    let start = memory_bytes();
    let args = Args::parse();
    if !args.burn_backward {
        kron_adapters::kron::autodiff::register_backward::<Train>();
    }
    if args.fused_kernel && !common::register_fused_kernel() {
        return Err(format!(
            "--fused-kernel: the fused kernel runs on the GPU backends without `fusion` (built with `{}`)",
            backend_name()
        )
        .into());
    }
    let device = Default::default();
    let parts = args.parts.map_or_else(
        || kron_adapters::shards::default_parts::<Train>(&device),
        |p| p as usize,
    );
    // Dropout off, as the PyTorch side runs in eval mode.
    let bert = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::minilm_l6()
    };
    let lin = PlacementConfig::linear;
    let methods = [
        ("full", PlacementConfig::mode(TrainMode::Full)),
        ("lora_r1", lin(AdapterConfig::Lora(LoraConfig::new(1)))),
        ("krona", lin(AdapterConfig::KronA(KronAConfig::auto()))),
        (
            "krona_2x192",
            lin(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([2, 192]),
            )),
        ),
        (
            "krona_48x8",
            lin(AdapterConfig::KronA(
                KronAConfig::auto().with_a_shape([48, 8]),
            )),
        ),
        (
            "kron_lora_r12",
            lin(AdapterConfig::KronLora(KronLoraConfig::auto(12))),
        ),
    ];
    let mut out = serde_json::Map::new();
    out.insert("backend".into(), backend_name().into());
    out.insert("burn_backward".into(), args.burn_backward.into());
    out.insert("fused_kernel".into(), args.fused_kernel.into());
    out.insert("parts".into(), parts.into());
    let wanted = |key: &str| args.methods.is_empty() || args.methods.iter().any(|m| m == key);
    // Where `--methods` names them, in its order (the first is `vs_first`'s reference).
    let rank = |key: &str| args.methods.iter().position(|m| m == key);
    let layer_methods = [
        ("full", None),
        ("lora_r8", Some(AdapterConfig::Lora(LoraConfig::new(8)))),
        ("krona", Some(AdapterConfig::KronA(KronAConfig::auto()))),
        (
            "kron_lora_r8",
            Some(AdapterConfig::KronLora(KronLoraConfig::auto(8))),
        ),
    ];
    let known: Vec<&str> = match args.layer {
        Some(_) => layer_methods.iter().map(|m| m.0).collect(),
        None => methods.iter().map(|m| m.0).collect(),
    };
    if let Some(bad) = args.methods.iter().find(|m| !known.contains(&m.as_str())) {
        return Err(format!(
            "unknown method `{bad}`; expected one of {}",
            known.join(", ")
        )
        .into());
    }
    // The methods asked for, in `--methods`' order where it names them (the first is
    // `vs_first`'s reference), each built only when it is timed.
    let mut keys: Vec<&str> = known.into_iter().filter(|k| wanted(k)).collect();
    keys.sort_by_key(|k| rank(k));
    let build = |key: &str| match args.layer {
        Some((d_in, d_out)) => {
            let adapter = layer_methods
                .iter()
                .find(|m| m.0 == key)
                .and_then(|m| m.1.as_ref());
            layer_step::<Train>(d_in, d_out, adapter, args.tokens, parts, &device)
        }
        None => {
            let peft = &methods.iter().find(|m| m.0 == key).expect("a known key").1;
            train_step::<Train>(&bert, peft, args.batch, args.seq, parts, &device)
        }
    };
    if args.interleave {
        let mut steps = keys
            .iter()
            .map(|k| build(k))
            .collect::<Result<Vec<_>, _>>()?;
        let budget = args.budget * steps.len() as f64;
        let times = interleaved_ms(&mut steps, 2, budget)?;
        let ratios = round_ratios(&times, 0);
        for (i, key) in keys.into_iter().enumerate() {
            let ms = median(&times[i]);
            let vs_first = median(&ratios[i]);
            eprintln!("{key}: {ms:.0} ms, {vs_first:.3}x the first method by the rounds' median");
            out.insert(
                key.into(),
                serde_json::json!({
                    "ms": ms,
                    "trainable": steps[i].trainable,
                    "round_ms": times[i],
                    "vs_first": vs_first,
                }),
            );
        }
        out.insert("interleaved".into(), true.into());
    } else {
        for key in keys {
            let (ms, trainable) = step_ms(build(key)?, args.budget)?;
            eprintln!("{key}: {ms:.0} ms ({trainable} trainable)");
            out.insert(
                key.into(),
                serde_json::json!({ "ms": ms, "trainable": trainable }),
            );
        }
    }
    if let (Some((start, _)), Some((_, peak))) = (start, memory_bytes()) {
        out.insert("start_mb".into(), (start as f64 / 1048576.0).into());
        out.insert("peak_mb".into(), (peak as f64 / 1048576.0).into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
