//! The memory a decoder needs with each adapter, computed from the configuration (no weights
//! are allocated): the frozen base in several precisions, the adapters' parameters, their
//! gradients and AdamW's two moments (float32), and the adapter file. Prints the markdown
//! table of docs/llm.md.
//!
//! ```text
//! cargo run --example memory
//! ```

use kron_adapters::model::llama::LlamaConfig;
use kron_adapters::{AdapterConfig, KronAConfig, KronLoraConfig, LoraConfig, MethodConfig};

fn mistral_7b() -> LlamaConfig {
    LlamaConfig::mistral_7b()
}

fn smollm2() -> LlamaConfig {
    LlamaConfig::smollm2_135m()
}

/// `[d_in, d_out]` of the seven projections of one layer.
fn projections(c: &LlamaConfig) -> [(&'static str, usize, usize); 7] {
    let (d, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    [
        ("q_proj", d, q),
        ("k_proj", d, kv),
        ("v_proj", d, kv),
        ("o_proj", q, d),
        ("gate_proj", d, f),
        ("up_proj", d, f),
        ("down_proj", f, d),
    ]
}

fn base_params(c: &LlamaConfig) -> usize {
    let layer: usize =
        projections(c).iter().map(|(_, i, o)| i * o).sum::<usize>() + 2 * c.hidden_size;
    let embed = c.vocab_size * c.hidden_size;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    embed + head + c.num_hidden_layers * layer + c.hidden_size
}

fn gb(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else {
        format!("{:.1} MB", bytes / 1e6)
    }
}

fn main() {
    let adapters: Vec<(&str, AdapterConfig)> = vec![
        ("LoRA r=8", AdapterConfig::Lora(LoraConfig::new(8))),
        ("LoRA r=16", AdapterConfig::Lora(LoraConfig::new(16))),
        (
            "Kron-LoRA r=2 (√d shapes)",
            AdapterConfig::KronLora(KronLoraConfig::auto(2)),
        ),
        (
            "Kron-LoRA r=8 (√d shapes)",
            AdapterConfig::KronLora(KronLoraConfig::auto(8)),
        ),
        (
            "KronA (√d shapes)",
            AdapterConfig::KronA(KronAConfig::auto()),
        ),
    ];
    for (name, c) in [("SmolLM2-135M", smollm2()), ("Mistral-7B", mistral_7b())] {
        let base = base_params(&c) as f64;
        println!("### {name}\n");
        println!(
            "Frozen base: {:.0}M parameters — {} in float32, {} in bfloat16, {} in int8, {} in 4-bit (Q4_1: 5 bits a weight with its scale and minimum).\n",
            base / 1e6,
            gb(base * 4.0),
            gb(base * 2.0),
            gb(base),
            gb(base * 5.0 / 8.0)
        );
        println!("| adapter on the seven projections | trainable parameters | % of the base | adapter + gradient + AdamW moments (float32) | adapter file (float32) |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (aname, a) in &adapters {
            let per_layer: usize = projections(&c)
                .iter()
                .map(|(p, i, o)| a.num_params(*i, *o).unwrap_or_else(|e| panic!("{p}: {e}")))
                .sum();
            let n = (per_layer * c.num_hidden_layers) as f64;
            println!(
                "| {aname} | {:.3}M | {:.3}% | {} | {} |",
                n / 1e6,
                100.0 * n / base,
                gb(n * 16.0),
                gb(n * 4.0)
            );
        }
        println!();
    }
    let _ = <KronAConfig as MethodConfig>::INFO;
}
