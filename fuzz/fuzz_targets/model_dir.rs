//! A Hugging Face model folder (`config.json` and `model.safetensors`), read as a user's folder
//! is: as a BERT encoder and as a Llama-family decoder, each with KronA on its default targets.
//! Either loader gives an error or a model, never a panic, and never allocates beyond what the
//! folder's bytes describe; a model that loads also runs: the encoder classifies a row, the
//! decoder gives logits for a prompt and then one more token through its KV cache, and exports
//! to a GGUF file (`llama::to_gguf`, F16) that loads again.
//!
//! The input: a count `k` of field edits (first byte, mod 4), `k` edits of 10 bytes, the
//! config's length in two bytes, the config, the weights. Each edit sets one known field of the
//! config (when it parses as a JSON object) to a value drawn from its bytes — a small or any
//! integer, a float, a boolean, null, a known string — or removes it, so that runs reach
//! unusual values of real fields, which byte mutations of JSON text seldom do.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::model::{bert, llama};
use kron_adapters::store::gguf::{GgmlType, GgufFile};
use kron_adapters::{AdapterConfig, KronAConfig, PlacementConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

type B = NdArray;

/// One folder a process, rewritten for each input.
fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kron-fuzz-model-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

fn ids(values: Vec<i64>) -> Tensor<B, 2, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [1, n]), &Default::default())
}

/// The fields an edit can set: `rope.` ones go into `rope_parameters` (transformers 5) or
/// `rope_scaling` (4), by the edit's bytes.
const FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "rms_norm_eps",
    "rope_theta",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "hidden_act",
    "model_type",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "rope.rope_type",
    "rope.rope_theta",
    "rope.factor",
    "rope.low_freq_factor",
    "rope.high_freq_factor",
    "rope.original_max_position_embeddings",
];

const STRINGS: &[&str] = &[
    "bert", "llama", "mistral", "qwen2", "smollm2", "gelu", "silu", "default", "linear", "llama3",
    "yarn",
];

/// The value an edit's payload describes (`None`: remove the field).
fn value(kind: u8, p: [u8; 8]) -> Option<Value> {
    let bits = u64::from_le_bytes(p);
    Some(match kind % 8 {
        0 => json!(bits % 70),
        1 => json!(bits),
        2 => json!(f64::from_bits(bits)),
        3 => json!((bits % 1000) as f64 / 200.0 - 1.5),
        4 => json!(bits % 2 == 0),
        5 => json!(STRINGS[(bits % STRINGS.len() as u64) as usize]),
        6 => Value::Null,
        _ => return None,
    })
}

/// Applies `edits` (10 bytes each: field, kind, payload) to a config that is a JSON object.
fn edit(config: &[u8], edits: &[u8]) -> Vec<u8> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(config) else {
        return config.to_vec();
    };
    for e in edits.chunks_exact(10) {
        let field = FIELDS[e[0] as usize % FIELDS.len()];
        let v = value(e[1], e[2..10].try_into().expect("8 bytes"));
        let (target, key) = match field.strip_prefix("rope.") {
            Some(key) => {
                let name = if e[1] & 0x80 == 0 {
                    "rope_parameters"
                } else {
                    "rope_scaling"
                };
                let nested = obj.entry(name).or_insert_with(|| json!({}));
                if !nested.is_object() {
                    *nested = json!({});
                }
                (nested.as_object_mut().expect("an object"), key)
            }
            None => (&mut obj, field),
        };
        match v {
            Some(v) => target.insert(key.to_string(), v),
            None => target.remove(key),
        };
    }
    serde_json::to_vec(&Value::Object(obj)).expect("a JSON object serializes")
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = (k % 4) as usize;
    if rest.len() < 10 * k + 2 {
        return;
    }
    let (edits, rest) = rest.split_at(10 * k);
    let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
    let (config, weights) = rest[2..].split_at(n);
    let config = if k > 0 {
        edit(config, edits)
    } else {
        config.to_vec()
    };
    let dir = folder();
    std::fs::write(dir.join("config.json"), &config).expect("write config.json");
    std::fs::write(dir.join("model.safetensors"), weights).expect("write model.safetensors");
    let device = Default::default();
    let placement = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()));

    if let Ok((model, cfg)) = bert::load_pretrained::<B>(dir, &placement, 2, &device) {
        // A row as the tokenizer gives them: ids in the vocabulary, at most the context.
        let seq = cfg.max_position_embeddings.min(3);
        let row: Vec<i64> = (0..seq).map(|i| (i % cfg.vocab_size) as i64).collect();
        let logits = model.forward(ids(row), ids(vec![1; seq]));
        assert_eq!(logits.dims(), [1, 2]);
    }

    if let Ok(model) = llama::load::<B>(dir, &placement, &device) {
        let cfg = model.config().clone();
        let seq = cfg.max_position_embeddings.min(3);
        if seq >= 2 {
            let row: Vec<i64> = (0..seq).map(|i| (i % cfg.vocab_size) as i64).collect();
            let logits = model.forward(ids(row.clone()), None);
            assert_eq!(logits.dims(), [1, seq, cfg.vocab_size]);
            let mut cache = model.new_cache();
            let _ = model.forward_cached(ids(row[..seq - 1].to_vec()), &mut cache);
            let next = model.forward_cached(ids(vec![row[seq - 1]]), &mut cache);
            assert_eq!(next.dims(), [1, cfg.vocab_size]);
        }
        // Exported as GGUF (adapters merged, F16), it reads back as a model, or the export
        // says why not.
        if let Ok(bytes) = llama::to_gguf(model, &[], GgmlType::F16) {
            let file = GgufFile::from_bytes("export", bytes).expect("an exported GGUF parses");
            if let Err(e) = llama::from_gguf::<B>(&file, "export", &PlacementConfig::new(), &device) {
                panic!("an exported GGUF does not load: {e}");
            }
        }
    }
});
