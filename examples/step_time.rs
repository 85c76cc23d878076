//! Training-step times of the MiniLM encoder per method, as JSON (for the side-by-side runner
//! against PyTorch + PEFT, `scripts/side_by_side.py`).
//!
//! ```text
//! cargo run --release --example step_time -- --batch 32 --seq 64
//! ```

mod common;

use clap::Parser;
use common::{backend_name, Train};
use kron_adapters::finetune::timing::train_step_ms;
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
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // CPU backends: keep freed buffers instead of page-faulting fresh ones for every tensor.
    kron_adapters::finetune::keep_freed_memory();
    let args = Args::parse();
    let device = Default::default();
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
            "kron_lora_r12",
            lin(AdapterConfig::KronLora(KronLoraConfig::auto(12))),
        ),
    ];
    let mut out = serde_json::Map::new();
    out.insert("backend".into(), backend_name().into());
    for (key, peft) in methods {
        let (ms, trainable) =
            train_step_ms::<Train>(&bert, &peft, args.batch, args.seq, args.budget, &device)?;
        eprintln!("{key}: {ms:.0} ms ({trainable} trainable)");
        out.insert(
            key.into(),
            serde_json::json!({ "ms": ms, "trainable": trainable }),
        );
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
