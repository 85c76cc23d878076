//! The inference thread behind the server: it owns the frozen model, gathers the requests that
//! arrive within a window into one batch, routes each row to its adapter
//! ([`crate::multi::Routing`]) and answers each request on its own channel.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{ApiError, Batching, GenerateRequest, ServeConfig};
use crate::error::AdapterError;
use crate::finetune::tokenize::TextEncoder;
use crate::llm::generate::generate_batch;
use crate::llm::{GenerateConfig, TextTokenizer};
use crate::model::bert::mean_pool;
use crate::model::llama::{self, LoadOptions};
use crate::model::{BertConfig, BertEncoder, LlamaForCausalLM, TensorSource};
use crate::multi::{check_name, AdapterBank, AdapterRegistry, Routing};
use crate::quant::QuantConfig;
use crate::shards;
use crate::store::gguf::GgufFile;
use crate::store::{read_any, st, NativeAdapters};
use crate::{ConfigError, NameMap, PlacementConfig};

/// Tokens a generation request without `max_new_tokens` gets at most.
const DEFAULT_NEW_TOKENS: usize = 32;

/// Rows in one encoder forward pass at most (a batch of many long texts runs in chunks).
const ENCODER_ROWS: usize = 64;
/// Padded tokens in one encoder forward pass at most.
const ENCODER_TOKENS: usize = 2048;
/// The fewest padded tokens worth a part of their own ([`classify_parts`]): a forward pass over
/// a few rows streams the whole model's weights for little arithmetic, and two parts would
/// stream them twice (measured with examples/loadgen.rs: batches of one or two rows, one adapter
/// each, 128–138 requests/s in one part, 118–123 split).
const PART_TOKENS: usize = 128;

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
        Self::load_with(path, None, device)
    }

    /// [`Model::load`] with the frozen linear weights held in `frozen`'s scheme (`None`: `f32`),
    /// quantized as they are read ([`TensorSource::quantize_frozen`]).
    pub fn load_with(
        path: &Path,
        frozen: Option<QuantConfig>,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        let shown = path.display().to_string();
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = crate::store::read_text(&cfg_path)?;
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
                if let Some(frozen) = frozen {
                    source.quantize_frozen::<B>(frozen, device)?;
                }
                let encoder =
                    BertEncoder::new(&mut source, &config, &PlacementConfig::new(), device)?;
                source.finish()?;
                let tokenizer = TextEncoder::from_file(&tok, config.max_position_embeddings)?;
                tokenizer.check_vocab(config.vocab_size)?;
                return Ok(Self::Encoder {
                    encoder,
                    tokenizer,
                    config,
                });
            }
            let options = LoadOptions::new().with_frozen(frozen);
            let model = llama::load_with::<B>(path, &options, device)?;
            let tokenizer = TextTokenizer::from_hf_dir(path)?;
            tokenizer.check_vocab(model.config().vocab_size)?;
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
        let options = LoadOptions::new().with_frozen(frozen);
        let model = llama::from_gguf_with::<B>(&file, &shown, &options, device)?;
        tokenizer.check_vocab(model.config().vocab_size)?;
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
        let text = crate::store::read_text(&report_path)?;
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
        let bytes = crate::store::read_file(&ckpt)?;
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
#[derive(Clone)]
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

/// What the server keeps with a resident adapter besides its factors.
struct Extra<B: Backend> {
    /// An encoder adapter's classification head.
    head: Option<Arc<Head>>,
    /// The model with this adapter merged ([`Batching::Merged`]).
    merged: Option<Engine<B>>,
}

struct Shared<B: Backend> {
    registry: AdapterRegistry<B>,
    batching: Batching,
    /// The frozen model, to merge adapters into ([`Batching::Merged`] only).
    base: Option<Engine<B>>,
    device: B::Device,
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
    /// Starts the inference thread for `model` on `device`: requests arriving within
    /// `config.window_ms` of a batch's first one join it, up to `config.max_batch` requests,
    /// batched as `config.batching` says.
    pub fn start(
        model: Model<B>,
        metrics: Arc<super::Metrics>,
        config: &ServeConfig,
        device: &B::Device,
    ) -> Self {
        let window = Duration::from_millis(config.window_ms);
        let max_batch = config.max_batch;
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
        let base = (config.batching == Batching::Merged).then(|| engine.clone());
        let shared = Arc::new(Shared {
            registry,
            batching: config.batching,
            base,
            device: device.clone(),
            tokenizer,
            width,
            describe,
            metrics,
            thread: Mutex::new(None),
        });
        // The model was built on this thread; the worker thread reads it.
        crate::multi::settle::<B>(device);
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
                .map_err(|e| ApiError::bad(format!("text {i}: {}", e)))?;
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
            ));
        }
        if run && !file.exists() {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{}: the run folder has no adapter.safetensors (it trained no linear adapters)",
                    path.display()
                ),
            });
        }
        if encoder && !run {
            return Err(AdapterError::Incompatible {
                message: format!(
                    "{}: an encoder adapter needs its classification head: load the run folder \
                     the main job wrote (report.json, adapter.safetensors, trainable.safetensors)",
                    path.display()
                ),
            });
        }
        let adapters: NativeAdapters = read_any(&file)?.into_adapters();
        let mut resident = self.shared.registry.prepare(&adapters, &NameMap::new())?;
        let mut info = json!({
            "name": name,
            "layers": adapters.meta.layers.len(),
            "params": resident.params,
            "bytes": resident.bytes,
        });
        let head = if encoder {
            let head = Head::from_run(path, self.shared.width)?;
            info["labels"] = json!(head.labels);
            Some(Arc::new(head))
        } else {
            None
        };
        let merged = match &self.shared.base {
            None => None,
            Some(base) => {
                let (merged, bytes) = merge_into(base, &adapters, &self.shared.device)?;
                resident.bytes += bytes;
                info["bytes"] = json!(resident.bytes);
                Some(merged)
            }
        };
        resident.extra = Some(Arc::new(Extra { head, merged }));
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

/// `base` with `adapters` merged into its weights, and the bytes of the weights that differ
/// from the base's (the adapted layers; the rest is shared).
fn merge_into<B: Backend>(
    base: &Engine<B>,
    adapters: &NativeAdapters,
    device: &B::Device,
) -> Result<(Engine<B>, usize), AdapterError> {
    use crate::AdapterLayers;
    let map = NameMap::new();
    let bytes: usize = adapters
        .meta
        .layers
        .values()
        .map(|s| s.d_in * s.d_out * 4)
        .sum();
    let merged = match base {
        Engine::Encoder(m) => {
            Engine::Encoder(crate::attach(m.clone(), adapters, &map, device)?.merge_adapters()?)
        }
        Engine::Decoder(m) => {
            Engine::Decoder(crate::attach(m.clone(), adapters, &map, device)?.merge_adapters()?)
        }
    };
    Ok((merged, bytes))
}

fn extra_of<B: Backend>(bank: &AdapterBank<B>, name: &str) -> Option<Arc<Extra<B>>> {
    bank.get(name)?.extra.clone()?.downcast::<Extra<B>>().ok()
}

/// The head of a resident encoder adapter.
fn head_of<B: Backend>(bank: &AdapterBank<B>, name: &str) -> Result<Arc<Head>, ApiError> {
    bank.get(name).ok_or_else(|| not_found(name))?;
    extra_of(bank, name)
        .and_then(|e| e.head.clone())
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

type ClassifyJob = (Vec<Vec<u32>>, String, Arc<Head>, Reply<Vec<Vec<f32>>>);
type GenerateJob = (Vec<u32>, Option<String>, GenerateConfig, Reply<Vec<u32>>);

/// Splits a window's jobs into the batches `batching` runs: all together ([`Batching::Mixed`]),
/// or one batch per adapter in order of first arrival.
fn batches<T>(
    jobs: Vec<T>,
    batching: Batching,
    key: impl Fn(&T) -> Option<&str>,
) -> Vec<(Option<String>, Vec<T>)> {
    if jobs.is_empty() {
        return Vec::new();
    }
    if batching == Batching::Mixed {
        return vec![(None, jobs)];
    }
    let mut out: Vec<(Option<String>, Vec<T>)> = Vec::new();
    for j in jobs {
        let k = key(&j).map(str::to_string);
        match out.iter_mut().find(|(g, _)| *g == k) {
            Some((_, group)) => group.push(j),
            None => out.push((k, vec![j])),
        }
    }
    out
}

fn process<B: Backend>(engine: &Engine<B>, shared: &Shared<B>, jobs: Vec<Job>, device: &B::Device) {
    let bank = shared.registry.snapshot();
    let mut classify: Vec<ClassifyJob> = Vec::new();
    let mut generate: Vec<GenerateJob> = Vec::new();
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
    // Which model a batch runs on, and whether it routes rows to their adapters: the frozen
    // model with routing, or (merged) the adapter's own merged model.
    let model_for = |key: &Option<String>| -> (Cow<'_, Engine<B>>, bool) {
        match (shared.batching, key) {
            (Batching::Merged, Some(name)) => {
                match extra_of(&bank, name).and_then(|e| e.merged.clone()) {
                    Some(m) => (Cow::Owned(m), false),
                    None => (Cow::Borrowed(engine), true),
                }
            }
            (Batching::Merged, None) => (Cow::Borrowed(engine), false),
            _ => (Cow::Borrowed(engine), true),
        }
    };
    for (key, group) in batches(classify, shared.batching, |j| Some(j.1.as_str())) {
        let (m, route) = model_for(&key);
        if let Engine::Encoder(encoder) = m.as_ref() {
            classify_batch(encoder, route, shared, &bank, group, device);
        }
    }
    for (key, group) in batches(generate, shared.batching, |j| j.1.as_deref()) {
        let (m, route) = model_for(&key);
        if let Engine::Decoder(model) = m.as_ref() {
            generate_batch_jobs(model, route, shared, &bank, group, device);
        }
    }
}

fn classify_batch<B: Backend>(
    encoder: &BertEncoder<B>,
    route: bool,
    shared: &Shared<B>,
    bank: &AdapterBank<B>,
    jobs: Vec<ClassifyJob>,
    device: &B::Device,
) {
    let adapters: std::collections::BTreeSet<&str> = jobs.iter().map(|j| j.1.as_str()).collect();
    let n_rows = jobs.iter().map(|j| j.0.len()).sum();
    shared.metrics.batch(jobs.len(), n_rows, adapters.len());
    let flat: Vec<(&[u32], &str, &Head)> = jobs
        .iter()
        .flat_map(|(rows, name, head, _)| {
            rows.iter()
                .map(move |r| (r.as_slice(), name.as_str(), head.as_ref()))
        })
        .collect();
    // Rows sorted by length and cut into chunks of at most ENCODER_ROWS rows and
    // ENCODER_TOKENS padded tokens: padding every text to the batch's longest wastes more than
    // the larger batch gains (measured with examples/loadgen.rs).
    let mut order: Vec<usize> = (0..flat.len()).collect();
    order.sort_by_key(|&i| flat[i].0.len());
    let mut probs: Vec<Vec<f32>> = vec![Vec::new(); flat.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len()
            && end - start < ENCODER_ROWS
            && (end + 1 - start) * flat[order[end]].0.len() <= ENCODER_TOKENS
        {
            end += 1;
        }
        let chunk: Vec<(&[u32], &str, &Head)> =
            order[start..end].iter().map(|&i| flat[i]).collect();
        match classify_parts(encoder, route.then_some(bank), &chunk, device) {
            Ok(p) => {
                for (&i, row) in order[start..end].iter().zip(p) {
                    probs[i] = row;
                }
            }
            Err(e) => {
                for (.., reply) in jobs {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        }
        start = end;
    }
    let mut probs = probs.into_iter();
    for (rows, _, _, reply) in jobs {
        let _ = reply.send(Ok(probs.by_ref().take(rows.len()).collect()));
    }
}

fn generate_batch_jobs<B: Backend>(
    model: &LlamaForCausalLM<B>,
    route: bool,
    shared: &Shared<B>,
    bank: &AdapterBank<B>,
    jobs: Vec<GenerateJob>,
    device: &B::Device,
) {
    let adapters: std::collections::BTreeSet<&str> =
        jobs.iter().filter_map(|j| j.1.as_deref()).collect();
    shared.metrics.batch(jobs.len(), jobs.len(), adapters.len());
    let eos = match &shared.tokenizer {
        Tokenizer::Decoder { tokenizer, .. } => tokenizer.eos.clone(),
        Tokenizer::Encoder(_) => Vec::new(),
    };
    let prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.0.clone()).collect();
    let configs: Vec<GenerateConfig> = jobs.iter().map(|j| j.2.clone()).collect();
    let names: Vec<Option<&str>> = jobs.iter().map(|j| j.1.as_deref()).collect();
    let result = (if route {
        Routing::new(bank, &names, device).map(Some)
    } else {
        Ok(None)
    })
    .and_then(|routing| {
        generate_batch(model, &prompts, &configs, &eos, routing.as_ref(), device)
            .map_err(AdapterError::from)
    })
    .map_err(ApiError::from);
    match result {
        Ok(outs) => {
            for ((.., reply), out) in jobs.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) => {
            for (.., reply) in jobs {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// [`classify_rows`] over a chunk in [`shards::default_parts`] parts at once (2 on flex and
/// ndarray, whose element-wise work runs on one thread; 1 elsewhere) when it holds at least
/// [`PART_TOKENS`] padded tokens per part, the rows in order.
fn classify_parts<B: Backend>(
    encoder: &BertEncoder<B>,
    bank: Option<&AdapterBank<B>>,
    rows: &[(&[u32], &str, &Head)],
    device: &B::Device,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let padded = rows.len() * rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let parts = shards::default_parts::<B>(device)
        .min(padded / PART_TOKENS)
        .max(1);
    let outs = shards::forward::<B, _, _>(device, rows.len(), parts, |p| {
        classify_rows(encoder, bank, &rows[p.range.clone()], device)
    })?;
    let mut probs = Vec::with_capacity(rows.len());
    for out in outs {
        probs.extend(out?);
    }
    Ok(probs)
}

/// Probabilities of a chunk of rows: one padded batch, each row through its adapter and head.
fn classify_rows<B: Backend>(
    encoder: &BertEncoder<B>,
    bank: Option<&AdapterBank<B>>,
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
    let routing = bank
        .map(|bank| Routing::new(bank, &names, device))
        .transpose()
        .map_err(ApiError::from)?;
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, l]), device);
    let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [b, l]), device);
    let hidden = encoder.forward_routed(ids, mask.clone(), routing.as_ref());
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
