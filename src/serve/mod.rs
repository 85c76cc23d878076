//! An HTTP server for many adapters over one frozen model (feature `serve`): an encoder
//! (`POST /v1/classify`) or a decoder (`POST /v1/generate`), adapters loaded and unloaded at run
//! time (`GET/POST/DELETE /v1/adapters`), `GET /health` and `GET /metrics` (Prometheus text).
//!
//! Requests that arrive within a small window (`window`, up to `max_batch` requests) are batched
//! across adapters: one batch, the frozen base product once, each adapter on its rows only
//! ([`crate::multi`]). Inference runs on one worker thread off the async threads; a batch holds
//! the adapter snapshot it started with, so loading or unloading never disturbs it. Bad input —
//! malformed JSON, unknown fields, an unknown adapter, empty or oversized input, too many tokens
//! — gets a 4xx with a JSON error naming the problem; nothing a client sends makes the server
//! panic. SIGTERM (or Ctrl-C) stops accepting connections and lets requests in flight finish.

pub mod client;
mod metrics;
mod worker;

pub use metrics::Metrics;
pub use worker::{Head, Model, ResidentStats, Worker};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use burn::tensor::backend::Backend;

use crate::error::{AdapterError, ErrorKind};

crate::macros::config! {
    /// The server's limits and batching.
    pub struct ServeConfig(new) {
        required {}
        optional {}
        defaults {
            /// How long the worker waits for more requests to join a batch, milliseconds.
            window_ms: u64 = 5,
            /// Requests in one batch at most.
            max_batch: usize = 32,
            /// Texts in one classify request at most.
            max_texts: usize = 64,
            /// Characters in one text or prompt at most.
            max_chars: usize = 20_000,
            /// Tokens a prompt plus its generation may take at most (also bounded by the model's
            /// context).
            max_tokens: usize = 1024,
            /// Request bodies larger than this are refused (413).
            max_body_bytes: usize = 1 << 20,
            /// Refuse `POST` and `DELETE /v1/adapters` (403): the adapters given at start only.
            /// Loading reads files on the server's disk, so a server reachable by others should
            /// set this (or listen on localhost only, the default address).
            read_only: bool = false,
            /// How a window's requests are batched (mixed adapters in one batch by default).
            batching: Batching = Batching::Mixed,
        }
    }
}

/// The longest batching window [`ServeConfig::validate`] accepts: a lone request waits that
/// long for company.
pub const MAX_WINDOW_MS: u64 = 60_000;

impl ServeConfig {
    /// Checks the limits: each at least 1, the batching window at most [`MAX_WINDOW_MS`].
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        crate::ConfigError::nonzero(
            "serve",
            &[
                ("max_batch", self.max_batch),
                ("max_texts", self.max_texts),
                ("max_chars", self.max_chars),
                ("max_tokens", self.max_tokens),
                ("max_body_bytes", self.max_body_bytes),
            ],
        )?;
        if self.window_ms > MAX_WINDOW_MS {
            return Err(crate::ConfigError::invalid(
                "serve",
                "window_ms",
                format!(
                    "{} ms: a request alone would wait that long for others; use at most \
                     {MAX_WINDOW_MS}",
                    self.window_ms
                ),
            ));
        }
        Ok(())
    }
}

/// How the worker batches the requests of one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum Batching {
    /// One batch for all, each row through its own adapter (the frozen product once).
    #[default]
    Mixed,
    /// One batch per adapter, one after another (a server that switches adapters).
    PerAdapter,
    /// One batch per adapter on a copy of the model with that adapter merged, made when the
    /// adapter loads (no adapter cost per token; the adapted layers' weights once per adapter).
    Merged,
}

/// What the handlers share.
pub struct AppState<B: Backend> {
    worker: Worker<B>,
    /// The counters `/metrics` reports.
    pub metrics: Arc<Metrics>,
    config: ServeConfig,
}

/// An HTTP error with a JSON body `{"error": {"type": ..., "message": ...}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// The status of an error.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let (status, kind) = match e.kind() {
            ErrorKind::Usage => (StatusCode::BAD_REQUEST, "invalid_request"),
            ErrorKind::Io => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::Malformed => (StatusCode::UNPROCESSABLE_ENTITY, "malformed_file"),
            ErrorKind::Unsupported => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported"),
            ErrorKind::Incompatible => (StatusCode::CONFLICT, "incompatible"),
            ErrorKind::Asset => (StatusCode::INTERNAL_SERVER_ERROR, "asset"),
        };
        Self::new(status, kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"type": self.kind, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parses a JSON body into `T`, refusing unknown fields, with errors that name the problem.
fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "too_large",
                "the request body is larger than the server accepts",
            )
        } else {
            ApiError::new(status, "invalid_request", r.body_text())
        }
    })?;
    if body.is_empty() {
        return Err(ApiError::bad("the request has no body: send a JSON object"));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}")))
}

/// `POST /v1/classify`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// The texts.
    pub texts: Vec<String>,
    /// The adapter (with a classification head) to use.
    pub adapter: String,
}

/// `POST /v1/generate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The adapter (none: the base model).
    #[serde(default)]
    pub adapter: Option<String>,
    /// Tokens to generate at most (default: 32, or what the token limit leaves after the
    /// prompt if less).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature (none: greedy).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus threshold.
    #[serde(default = "one")]
    pub top_p: f64,
    /// The sampler's seed.
    #[serde(default)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template.
    #[serde(default)]
    pub chat: bool,
}

fn one() -> f64 {
    1.0
}

/// `POST /v1/adapters`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// The name to serve it under.
    pub name: String,
    /// An adapter file, a PEFT folder, or (encoders) a run folder of the main job.
    pub path: String,
}

async fn classify<B: Backend>(
    State(s): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t = Instant::now();
    let r = async {
        let req: ClassifyRequest = parse(body)?;
        if req.texts.is_empty() {
            return Err(ApiError::bad("`texts` is empty: send at least one text"));
        }
        if req.texts.len() > s.config.max_texts {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "{} texts; at most {} a request",
                    req.texts.len(),
                    s.config.max_texts
                ),
            ));
        }
        if let Some((i, t)) = req
            .texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.trim().is_empty() || t.chars().count() > s.config.max_chars)
        {
            return Err(ApiError::bad(format!(
                "text {i} is empty or longer than {} characters ({} chars)",
                s.config.max_chars,
                t.chars().count()
            )));
        }
        s.worker.classify(req.texts, req.adapter).await
    }
    .await;
    finish(&s, "classify", t, r)
}

async fn generate<B: Backend>(
    State(s): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t = Instant::now();
    let r = async {
        let req: GenerateRequest = parse(body)?;
        if req.prompt.trim().is_empty() {
            return Err(ApiError::bad("`prompt` is empty"));
        }
        if req.prompt.chars().count() > s.config.max_chars {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the prompt is longer than {} characters",
                    s.config.max_chars
                ),
            ));
        }
        if let Some(n) = req.max_new_tokens {
            if n == 0 || n > s.config.max_tokens {
                return Err(ApiError::bad(format!(
                    "`max_new_tokens` {n} is not between 1 and {}",
                    s.config.max_tokens
                )));
            }
        }
        s.worker.generate(req, s.config.max_tokens).await
    }
    .await;
    finish(&s, "generate", t, r)
}

async fn list_adapters<B: Backend>(State(s): State<Arc<AppState<B>>>) -> Response {
    let t = Instant::now();
    let r = Ok(s.worker.list());
    finish(&s, "adapters", t, r)
}

async fn load_adapter<B: Backend>(
    State(s): State<Arc<AppState<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t = Instant::now();
    let r = async {
        read_only(&s.config)?;
        let req: LoadRequest = parse(body)?;
        let worker = s.worker.clone();
        tokio::task::spawn_blocking(move || worker.load(&req.name, std::path::Path::new(&req.path)))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
    }
    .await;
    let r = r.map(|v| (StatusCode::CREATED, v));
    s.metrics.request(
        "adapters_load",
        r.as_ref().map_or_else(|e| e.status(), |(st, _)| *st),
        t.elapsed(),
    );
    match r {
        Ok((st, v)) => (st, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unload_adapter<B: Backend>(
    State(s): State<Arc<AppState<B>>>,
    Path(name): Path<String>,
) -> Response {
    let t = Instant::now();
    let r = read_only(&s.config)
        .and_then(|_| s.worker.unload(&name))
        .map(|_| StatusCode::NO_CONTENT);
    s.metrics.request(
        "adapters_unload",
        r.as_ref().map_or_else(|e| e.status(), |st| *st),
        t.elapsed(),
    );
    match r {
        Ok(st) => st.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn health<B: Backend>(State(s): State<Arc<AppState<B>>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": s.worker.describe(),
        "adapters": s.worker.resident(),
    }))
    .into_response()
}

async fn metrics_text<B: Backend>(State(s): State<Arc<AppState<B>>>) -> Response {
    let text = s.metrics.render(s.worker.resident());
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn fallback() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: see /health, /metrics, /v1/classify, /v1/generate, /v1/adapters",
    )
    .into_response()
}

fn read_only(config: &ServeConfig) -> Result<(), ApiError> {
    if config.read_only {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this server was started read-only: its adapters are fixed",
        ));
    }
    Ok(())
}

fn finish<B: Backend>(
    s: &AppState<B>,
    endpoint: &str,
    t: Instant,
    r: Result<Value, ApiError>,
) -> Response {
    let status = r.as_ref().map_or_else(|e| e.status(), |_| StatusCode::OK);
    s.metrics.request(endpoint, status, t.elapsed());
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The router of a server around `worker`.
pub fn router<B: Backend>(worker: Worker<B>, metrics: Arc<Metrics>, config: ServeConfig) -> Router {
    let limit = config.max_body_bytes;
    let state = Arc::new(AppState {
        worker,
        metrics,
        config,
    });
    Router::new()
        .route("/v1/classify", post(classify::<B>))
        .route("/v1/generate", post(generate::<B>))
        .route(
            "/v1/adapters",
            get(list_adapters::<B>).post(load_adapter::<B>),
        )
        .route("/v1/adapters/{name}", delete(unload_adapter::<B>))
        .route("/health", get(health::<B>))
        .route("/metrics", get(metrics_text::<B>))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves `model` on `addr` (on `device`) until SIGTERM or Ctrl-C, letting requests in flight
/// finish; `adapters` are loaded first (name, path), and `ready` hears the bound address (port 0
/// picks a free one).
pub async fn serve<B: Backend>(
    model: Model<B>,
    adapters: Vec<(String, std::path::PathBuf)>,
    addr: SocketAddr,
    config: ServeConfig,
    device: &B::Device,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), AdapterError> {
    config.validate()?;
    let metrics = Arc::new(Metrics::default());
    let worker = Worker::start(model, metrics.clone(), &config, device);
    let result = async {
        for (name, path) in adapters {
            worker.load_adapter(&name, &path)?;
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AdapterError::io(addr.to_string(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| AdapterError::io(addr.to_string(), e))?;
        ready(bound);
        axum::serve(listener, router(worker.clone(), metrics, config))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| AdapterError::io(bound.to_string(), e))
    }
    .await;
    worker.stop();
    result
}

/// A server running on threads of its own (to embed one in a program, or in tests); it stops —
/// letting requests in flight finish — when dropped.
pub struct Running<B: Backend> {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Its worker (to load adapters without HTTP).
    pub worker: Worker<B>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Starts serving `model` on `addr` (port 0: a free port) in the background.
pub fn spawn<B: Backend>(
    model: Model<B>,
    addr: SocketAddr,
    config: ServeConfig,
    device: &B::Device,
) -> Result<Running<B>, AdapterError> {
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AdapterError::io("tokio runtime", e))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| AdapterError::io(addr.to_string(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AdapterError::io(addr.to_string(), e))?;
    let metrics = Arc::new(Metrics::default());
    let worker = Worker::start(model, metrics.clone(), &config, device);
    let app = router(worker.clone(), metrics.clone(), config);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = runtime.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Running {
        addr: bound,
        metrics,
        worker,
        shutdown: Some(tx),
        task: Some(task),
        runtime: Some(runtime),
    })
}

impl<B: Backend> Drop for Running<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Requests in flight finish (up to a minute) before the worker stops.
        if let (Some(rt), Some(task)) = (&self.runtime, self.task.take()) {
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), task).await });
        }
        self.worker.stop();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
