//! The inference thread behind the server: it owns the frozen model, gathers the requests that
//! arrive within a window into one batch, routes each row to its adapter
//! ([`crate::multi::Routing`]) and answers each request on its own channel.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{ApiError, GenerateRequest};
use crate::error::AdapterError;
use crate::finetune::tokenize::TextEncoder;
use crate::llm::generate::generate_batch;
use crate::llm::{GenerateConfig, TextTokenizer};
use crate::model::bert::mean_pool;
use crate::model::llama;
use crate::model::{BertConfig, BertEncoder, LlamaForCausalLM, TensorSource};
use crate::multi::{check_name, AdapterBank, AdapterRegistry, Routing};
use crate::store::gguf::GgufFile;
use crate::store::{read_any, st, NativeAdapters};
use crate::{ConfigError, NameMap, PlacementConfig};

/// Tokens a generation request without `max_new_tokens` gets at most.
const DEFAULT_NEW_TOKENS: usize = 32;

/// Rows in one encoder forward pass at most (a batch of many long texts runs in chunks).
const ENCODER_ROWS: usize = 64;

/// A frozen model to serve, with its tokenizer.
pub enum Model<B: Backend> {
    /// A BERT encoder: `/v1/classify`, with adapters that carry a classification head.
    Encoder {
        /// The encoder.
        encoder: BertEncoder<B>,
        /// Its tokenizer (truncation at the model's context; each adapter truncates further to
        /// the length it was trained with).
        tokenizer: TextEncoder,
        /// Its configuration.
        config: BertConfig,
    },
    /// A Llama-family decoder: `/v1/generate`.
    Decoder {
        /// The model.
        model: LlamaForCausalLM<B>,
        /// Its tokenizer.
        tokenizer: TextTokenizer,
    },
}

impl<B: Backend> Model<B> {
    /// Loads the model at `path`: a folder whose `config.json` says `"model_type": "bert"` is an
    /// encoder (with `model.safetensors` and `tokenizer.json`); another folder (Hugging Face
    /// Llama layout) or a `.gguf` file is a decoder. Either needs its tokenizer.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self, AdapterError> {
        let shown = path.display().to_string();
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| AdapterError::io(&cfg_path, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| AdapterError::format(cfg_path.display().to_string(), e.to_string()))?;
            let tok = path.join("tokenizer.json");
            if !tok.exists() {
                return Err(AdapterError::Incompatible {
                    message: format!(
                        "{shown} has no tokenizer.json: the server needs the model's tokenizer"
                    ),
                });
            }
            if v.get("model_type").and_then(Value::as_str) == Some("bert") {
                let config = BertConfig::from_json_file(&cfg_path)?;
                let mut source = TensorSource::from_model_dir(path)?;
                let encoder =
                    BertEncoder::new(&mut source, &config, &PlacementConfig::new(), device)?;
                source.finish()?;
                let tokenizer = TextEncoder::from_file(&tok, config.max_position_embeddings)?;
                return Ok(Self::Encoder {
                    encoder,
                    tokenizer,
                    config,
                });
            }
            let model = llama::load::<B>(path, &PlacementConfig::new(), device)?;
            let tokenizer = TextTokenizer::from_hf_dir(path)?;
            return Ok(Self::Decoder { model, tokenizer });
        }
        let file = GgufFile::read(path)?;
        if file.get("tokenizer.ggml.model").is_none() {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{shown} holds no tokenizer: the server needs the model's tokenizer"
                ),
            });
        }
        let tokenizer = TextTokenizer::from_gguf(&file, &shown)?;
        let model = llama::from_gguf::<B>(&file, &shown, &PlacementConfig::new(), device)?;
        Ok(Self::Decoder { model, tokenizer })
    }

    /// `"encoder"` or `"decoder"`, with the model's size.
    pub fn describe(&self) -> Value {
        match self {
            Self::Encoder { config, .. } => json!({
                "kind": "encoder",
                "layers": config.num_hidden_layers,
                "hidden_size": config.hidden_size,
                "endpoint": "/v1/classify",
            }),
            Self::Decoder { model, .. } => json!({
                "kind": "decoder",
                "model_type": model.config().model_type,
                "layers": model.config().num_hidden_layers,
                "hidden_size": model.config().hidden_size,
                "context": model.config().max_position_embeddings,
                "endpoint": "/v1/generate",
            }),
        }
    }
}

/// A classification head kept with an encoder adapter: `logits = x · weight + bias`.
#[derive(Debug)]
pub struct Head {
    /// `[d, classes]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Class names.
    pub labels: Vec<String>,
    /// Tokens the adapter was trained on at most (longer texts are truncated to it).
    pub max_len: usize,
}

impl Head {
    /// Reads the head of a run folder of the main job (`report.json` and
    /// `trainable.safetensors`) for an encoder of width `d`.
    pub fn from_run(dir: &Path, d: usize) -> Result<Self, AdapterError> {
        let report_path = dir.join("report.json");
        let shown = report_path.display().to_string();
        let text =
            std::fs::read_to_string(&report_path).map_err(|e| AdapterError::io(&report_path, e))?;
        let report: Value =
            serde_json::from_str(&text).map_err(|e| AdapterError::format(&shown, e.to_string()))?;
        let cfg = report.get("config").ok_or_else(|| {
            AdapterError::format(&shown, "no `config`: not a report of the main job")
        })?;
        let placement = cfg.get("placement");
        if placement
            .and_then(|p| p.get("block"))
            .is_some_and(|b| !b.is_null())
        {
            return Err(AdapterError::Unsupported {
                option: "placement.block".into(),
                message: format!(
                    "{}: the run trained block adapters, which change the model's blocks rather \
                     than its linear layers; serve it merged on its own model",
                    dir.display()
                ),
            });
        }
        let train = placement
            .and_then(|p| p.get("train"))
            .and_then(Value::as_str)
            .unwrap_or("Adapters");
        if train != "Adapters" {
            return Err(AdapterError::Unsupported {
                option: "placement.train".into(),
                message: format!(
                    "{}: the run trained in mode {train}, which changes the frozen model's own \
                     weights; only adapters (mode Adapters) can share one model",
                    dir.display()
                ),
            });
        }
        let max_len = cfg
            .get("max_len")
            .and_then(Value::as_u64)
            .ok_or_else(|| AdapterError::format(&shown, "`config.max_len` is missing"))?
            as usize;
        if max_len < 3 {
            return Err(AdapterError::format(
                &shown,
                format!("`config.max_len` {max_len} is below 3"),
            ));
        }
        let ckpt = dir.join("trainable.safetensors");
        let ckpt_shown = ckpt.display().to_string();
        let bytes = std::fs::read(&ckpt).map_err(|e| AdapterError::io(&ckpt, e))?;
        let file = st::parse(&ckpt_shown, &bytes)?;
        let get = |name: &str| {
            file.tensor(name).map_err(|_| AdapterError::Format {
                path: ckpt_shown.clone(),
                message: format!("no tensor `{name}`: the run's classification head is missing"),
            })
        };
        let (w, b) = (get("head.weight")?, get("head.bias")?);
        let classes = b.shape().first().copied().unwrap_or(0);
        if b.shape().len() != 1 || w.shape() != [d, classes] || classes < 2 {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{ckpt_shown}: head.weight {:?} and head.bias {:?} do not make a head for a \
                     model of width {d} (expected [{d}, classes] and [classes], classes ≥ 2)",
                    w.shape(),
                    b.shape()
                ),
            });
        }
        let weight = st::decode_f32(&ckpt_shown, "head.weight", &w)?;
        let bias = st::decode_f32(&ckpt_shown, "head.bias", &b)?;
        let labels = match report.get("labels").and_then(Value::as_array) {
            Some(l) if !l.is_empty() => {
                let l: Vec<String> = l
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect();
                if l.len() != classes {
                    return Err(AdapterError::format(
                        &shown,
                        format!("{} labels for a head of {classes} classes", l.len()),
                    ));
                }
                l
            }
            _ => (0..classes).map(|c| c.to_string()).collect(),
        };
        Ok(Self {
            weight,
            bias,
            labels,
            max_len,
        })
    }

    /// Class probabilities of one pooled row.
    pub fn probabilities(&self, x: &[f32]) -> Vec<f32> {
        let classes = self.bias.len();
        let mut logits = self.bias.clone();
        for (i, xi) in x.iter().enumerate() {
            for (c, l) in logits.iter_mut().enumerate() {
                *l += xi * self.weight[i * classes + c];
            }
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        exp.into_iter().map(|e| e / sum).collect()
    }
}

/// Sizes of the resident adapters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ResidentStats {
    /// Adapters loaded.
    pub adapters: usize,
    /// Their parameters.
    pub params: usize,
    /// Bytes they take on the device.
    pub bytes: usize,
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

enum Job {
    Classify {
        rows: Vec<Vec<u32>>,
        adapter: String,
        reply: Reply<Vec<Vec<f32>>>,
    },
    Generate {
        prompt: Vec<u32>,
        adapter: Option<String>,
        config: GenerateConfig,
        reply: Reply<Vec<u32>>,
    },
    Stop,
}

/// The model's compute half, owned by the worker thread.
enum Engine<B: Backend> {
    Encoder(BertEncoder<B>),
    Decoder(LlamaForCausalLM<B>),
}

enum Tokenizer {
    Encoder(TextEncoder),
    Decoder {
        tokenizer: TextTokenizer,
        context: usize,
    },
}

struct Shared<B: Backend> {
    registry: AdapterRegistry<B>,
    tokenizer: Tokenizer,
    /// The encoder's width (for heads).
    width: usize,
    describe: Value,
    metrics: Arc<super::Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on the inference thread (cheap to clone).
pub struct Worker<B: Backend> {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared<B>>,
}

impl<B: Backend> Clone for Worker<B> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "adapter_not_found",
        format!("no adapter named {name:?} is loaded (GET /v1/adapters lists them)"),
    )
}

fn gone() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the request was dropped: the server is stopping, or its batch failed (see the metrics)",
    )
}

impl<B: Backend> Worker<B> {
    /// Starts the inference thread for `model` on `device`: requests arriving within `window`
    /// of a batch's first one join it, up to `max_batch` requests.
    pub fn start(
        model: Model<B>,
        metrics: Arc<super::Metrics>,
        window: Duration,
        max_batch: usize,
        device: &B::Device,
    ) -> Self {
        let describe = model.describe();
        let (engine, tokenizer, width) = match model {
            Model::Encoder {
                encoder,
                tokenizer,
                config,
            } => (
                Engine::Encoder(encoder),
                Tokenizer::Encoder(tokenizer),
                config.hidden_size,
            ),
            Model::Decoder { model, tokenizer } => {
                let context = model.config().max_position_embeddings;
                let d = model.config().hidden_size;
                (
                    Engine::Decoder(model),
                    Tokenizer::Decoder { tokenizer, context },
                    d,
                )
            }
        };
        let registry = match &engine {
            Engine::Encoder(m) => AdapterRegistry::new(m, device),
            Engine::Decoder(m) => AdapterRegistry::new(m, device),
        };
        let shared = Arc::new(Shared {
            registry,
            tokenizer,
            width,
            describe,
            metrics,
            thread: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let inner = shared.clone();
        let device = device.clone();
        let handle = std::thread::Builder::new()
            .name("kron-serve-worker".into())
            .spawn(move || run(engine, &inner, rx, window, max_batch.max(1), &device))
            .ok();
        *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = handle;
        Self { tx, shared }
    }

    fn send<T>(
        &self,
        job: impl FnOnce(Reply<T>) -> Job,
    ) -> Result<oneshot::Receiver<Result<T, ApiError>>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(job(reply)).map_err(|_| gone())?;
        Ok(rx)
    }

    /// Class probabilities of `texts` with the adapter `adapter` (and its head).
    pub async fn classify(&self, texts: Vec<String>, adapter: String) -> Result<Value, ApiError> {
        let Tokenizer::Encoder(tok) = &self.shared.tokenizer else {
            return Err(ApiError::bad(
                "this server runs a decoder: use POST /v1/generate",
            ));
        };
        let bank = self.shared.registry.snapshot();
        let head = head_of(&bank, &adapter)?;
        let mut rows = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let mut ids = tok
                .encode(t)
                .map_err(|e| ApiError::bad(format!("text {i}: {}", AdapterError::from(e))))?;
            truncate(&mut ids, head.max_len);
            rows.push(ids);
        }
        drop(bank);
        let rx = self.send(|reply| Job::Classify {
            rows,
            adapter: adapter.clone(),
            reply,
        })?;
        let probs = rx.await.map_err(|_| gone())??;
        let predictions: Vec<Value> = probs
            .iter()
            .map(|p| {
                let best = crate::llm::generate::argmax(p);
                json!({
                    "label": head.labels[best],
                    "index": best,
                    "scores": head.labels.iter().zip(p).map(|(l, s)| (l.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        Ok(json!({"adapter": adapter, "predictions": predictions}))
    }

    /// A completion of the request's prompt (with its adapter, or the base model).
    pub async fn generate(
        &self,
        req: GenerateRequest,
        max_tokens: usize,
    ) -> Result<Value, ApiError> {
        let Tokenizer::Decoder { tokenizer, context } = &self.shared.tokenizer else {
            return Err(ApiError::bad(
                "this server runs an encoder: use POST /v1/classify",
            ));
        };
        if let Some(name) = &req.adapter {
            if self.shared.registry.snapshot().get(name).is_none() {
                return Err(not_found(name));
            }
        }
        let text = if req.chat {
            tokenizer
                .chat_prompt(&req.prompt)
                .map_err(|e| ApiError::bad(e.to_string()))?
        } else {
            req.prompt.clone()
        };
        let prompt = tokenizer
            .encode(&text, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let limit = max_tokens.min(*context);
        let new_tokens = req
            .max_new_tokens
            .unwrap_or_else(|| DEFAULT_NEW_TOKENS.min(limit.saturating_sub(prompt.len()).max(1)));
        if prompt.is_empty() || prompt.len() + new_tokens > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "{} prompt tokens + {} new tokens exceed the limit of {limit} tokens: shorten \
                     the prompt or ask for fewer tokens",
                    prompt.len(),
                    new_tokens
                ),
            ));
        }
        let mut config = GenerateConfig::new()
            .with_max_new_tokens(new_tokens)
            .with_top_p(req.top_p)
            .with_seed(req.seed);
        config.temperature = req.temperature;
        config
            .validate()
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let n_prompt = prompt.len();
        let rx = self.send(|reply| Job::Generate {
            prompt,
            adapter: req.adapter.clone(),
            config,
            reply,
        })?;
        let tokens = rx.await.map_err(|_| gone())??;
        self.shared.metrics.generated(tokens.len());
        let finish = if tokens.last().is_some_and(|t| tokenizer.eos.contains(t)) {
            "stop"
        } else {
            "length"
        };
        let text = tokenizer.decode(&tokens, true).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        Ok(json!({
            "adapter": req.adapter,
            "text": text,
            "prompt_tokens": n_prompt,
            "tokens": tokens.len(),
            "finish_reason": finish,
        }))
    }

    /// Loads the adapter at `path` as `name` (replacing one of that name): an adapter file, a
    /// PEFT folder, or a run folder (`report.json` and `adapter.safetensors`; an encoder's also
    /// `trainable.safetensors` for its head). Blocks while reading; the resident set is
    /// unchanged on error.
    pub fn load(&self, name: &str, path: &Path) -> Result<Value, ApiError> {
        self.load_adapter(name, path).map_err(ApiError::from)
    }

    /// [`Worker::load`] with the library's error (for callers outside HTTP).
    pub fn load_adapter(&self, name: &str, path: &Path) -> Result<Value, AdapterError> {
        check_name(name)?;
        if !path.exists() {
            let e = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or folder on the server",
            );
            return Err(AdapterError::io(path, e));
        }
        let encoder = matches!(self.shared.tokenizer, Tokenizer::Encoder(_));
        let run = path.is_dir() && path.join("report.json").exists();
        let file = if run {
            path.join("adapter.safetensors")
        } else {
            path.to_path_buf()
        };
        if path.is_dir() && !run && !path.join("adapter_config.json").exists() {
            return Err(AdapterError::format(
                path.display().to_string(),
                "a folder that is neither a PEFT adapter (adapter_config.json) nor a run folder \
                 (report.json and adapter.safetensors)",
            )
            .into());
        }
        if run && !file.exists() {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{}: the run folder has no adapter.safetensors (it trained no linear adapters)",
                    path.display()
                ),
            }
            .into());
        }
        if encoder && !run {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{}: an encoder adapter needs its classification head: load the run folder \
                     the main job wrote (report.json, adapter.safetensors, trainable.safetensors)",
                    path.display()
                ),
            }
            .into());
        }
        let adapters: NativeAdapters = read_any(&file)?.into_adapters();
        let mut resident = self.shared.registry.prepare(&adapters, &NameMap::new())?;
        let mut info = json!({
            "name": name,
            "layers": adapters.meta.layers.len(),
            "params": resident.params,
            "bytes": resident.bytes,
        });
        if encoder {
            let head = Head::from_run(path, self.shared.width)?;
            info["labels"] = json!(head.labels);
            resident.extra = Some(Arc::new(head));
        }
        let replaced = self.shared.registry.snapshot().get(name).is_some();
        self.shared.registry.insert(name, resident);
        info["replaced"] = json!(replaced);
        Ok(info)
    }

    /// Unloads `name` (requests in flight keep it until they finish).
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        self.shared
            .registry
            .unload(name)
            .map_err(|_| not_found(name))
    }

    /// The resident adapters.
    pub fn list(&self) -> Value {
        let bank = self.shared.registry.snapshot();
        let list: Vec<Value> = bank
            .list()
            .into_iter()
            .map(|(name, params, bytes)| json!({"name": name, "params": params, "bytes": bytes}))
            .collect();
        json!({ "adapters": list })
    }

    /// Totals of the resident adapters.
    pub fn resident(&self) -> ResidentStats {
        let bank = self.shared.registry.snapshot();
        bank.list()
            .into_iter()
            .fold(ResidentStats::default(), |mut s, (_, p, b)| {
                s.adapters += 1;
                s.params += p;
                s.bytes += b;
                s
            })
    }

    /// The model being served.
    pub fn describe(&self) -> Value {
        self.shared.describe.clone()
    }

    /// Stops the thread after the batch it is running, and waits for it.
    pub fn stop(&self) {
        let _ = self.tx.send(Job::Stop);
        let handle = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The head of a resident encoder adapter.
fn head_of<B: Backend>(bank: &AdapterBank<B>, name: &str) -> Result<Arc<Head>, ApiError> {
    let r = bank.get(name).ok_or_else(|| not_found(name))?;
    r.extra
        .clone()
        .and_then(|e| e.downcast::<Head>().ok())
        .ok_or_else(|| ApiError::bad(format!("adapter {name:?} has no classification head")))
}

/// Truncates `[CLS] … [SEP]` to `max_len` tokens keeping the final `[SEP]` (what the tokenizer's
/// own truncation does for a single text).
fn truncate(ids: &mut Vec<u32>, max_len: usize) {
    if ids.len() > max_len {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
}

/// The worker's loop: a blocking wait for a request, a window for more, the batch.
fn run<B: Backend>(
    engine: Engine<B>,
    shared: &Shared<B>,
    rx: mpsc::Receiver<Job>,
    window: Duration,
    max_batch: usize,
    device: &B::Device,
) {
    loop {
        let mut jobs = match rx.recv() {
            Ok(Job::Stop) | Err(_) => return,
            Ok(j) => vec![j],
        };
        let deadline = Instant::now() + window;
        let mut stop = false;
        while jobs.len() < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    stop = true;
                    break;
                }
                Ok(j) => jobs.push(j),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        // A failure inside the backend must not take the server down: the batch's requests
        // lose their reply channels (503) and the worker goes on.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process(&engine, shared, jobs, device)
        }));
        if outcome.is_err() {
            shared.metrics.failed_batch();
        }
        if stop {
            return;
        }
    }
}

fn process<B: Backend>(engine: &Engine<B>, shared: &Shared<B>, jobs: Vec<Job>, device: &B::Device) {
    let bank = shared.registry.snapshot();
    let mut classify = Vec::new();
    let mut generate = Vec::new();
    for job in jobs {
        match job {
            Job::Classify {
                rows,
                adapter,
                reply,
            } => match head_of(&bank, &adapter) {
                Ok(head) => classify.push((rows, adapter, head, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Job::Generate {
                prompt,
                adapter,
                config,
                reply,
            } => match &adapter {
                Some(name) if bank.get(name).is_none() => {
                    let _ = reply.send(Err(not_found(name)));
                }
                _ => generate.push((prompt, adapter, config, reply)),
            },
            Job::Stop => {}
        }
    }
    match engine {
        Engine::Encoder(encoder) if !classify.is_empty() => {
            let adapters: std::collections::BTreeSet<&str> =
                classify.iter().map(|j| j.1.as_str()).collect();
            let n_rows = classify.iter().map(|j| j.0.len()).sum();
            shared.metrics.batch(classify.len(), n_rows, adapters.len());
            let flat: Vec<(&[u32], &str, &Head)> = classify
                .iter()
                .flat_map(|(rows, name, head, _)| {
                    rows.iter()
                        .map(move |r| (r.as_slice(), name.as_str(), head.as_ref()))
                })
                .collect();
            let mut probs = Vec::with_capacity(flat.len());
            for chunk in flat.chunks(ENCODER_ROWS) {
                match classify_rows(encoder, &bank, chunk, device) {
                    Ok(p) => probs.extend(p),
                    Err(e) => {
                        for (.., reply) in classify {
                            let _ = reply.send(Err(e.clone()));
                        }
                        return;
                    }
                }
            }
            let mut probs = probs.into_iter();
            for (rows, _, _, reply) in classify {
                let _ = reply.send(Ok(probs.by_ref().take(rows.len()).collect()));
            }
        }
        Engine::Decoder(model) if !generate.is_empty() => {
            let adapters: std::collections::BTreeSet<&str> =
                generate.iter().filter_map(|j| j.1.as_deref()).collect();
            shared
                .metrics
                .batch(generate.len(), generate.len(), adapters.len());
            let eos = match &shared.tokenizer {
                Tokenizer::Decoder { tokenizer, .. } => tokenizer.eos.clone(),
                Tokenizer::Encoder(_) => Vec::new(),
            };
            let prompts: Vec<Vec<u32>> = generate.iter().map(|j| j.0.clone()).collect();
            let configs: Vec<GenerateConfig> = generate.iter().map(|j| j.2.clone()).collect();
            let names: Vec<Option<&str>> = generate.iter().map(|j| j.1.as_deref()).collect();
            let result = Routing::new(&bank, &names, device)
                .and_then(|routing| {
                    generate_batch(model, &prompts, &configs, &eos, Some(&routing), device)
                        .map_err(AdapterError::from)
                })
                .map_err(ApiError::from);
            match result {
                Ok(outs) => {
                    for ((.., reply), out) in generate.into_iter().zip(outs) {
                        let _ = reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    for (.., reply) in generate {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        _ => {}
    }
}

/// Probabilities of a chunk of rows: one padded batch, each row through its adapter and head.
fn classify_rows<B: Backend>(
    encoder: &BertEncoder<B>,
    bank: &AdapterBank<B>,
    rows: &[(&[u32], &str, &Head)],
    device: &B::Device,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let b = rows.len();
    let l = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![0i64; b * l];
    let mut mask = vec![0i64; b * l];
    for (i, (r, ..)) in rows.iter().enumerate() {
        for (j, &t) in r.iter().enumerate() {
            ids[i * l + j] = i64::from(t);
            mask[i * l + j] = 1;
        }
    }
    let names: Vec<Option<&str>> = rows.iter().map(|r| Some(r.1)).collect();
    let routing = Routing::new(bank, &names, device).map_err(ApiError::from)?;
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, l]), device);
    let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [b, l]), device);
    let hidden = encoder.forward_routed(ids, mask.clone(), Some(&routing));
    let pooled: Vec<f32> = mean_pool(hidden, mask)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{e:?}"),
            )
        })?;
    let d = pooled.len() / b;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, r)| r.2.probabilities(&pooled[i * d..(i + 1) * d]))
        .collect())
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        AdapterError::from(e).into()
    }
}
