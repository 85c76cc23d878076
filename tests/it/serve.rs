//! The HTTP server (`kron_adapters::serve`) over real loopback sockets: answers equal the
//! library's (generation with the adapter attached; the main job's classifier), requests batch
//! across adapters, adapters load and unload while requests run, bad input gets a 4xx JSON
//! error and never a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::finetune::tokenize::TextEncoder;
use kron_adapters::llm::{generate, GenerateConfig, TextTokenizer};
use kron_adapters::model::bert::{classifier_from_source, BertClassifier};
use kron_adapters::model::{BertConfig, BertEncoder, LlamaForCausalLM, TensorSource};
use kron_adapters::serve::{client, spawn, Batching, Metrics, Model, Running, ServeConfig, Worker};
use kron_adapters::store::{save_params_matching, CheckpointMeta};
use kron_adapters::{attach, AdapterLayers, NameMap, NativeAdapters, PlacementConfig};
use serde_json::{json, Value};

use crate::common::{device, scratch_dir, TB};
use crate::multi::{adapters_for, every_method};

/// A WordLevel `tokenizer.json` over `vocab` (whitespace-split), with `[CLS] … [SEP]` around
/// every text when `bert`.
fn tokenizer_json(vocab: &[String], bert: bool) -> Value {
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let post = if bert {
        json!({
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), seq("A"), special("[SEP]")],
            "pair": [special("[CLS]"), seq("A"), special("[SEP]"), seq("B"), special("[SEP]")],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]},
            }
        })
    } else {
        Value::Null
    };
    let added: Vec<Value> = vocab
        .iter()
        .enumerate()
        .filter(|(_, t)| t.starts_with('[') || t.starts_with('<'))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": vocab[if bert { 1 } else { 0 }]},
    })
}

/// The tiny Llama fixture as a served model folder, with a word-level tokenizer `t3 … t63`
/// (`<unk>` 0, `<s>` 1, `</s>` 2 — the fixture's BOS and EOS).
pub fn tiny_decoder_dir(name: &str) -> PathBuf {
    let dir = scratch_dir("serve", name);
    let fixture = crate::common::fixture("llama/tiny_llama");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab.extend((3..64).map(|i| format!("t{i}")));
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer_json(&vocab, false).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}).to_string(),
    )
    .unwrap();
    dir
}

/// A server on a free loopback port, until dropped.
pub fn start(model: Model<TB>, config: ServeConfig) -> Running<TB> {
    spawn(model, "127.0.0.1:0".parse().unwrap(), config, &device()).unwrap()
}

/// One HTTP/1.1 request; the status and the body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    client::request(addr, method, path, body, Duration::from_secs(120)).unwrap()
}

pub fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    client::post_json(addr, path, &body).unwrap()
}

/// What the library alone generates for `prompt` with `adapter` (or none).
fn library_generate(
    dir: &Path,
    adapter: Option<&NativeAdapters>,
    prompt: &str,
    cfg: &GenerateConfig,
) -> String {
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(dir).unwrap();
    let mut model: LlamaForCausalLM<TB> =
        kron_adapters::model::llama::load(dir, &PlacementConfig::new(), &dev).unwrap();
    if let Some(a) = adapter {
        model = attach(model, a, &NameMap::new(), &dev).unwrap();
    }
    let ids = tok.encode(prompt, true).unwrap();
    let out = generate(&model, &ids, cfg, &tok.eos, &dev, |_| {}).unwrap();
    tok.decode(&out, true).unwrap()
}

/// Writes an adapter file of every method for the model at `dir`; (name, file, adapters).
fn decoder_adapters(dir: &Path) -> Vec<(String, PathBuf, NativeAdapters)> {
    let model: LlamaForCausalLM<TB> =
        kron_adapters::model::llama::load(dir, &PlacementConfig::new(), &device()).unwrap();
    every_method()
        .into_iter()
        .map(|(name, cfg)| {
            let a = adapters_for(&model, &cfg);
            let path = dir.join(format!("{name}.safetensors"));
            a.write(&path).unwrap();
            (name.to_string(), path, a)
        })
        .collect()
}

/// Loads each adapter file over HTTP under its name (each new to the server).
fn load_adapters(addr: SocketAddr, adapters: &[(String, PathBuf, NativeAdapters)]) {
    for (name, path, _) in adapters {
        let (st, v) = post(addr, "/v1/adapters", json!({"name": name, "path": path}));
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["replaced"], json!(false));
    }
}

#[test]
fn generate_over_http_equals_the_library_for_every_adapter() {
    let dir = tiny_decoder_dir("generate");
    let adapters = decoder_adapters(&dir);
    // Requests over every adapter and none, greedy and sampled, and what the library alone
    // answers to each.
    let prompts = ["t5 t9 t12", "t33", "t7 t7 t40 t41 t8"];
    let mut cases = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for a in [None, Some(0usize), Some(1), Some(2)] {
            let sampled = (i + a.unwrap_or(3)) % 2 == 0;
            let mut cfg = GenerateConfig::new().with_max_new_tokens(6);
            if sampled {
                cfg = cfg.with_temperature(0.8).with_seed(4);
            }
            let want = library_generate(&dir, a.map(|i| &adapters[i].2), p, &cfg);
            cases.push((p.to_string(), a, sampled, want));
        }
    }
    // The adapters change the answers (else the comparison proves little).
    let differ = cases.iter().filter(|c| c.1.is_some() && !c.2).any(|c| {
        cases
            .iter()
            .any(|b| b.0 == c.0 && b.1.is_none() && !b.2 && b.3 != c.3)
    });
    assert!(differ, "no adapter changed a greedy answer");
    for batching in [Batching::Mixed, Batching::PerAdapter, Batching::Merged] {
        let server = start(
            Model::load(&dir, &device()).unwrap(),
            ServeConfig::new()
                .with_window_ms(20)
                .with_batching(batching),
        );
        load_adapters(server.addr, &adapters);
        let handles: Vec<_> = cases
            .iter()
            .cloned()
            .map(|(p, a, sampled, _)| {
                let addr = server.addr;
                let name = a.map(|i| adapters[i].0.clone());
                std::thread::spawn(move || {
                    let mut body = json!({"prompt": p, "adapter": name, "max_new_tokens": 6});
                    if sampled {
                        body["temperature"] = json!(0.8);
                        body["seed"] = json!(4);
                    }
                    post(addr, "/v1/generate", body)
                })
            })
            .collect();
        for ((p, a, _, want), h) in cases.iter().zip(handles) {
            let (st, v) = h.join().unwrap();
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["text"], json!(want), "{batching:?}: {p} with {a:?}");
            let n = v["tokens"].as_u64().unwrap();
            assert!((1..=6).contains(&n), "{v}");
        }
        // Every request went through a batch; the metrics count them.
        let (st, text) = http(server.addr, "GET", "/metrics", b"");
        assert_eq!(st, 200);
        let rows: f64 = metric(&text, "kron_batch_rows_sum");
        assert_eq!(rows as usize, cases.len(), "{text}");
        assert!(text.contains(&format!(
            "kron_requests_total{{endpoint=\"generate\",status=\"200\"}} {}",
            cases.len()
        )));
        assert!(text.contains("kron_adapters_resident 3"));
        // One adapter a batch, unless mixed.
        let max_adapters = text
            .lines()
            .filter_map(|l| l.strip_prefix("kron_batch_adapters_bucket{le=\"1\"} "))
            .map(|v| v.parse::<f64>().unwrap())
            .next()
            .unwrap();
        let batches = metric(&text, "kron_batch_adapters_count");
        if batching != Batching::Mixed {
            assert_eq!(
                max_adapters, batches,
                "{batching:?}: a batch held two adapters"
            );
        }
    }
}

/// A server whose model's frozen weights are int8 (`--base-weights int8`) answers what the
/// library answers on the same int8 model, for every adapter and none, with requests batched.
#[test]
fn an_int8_model_serves_what_the_library_generates_with_it() {
    use kron_adapters::model::llama::LoadOptions;
    use kron_adapters::quant::{Level, QuantConfig};
    let dir = tiny_decoder_dir("generate-int8");
    let adapters = decoder_adapters(&dir);
    let int8 = QuantConfig::new(8, Level::Tensor).unwrap();
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(&dir).unwrap();
    let options = LoadOptions::new().with_frozen(Some(int8));
    let base: LlamaForCausalLM<TB> =
        kron_adapters::model::llama::load_with(&dir, &options, &dev).unwrap();
    let cfg = GenerateConfig::new().with_max_new_tokens(6);
    let mut cases = Vec::new();
    for p in ["t5 t9 t12", "t33", "t7 t7 t40 t41 t8"] {
        for a in [None, Some(0usize), Some(1), Some(2)] {
            let model = match a {
                Some(i) => attach(base.clone(), &adapters[i].2, &NameMap::new(), &dev).unwrap(),
                None => base.clone(),
            };
            let ids = tok.encode(p, true).unwrap();
            let out = generate(&model, &ids, &cfg, &tok.eos, &dev, |_| {}).unwrap();
            cases.push((p, a, tok.decode(&out, true).unwrap()));
        }
    }
    let server = start(
        Model::load_with(&dir, Some(int8), &dev).unwrap(),
        ServeConfig::new().with_window_ms(20),
    );
    load_adapters(server.addr, &adapters);
    let handles: Vec<_> = cases
        .iter()
        .map(|(p, a, _)| {
            let (addr, p) = (server.addr, p.to_string());
            let name = a.map(|i| adapters[i].0.clone());
            std::thread::spawn(move || {
                let body = json!({"prompt": p, "adapter": name, "max_new_tokens": 6});
                post(addr, "/v1/generate", body)
            })
        })
        .collect();
    for ((p, a, want), h) in cases.iter().zip(handles) {
        let (st, v) = h.join().unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["text"], json!(want), "{p} with {a:?}");
    }
    // A training backend nobody registered (`kron::autodiff::register_backward`) is refused.
    type Unregistered = burn::backend::Autodiff<crate::common::AB>;
    let refused = Model::<Unregistered>::load_with(&dir, Some(int8), &Default::default());
    assert!(matches!(
        refused,
        Err(kron_adapters::AdapterError::Unsupported { .. })
    ));
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn requests_within_the_window_run_as_one_batch() {
    let dir = tiny_decoder_dir("window");
    let adapters = decoder_adapters(&dir);
    let metrics = Arc::new(Metrics::default());
    let worker: Worker<TB> = Worker::start(
        Model::load(&dir, &device()).unwrap(),
        metrics.clone(),
        &ServeConfig::new().with_window_ms(2000).with_max_batch(8),
        &device(),
    );
    for (name, path, _) in &adapters {
        worker.load(name, path).unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let req: kron_adapters::serve::GenerateRequest = serde_json::from_value(json!({
                "prompt": format!("t{} t{}", 10 + i, 20 + i),
                "adapter": if i % 4 == 3 { Value::Null } else { json!(adapters[i % 4].0) },
                "max_new_tokens": 2 + i % 3,
            }))
            .unwrap();
            let w = worker.clone();
            async move { w.generate(req, 64).await }
        })
        .collect();
    let results = rt.block_on(async {
        let mut out = Vec::new();
        let handles: Vec<_> = requests.into_iter().map(tokio::spawn).collect();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let text = metrics.render(worker.resident());
    assert_eq!(metric(&text, "kron_batch_requests_count"), 1.0, "{text}");
    assert_eq!(metric(&text, "kron_batch_rows_sum"), 8.0);
    assert_eq!(metric(&text, "kron_batch_adapters_sum"), 3.0);
    worker.stop();
}

#[test]
fn adapters_load_and_unload_while_requests_run() {
    let dir = tiny_decoder_dir("hot");
    let adapters = decoder_adapters(&dir);
    let server = start(
        Model::load(&dir, &device()).unwrap(),
        ServeConfig::new().with_window_ms(2),
    );
    let addr = server.addr;
    let (a_name, a_path, a) = &adapters[0];
    assert_eq!(
        post(
            addr,
            "/v1/adapters",
            json!({"name": a_name, "path": a_path})
        )
        .0,
        201
    );
    let want = library_generate(
        &dir,
        Some(a),
        "t4 t5",
        &GenerateConfig::new().with_max_new_tokens(3),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (stop, a_name, want) = (stop.clone(), a_name.clone(), want.clone());
            std::thread::spawn(move || {
                let mut seen = (0, 0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (st, v) = post(
                        addr,
                        "/v1/generate",
                        json!({"prompt": "t4 t5", "adapter": a_name, "max_new_tokens": 3}),
                    );
                    assert_eq!(st, 200, "{v}");
                    assert_eq!(v["text"].as_str(), Some(want.as_str()));
                    seen.0 += 1;
                    // The adapter being swapped: served, or not found — never a server error.
                    let (st, v) = post(
                        addr,
                        "/v1/generate",
                        json!({"prompt": "t6", "adapter": "swapped", "max_new_tokens": 2 + c}),
                    );
                    match st {
                        200 => seen.1 += 1,
                        404 => {
                            assert_eq!(v["error"]["type"], json!("adapter_not_found"));
                            seen.2 += 1
                        }
                        _ => panic!("{st} {v}"),
                    }
                }
                seen
            })
        })
        .collect();
    for round in 0..12 {
        let (_, path, _) = &adapters[1 + round % 2];
        let (st, v) = post(
            addr,
            "/v1/adapters",
            json!({"name": "swapped", "path": path}),
        );
        assert_eq!(st, 201, "{v}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(http(addr, "DELETE", "/v1/adapters/swapped", b"").0, 204);
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let seen = c.join().unwrap();
        total += seen.0;
    }
    assert!(total > 0);
    let (_, list) = http(addr, "GET", "/v1/adapters", b"");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["adapters"].as_array().unwrap().len(), 1, "{list}");
    assert!(
        server.metrics.count("generate", 500) == 0 && server.metrics.count("generate", 503) == 0
    );
}

#[test]
fn bad_requests_get_a_json_error_and_the_server_goes_on() {
    let dir = tiny_decoder_dir("bad");
    let adapters = decoder_adapters(&dir);
    let server = start(
        Model::load(&dir, &device()).unwrap(),
        ServeConfig::new()
            .with_max_chars(40)
            .with_max_tokens(24)
            .with_max_body_bytes(2000),
    );
    let addr = server.addr;
    assert_eq!(
        post(
            addr,
            "/v1/adapters",
            json!({"name": "a", "path": adapters[0].1})
        )
        .0,
        201
    );
    // Files that are not adapters, or not this model's.
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let other = {
        let mut cfg = kron_adapters::model::LlamaConfig::tiny(64);
        cfg.hidden_size = 48;
        let m = LlamaForCausalLM::<TB>::new(
            &mut TensorSource::random(2),
            &cfg,
            &PlacementConfig::new(),
            &device(),
        )
        .unwrap();
        let p = dir.join("other.safetensors");
        adapters_for(&m, &every_method()[0].1).write(&p).unwrap();
        p
    };
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/v1/generate",
            b"{bad".to_vec(),
            400,
            "invalid_request",
        ),
        ("POST", "/v1/generate", b"".to_vec(), 400, "invalid_request"),
        (
            "POST",
            "/v1/generate",
            vec![0xff, 0xfe, 0x00],
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": 5}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "colour": 1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "   "}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "max_new_tokens": 0}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "max_new_tokens": -4}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "max_new_tokens": 25}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3 t4 t5 t6 t7", "max_new_tokens": 20}"#.to_vec(),
            413,
            "too_large",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "temperature": -1}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "top_p": 2}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/generate",
            br#"{"prompt": "t3", "adapter": "nope"}"#.to_vec(),
            404,
            "adapter_not_found",
        ),
        (
            "POST",
            "/v1/generate",
            format!(r#"{{"prompt": "{}"}}"#, "t3 ".repeat(20)).into_bytes(),
            413,
            "too_large",
        ),
        (
            "POST",
            "/v1/generate",
            format!(r#"{{"prompt": "{}"}}"#, "x".repeat(3000)).into_bytes(),
            413,
            "too_large",
        ),
        (
            "POST",
            "/v1/classify",
            br#"{"texts": ["t3"], "adapter": "a"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        ("GET", "/v2/anything", b"".to_vec(), 404, "not_found"),
        (
            "POST",
            "/v1/adapters",
            br#"{"name": "b c", "path": "x"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/adapters",
            br#"{"name": "b", "path": "/no/such/file"}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/adapters",
            json!({"name": "b", "path": garbage})
                .to_string()
                .into_bytes(),
            422,
            "malformed_file",
        ),
        (
            "POST",
            "/v1/adapters",
            json!({"name": "b", "path": other}).to_string().into_bytes(),
            409,
            "incompatible",
        ),
        (
            "POST",
            "/v1/adapters",
            json!({"name": "b", "path": dir}).to_string().into_bytes(),
            422,
            "malformed_file",
        ),
        // A device would be read until memory runs out.
        (
            "POST",
            "/v1/adapters",
            br#"{"name": "b", "path": "/dev/zero"}"#.to_vec(),
            422,
            "malformed_file",
        ),
        (
            "DELETE",
            "/v1/adapters/nope",
            b"".to_vec(),
            404,
            "adapter_not_found",
        ),
    ];
    for (method, path, body, status, kind) in &cases {
        let (st, text) = http(addr, method, path, body);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert_eq!(
            (st, v["error"]["type"].as_str()),
            (*status, Some(*kind)),
            "{method} {path} {}: {v}",
            String::from_utf8_lossy(body)
        );
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // A wrong method on a known path is 405.
    assert_eq!(http(addr, "GET", "/v1/generate", b"").0, 405);
    // Nothing changed, the server still serves.
    let (st, v) = post(
        addr,
        "/v1/generate",
        json!({"prompt": "t3 t4", "adapter": "a", "max_new_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, health) = http(addr, "GET", "/health", b"");
    assert_eq!(st, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["adapters"]["adapters"], json!(1));
    assert_eq!(health["model"]["kind"], json!("decoder"));
}

#[test]
fn a_read_only_server_refuses_changes() {
    let dir = tiny_decoder_dir("ro");
    let adapters = decoder_adapters(&dir);
    let server = start(
        Model::load(&dir, &device()).unwrap(),
        ServeConfig::new().with_read_only(true),
    );
    server.worker.load("a", &adapters[0].1).unwrap();
    let (st, v) = post(
        server.addr,
        "/v1/adapters",
        json!({"name": "b", "path": adapters[1].1}),
    );
    assert_eq!((st, v["error"]["type"].as_str()), (403, Some("read_only")));
    assert_eq!(http(server.addr, "DELETE", "/v1/adapters/a", b"").0, 403);
    assert_eq!(server.worker.resident().adapters, 1);
}

/// Special-token ids beyond u32 in a folder's `config.json` are no token: they used to wrap
/// (2³² + 1 became token 1). Ids beyond the model's vocabulary are refused when it loads,
/// naming the field (a BOS beyond it was reported as `eos_token_id`).
#[test]
fn special_token_ids_beyond_u32_do_not_wrap() {
    let dir = tiny_decoder_dir("wrap");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"add_bos_token": true}).to_string(),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["bos_token_id"] = json!((1u64 << 32) + 1);
    config["eos_token_id"] = json!([(1u64 << 32) + 2, 2]);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = TextTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!((tok.bos, tok.eos.clone()), (None, vec![2]));
    // Ids within u32 but beyond the model's 64 tokens are refused by name when it loads.
    for (field, value) in [
        ("bos_token_id", json!(64)),
        ("eos_token_id", json!([2, 70])),
    ] {
        let mut bad = config.clone();
        bad["bos_token_id"] = json!(1);
        bad["eos_token_id"] = json!(2);
        bad[field] = value;
        std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
        match Model::<TB>::load(&dir, &device()) {
            Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
            Ok(_) => panic!("{field}: loaded"),
        }
    }
}

/// Limits of 0 and a batching window past a minute (a lone request would wait that long) are
/// refused before the server starts, naming the setting.
#[test]
fn limits_of_zero_and_endless_windows_are_refused() {
    let dir = tiny_decoder_dir("limits");
    for (config, field) in [
        (ServeConfig::new().with_window_ms(60_001), "window_ms"),
        (ServeConfig::new().with_window_ms(u64::MAX), "window_ms"),
        (ServeConfig::new().with_max_batch(0), "max_batch"),
        (ServeConfig::new().with_max_tokens(0), "max_tokens"),
    ] {
        let model = Model::<TB>::load(&dir, &device()).unwrap();
        match spawn(model, "127.0.0.1:0".parse().unwrap(), config, &device()) {
            Err(e) => assert!(e.to_string().contains(field), "{e}"),
            Ok(_) => panic!("{field}: a server started"),
        }
    }
    assert!(ServeConfig::new().with_window_ms(60_000).validate().is_ok());
}

/// A model folder whose tokenizer gives ids beyond the model's vocabulary (another model's
/// tokenizer) is refused when the server loads it, naming the token, for an encoder and a
/// decoder alike, rather than failing every request that meets such a token.
#[test]
fn a_tokenizer_beyond_the_models_vocabulary_is_refused_at_load() {
    let words = |n: usize, bert: bool| {
        let mut v: Vec<String> = if bert {
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
                .map(String::from)
                .to_vec()
        } else {
            ["<unk>", "<s>", "</s>"].map(String::from).to_vec()
        };
        let first = v.len();
        v.extend((first..n).map(|i| format!("t{i}")));
        tokenizer_json(&v, bert).to_string()
    };
    let refused = |dir: &Path, last: &str| match Model::<TB>::load(dir, &device()) {
        Err(e @ kron_adapters::AdapterError::Incompatible { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(last) && msg.contains("vocabulary of"), "{msg}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("served a model with another model's tokenizer"),
    };
    // The decoder fixture has 64 tokens.
    let dir = tiny_decoder_dir("vocab");
    std::fs::write(dir.join("tokenizer.json"), words(80, false)).unwrap();
    refused(&dir, "t79");
    std::fs::write(dir.join("tokenizer.json"), words(64, false)).unwrap();
    assert!(Model::<TB>::load(&dir, &device()).is_ok());
    // A BERT folder of 100 tokens.
    let dir = scratch_dir("serve", "vocab-bert");
    let cfg = BertConfig::tiny(100);
    let mut rng = crate::common::Rng::new(3);
    crate::encoder::write_st(
        &dir.join("model.safetensors"),
        &crate::encoder::hf_tensors(&cfg, &mut rng),
        &mut rng,
    );
    let mut config = serde_json::to_value(&cfg).unwrap();
    config["model_type"] = json!("bert");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), words(101, true)).unwrap();
    refused(&dir, "t100");
    std::fs::write(dir.join("tokenizer.json"), words(100, true)).unwrap();
    assert!(matches!(
        Model::<TB>::load(&dir, &device()),
        Ok(Model::Encoder { .. })
    ));
}

/// A tiny BERT with a word-level tokenizer (`w4 … w39`), and a run folder of the main job for it
/// (KronA adapters, a 3-class head, `max_len` 8).
fn encoder_and_run(name: &str) -> (Model<TB>, BertClassifier<TB>, PathBuf, TextEncoder) {
    let dev = device();
    let dir = scratch_dir("serve", name);
    let cfg = BertConfig::tiny(40);
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend((4..40).map(|i| format!("w{i}")));
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json(&vocab, true).to_string()).unwrap();
    let encoder = BertEncoder::new(
        &mut TensorSource::random(5),
        &cfg,
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let placement = PlacementConfig::linear(every_method()[1].1.clone());
    let clf: BertClassifier<TB> =
        classifier_from_source(TensorSource::random(5), &cfg, &placement, 3, &dev).unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    NativeAdapters::from_model(&clf)
        .write(run.join("adapter.safetensors"))
        .unwrap();
    save_params_matching(
        &clf,
        run.join("trainable.safetensors"),
        &[r"^head\."],
        &CheckpointMeta::new(clf.adapter_specs()),
    )
    .unwrap();
    let report = json!({"config": {"max_len": 8, "placement": {"train": "Adapters"}}, "labels": ["neg", "neu", "pos"]});
    std::fs::write(run.join("report.json"), report.to_string()).unwrap();
    let model = Model::Encoder {
        encoder,
        tokenizer: TextEncoder::from_file(&tok_path, 64).unwrap(),
        config: cfg,
    };
    (
        model,
        clf,
        run,
        TextEncoder::from_file(&tok_path, 8).unwrap(),
    )
}

#[test]
fn classify_over_http_equals_the_runs_classifier() {
    let (model, clf, run, tok) = encoder_and_run("classify");
    let server = start(model, ServeConfig::new());
    let (st, v) = post(
        server.addr,
        "/v1/adapters",
        json!({"name": "rt", "path": run}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["labels"], json!(["neg", "neu", "pos"]));
    // Texts of different lengths, one longer than the run's max_len (truncated as in training).
    let texts = [
        "w5 w9",
        "w30 w31 w32 w33 w34 w35 w36 w37 w38 w4 w5",
        "w7",
        "w12 w12 w13 w20",
    ];
    let (st, v) = post(
        server.addr,
        "/v1/classify",
        json!({"texts": texts, "adapter": "rt"}),
    );
    assert_eq!(st, 200, "{v}");
    let dev = device();
    let check = |texts: &[String], v: &Value| {
        let preds = v["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), texts.len());
        for (t, p) in texts.iter().zip(preds) {
            let ids: Vec<i64> = tok.encode(t).unwrap().into_iter().map(i64::from).collect();
            assert!(ids.len() <= 8);
            let n = ids.len();
            let logits = clf.forward(
                Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [1, n]), &dev),
                Tensor::<TB, 2, Int>::ones([1, n], &dev),
            );
            let want = crate::common::to_vec(burn::tensor::activation::softmax(logits, 1));
            let got: Vec<f32> = ["neg", "neu", "pos"]
                .iter()
                .map(|l| p["scores"][l].as_f64().unwrap() as f32)
                .collect();
            crate::common::assert_close(&got, &want, 1e-4, t);
            let best = want
                .iter()
                .enumerate()
                .fold(0, |b, (i, x)| if *x > want[b] { i } else { b });
            assert_eq!(p["index"], json!(best));
        }
    };
    check(&texts.map(String::from), &v);
    // Enough rows for the worker to compute the chunk in parts (on the CPU backends): 40 texts
    // of 1 to 8 tokens, each still its own classifier's answer, in order.
    let many: Vec<String> = (0..40)
        .map(|i| {
            (0..1 + i % 7)
                .map(|j| format!("w{}", 4 + (i * 7 + j * 3) % 36))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let (st, v) = post(
        server.addr,
        "/v1/classify",
        json!({"texts": many, "adapter": "rt"}),
    );
    assert_eq!(st, 200, "{v}");
    check(&many, &v);
    // The encoder refuses generation and adapters without a head.
    assert_eq!(
        post(server.addr, "/v1/generate", json!({"prompt": "w5"})).0,
        400
    );
    let (st, _) = post(
        server.addr,
        "/v1/adapters",
        json!({"name": "x", "path": run.join("adapter.safetensors")}),
    );
    assert_eq!(st, 409);
}

#[test]
fn run_folders_that_cannot_share_the_model_are_refused() {
    let (model, _, run, _) = encoder_and_run("refused");
    let server = start(model, ServeConfig::new());
    let cases = [
        (
            json!({"config": {"max_len": 8, "placement": {"train": "BitFit"}}}),
            422,
            "unsupported",
        ),
        (
            json!({"config": {"max_len": 8, "placement": {"train": "Adapters", "block": {"KronAB": {}}}}}),
            422,
            "unsupported",
        ),
        (json!({"config": {"placement": {}}}), 422, "malformed_file"),
        (
            json!({"config": {"max_len": 8}, "labels": ["a", "b"]}),
            422,
            "malformed_file",
        ),
        (json!([1, 2]), 422, "malformed_file"),
    ];
    for (report, status, kind) in cases {
        std::fs::write(run.join("report.json"), report.to_string()).unwrap();
        let (st, v) = post(
            server.addr,
            "/v1/adapters",
            json!({"name": "x", "path": run}),
        );
        assert_eq!(
            (st, v["error"]["type"].as_str()),
            (status, Some(kind)),
            "{report}: {v}"
        );
    }
    // A head for another width.
    std::fs::write(
        run.join("report.json"),
        json!({"config": {"max_len": 8}}).to_string(),
    )
    .unwrap();
    let bytes = kron_adapters::store::st::serialize(
        "head",
        &[
            (
                "head.weight".to_string(),
                safetensors::Dtype::F32,
                vec![5, 3],
                vec![0u8; 60],
            ),
            (
                "head.bias".to_string(),
                safetensors::Dtype::F32,
                vec![3],
                vec![0u8; 12],
            ),
        ],
        Default::default(),
    )
    .unwrap();
    std::fs::write(run.join("trainable.safetensors"), bytes).unwrap();
    let (st, v) = post(
        server.addr,
        "/v1/adapters",
        json!({"name": "x", "path": run}),
    );
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (409, Some("incompatible")),
        "{v}"
    );
    assert_eq!(server.worker.resident().adapters, 0);
}
