//! The quantization study: KronA, Kron-LoRA and LoRA adapters trained by the method comparison
//! (`examples/compare.rs`, matched ~40k-parameter budgets, several seeds) have their factors
//! quantized to int8 and int4, per tensor and per block, and are evaluated again on the
//! Rotten Tomatoes test set; with the relative error `‖ΔW_q − ΔW‖ / ‖ΔW‖` and the adapter file
//! sizes. Writes its tables into `docs/results.md` between its own markers.
//!
//! ```text
//! cargo run --release --features full --example compare       # first: trains the adapters
//! cargo run --release --features full --example quant_study
//! ```

mod common;

use std::path::PathBuf;

use burn::module::AutodiffModule;
use clap::Parser;
use common::{backend_name, Inner, Train};
use kron_adapters::finetune::train::{build_model, evaluate, trainable_patterns};
use kron_adapters::finetune::{prepare, AssetCache, RunReport};
use kron_adapters::quant::{relative_error, Level, QuantConfig};
use kron_adapters::store::{
    attach as apply_adapters, load_params_matching, HostTensor, NativeAdapters, QuantizedAdapters,
};
use kron_adapters::NameMap;
use kron_adapters::{Adapter, LinearAdapter};

#[derive(Parser, Debug)]
struct Args {
    /// Where the comparison's runs are.
    #[arg(long, default_value = "runs/compare")]
    runs: PathBuf,
    /// The results file.
    #[arg(long, default_value = "docs/results.md")]
    results: PathBuf,
}

const METHODS: [(&str, &str); 3] = [
    ("krona", "KronA"),
    ("kron_lora", "Kron-LoRA (r = 12)"),
    ("lora", "LoRA (r = 1)"),
];

fn schemes() -> Vec<QuantConfig> {
    vec![
        QuantConfig::new(8, Level::Tensor).unwrap(),
        QuantConfig::new(8, Level::Block(32)).unwrap(),
        QuantConfig::new(4, Level::Tensor).unwrap(),
        QuantConfig::new(4, Level::Block(32)).unwrap(),
    ]
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

fn delta(
    adapters: &NativeAdapters,
    layer: &str,
) -> Result<HostTensor, kron_adapters::AdapterError> {
    let a: Adapter<Inner> = adapters.adapter(layer, &Default::default())?;
    Ok(HostTensor::from_tensor(a.delta_weight()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    let args = Args::parse();
    let device = Default::default();
    let mut data = None;
    let mut acc_rows = String::new();
    let mut err_rows = String::new();
    let mut size_rows = String::new();
    for (key, name) in METHODS {
        let dirs: Vec<PathBuf> = (0..10)
            .map(|s| args.runs.join(format!("{key}-seed{s}")))
            .filter(|d| d.join("report.json").exists())
            .collect();
        if dirs.is_empty() {
            eprintln!(
                "no runs for {key} in {}: run the comparison first",
                args.runs.display()
            );
            continue;
        }
        let mut float_acc = Vec::new();
        let mut q_acc: Vec<Vec<f64>> = vec![Vec::new(); schemes().len()];
        let mut q_err: Vec<Vec<f64>> = vec![Vec::new(); schemes().len()];
        let mut sizes = (0u64, vec![0u64; schemes().len()]);
        let mut params = 0;
        for dir in &dirs {
            let report: RunReport =
                serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?;
            let cfg = report.config.clone();
            if data.is_none() {
                data = Some(prepare(
                    &AssetCache::default(),
                    cfg.task,
                    cfg.max_len,
                    &|m| eprintln!("{m}"),
                )?);
            }
            let data = data.as_ref().unwrap();
            let model = build_model::<Train>(&cfg, data, &device)?;
            let (model, _) = load_params_matching(
                model,
                dir.join("trainable.safetensors"),
                &trainable_patterns(cfg.placement.train),
            )?;
            let model = model.valid();
            let acc = evaluate(&model, &data.test, cfg.eval_batch_size, &device)?;
            assert!(
                (acc - report.test_acc).abs() < 1e-9,
                "{}: reloaded {acc} vs reported {}",
                dir.display(),
                report.test_acc
            );
            float_acc.push(100.0 * acc);
            let native = NativeAdapters::from_model(&model);
            params = native.num_params();
            sizes.0 = native.to_bytes()?.len() as u64;
            for (i, scheme) in schemes().into_iter().enumerate() {
                let q = QuantizedAdapters::quantize(&native, scheme)?;
                sizes.1[i] = q.to_bytes()?.len() as u64;
                let deq = q.dequantize();
                let quantized_model =
                    apply_adapters(model.clone(), &deq, &NameMap::new(), &device)?;
                q_acc[i].push(
                    100.0 * evaluate(&quantized_model, &data.test, cfg.eval_batch_size, &device)?,
                );
                q_err[i].push(relative_error(&native, &deq, delta)?);
            }
            eprintln!(
                "{key} {}: float {:.2}, quantized {:?}",
                dir.display(),
                float_acc.last().unwrap(),
                q_acc
                    .iter()
                    .map(|v| v.last().copied().unwrap_or(0.0))
                    .collect::<Vec<_>>()
            );
        }
        let (fm, fs) = mean_std(&float_acc);
        acc_rows += &format!("| {name} | {params} | {fm:.2} ± {fs:.2} |");
        err_rows += &format!("| {name} |");
        size_rows += &format!("| {name} | {} |", sizes.0);
        for i in 0..schemes().len() {
            let (m, s) = mean_std(&q_acc[i]);
            let drops: Vec<f64> = q_acc[i]
                .iter()
                .zip(&float_acc)
                .map(|(q, f)| q - f)
                .collect();
            let (dm, _) = mean_std(&drops);
            acc_rows += &format!(" {m:.2} ± {s:.2} ({dm:+.2}) |");
            let (em, _) = mean_std(&q_err[i]);
            err_rows += &format!(" {em:.4} |");
            size_rows += &format!(
                " {} ({:.0}%) |",
                sizes.1[i],
                100.0 * sizes.1[i] as f64 / sizes.0 as f64
            );
        }
        acc_rows += &format!(" {} |\n", dirs.len());
        err_rows += "\n";
        size_rows += "\n";
    }
    let heads: Vec<String> = schemes().iter().map(|s| s.to_string()).collect();
    let cols = heads.join(" | ");
    let seps = vec!["---:"; heads.len()].join(" | ");
    let tables = format!(
        "Produced by `cargo run --release --features full --example quant_study` on {} from the comparison's runs (`runs/compare/<method>-seed<n>`): each trained adapter's factors quantized (symmetric int8 or int4, one scale per factor or per block of 32 values), everything else float32, evaluated on the same test set.\n\n\
         ### Test accuracy after quantizing the adapters (mean ± std over seeds; change from float32 in parentheses)\n\n| method | trainable params | float32 | {cols} | seeds |\n| --- | ---: | ---: | {seps} | ---: |\n{acc_rows}\n\
         ### Relative error of the update, ‖ΔW_q − ΔW‖ / ‖ΔW‖ over all layers (mean over seeds)\n\n| method | {cols} |\n| --- | {seps} |\n{err_rows}\n\
         ### Adapter file size, bytes (percent of float32)\n\n| method | float32 | {cols} |\n| --- | ---: | {seps} |\n{size_rows}",
        backend_name()
    );
    common::write_between(
        &args.results,
        "## Quantization",
        "<!-- quant:begin (written by examples/quant_study.rs) -->",
        "<!-- quant:end -->",
        &tables,
    )?;
    println!("{tables}");
    Ok(())
}
