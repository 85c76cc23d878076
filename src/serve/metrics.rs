//! The server's counters, rendered in Prometheus' text format at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

use super::worker::ResidentStats;

/// Request latency buckets, seconds.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Batch size buckets (requests or rows).
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram over fixed upper bounds.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch_requests: Histogram,
    batch_rows: Histogram,
    batch_adapters: Histogram,
    generated_tokens: u64,
    failed_batches: u64,
}

/// Request counts and latencies per endpoint and status, batch sizes, generated tokens.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch_requests: Histogram::new(SIZES),
                batch_rows: Histogram::new(SIZES),
                batch_adapters: Histogram::new(SIZES),
                generated_tokens: 0,
                failed_batches: 0,
            }),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, not invariants: keep counting.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request to `endpoint` that answered `status` after `took`.
    pub fn request(&self, endpoint: &str, status: StatusCode, took: Duration) {
        let mut m = self.lock();
        *m.requests
            .entry((endpoint.to_string(), status.as_u16()))
            .or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_insert_with(|| Histogram::new(LATENCY))
            .observe(took.as_secs_f64());
    }

    /// Counts a batch the worker ran: requests, rows (texts or prompts), distinct adapters.
    pub fn batch(&self, requests: usize, rows: usize, adapters: usize) {
        let mut m = self.lock();
        m.batch_requests.observe(requests as f64);
        m.batch_rows.observe(rows as f64);
        m.batch_adapters.observe(adapters as f64);
    }

    /// Counts a batch that failed (its requests got a 500).
    pub fn failed_batch(&self) {
        self.lock().failed_batches += 1;
    }

    /// Counts generated tokens.
    pub fn generated(&self, tokens: usize) {
        self.lock().generated_tokens += tokens as u64;
    }

    /// Requests to `endpoint` answered with `status` so far.
    pub fn count(&self, endpoint: &str, status: u16) -> u64 {
        self.lock()
            .requests
            .get(&(endpoint.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// Everything, in Prometheus' text exposition format, with the resident adapters' gauges.
    pub fn render(&self, resident: ResidentStats) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kron_requests_total Requests by endpoint and status."
        );
        let _ = writeln!(out, "# TYPE kron_requests_total counter");
        for ((e, s), n) in &m.requests {
            let _ = writeln!(
                out,
                "kron_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kron_request_seconds Request latency by endpoint."
        );
        let _ = writeln!(out, "# TYPE kron_request_seconds histogram");
        for (e, h) in &m.latency {
            h.render(
                &mut out,
                "kron_request_seconds",
                &format!("endpoint=\"{e}\""),
            );
        }
        for (name, help, h) in [
            (
                "kron_batch_requests",
                "Requests per batch.",
                &m.batch_requests,
            ),
            (
                "kron_batch_rows",
                "Rows (texts, prompts) per batch.",
                &m.batch_rows,
            ),
            (
                "kron_batch_adapters",
                "Distinct adapters per batch.",
                &m.batch_adapters,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} histogram");
            h.render(&mut out, name, "");
        }
        for (name, kind, help, v) in [
            (
                "kron_generated_tokens_total",
                "counter",
                "Tokens generated.",
                m.generated_tokens,
            ),
            (
                "kron_failed_batches_total",
                "counter",
                "Batches whose inference failed.",
                m.failed_batches,
            ),
            (
                "kron_adapters_resident",
                "gauge",
                "Adapters loaded.",
                resident.adapters as u64,
            ),
            (
                "kron_adapter_params",
                "gauge",
                "Parameters of the loaded adapters.",
                resident.params as u64,
            ),
            (
                "kron_adapter_bytes",
                "gauge",
                "Bytes the loaded adapters take on the device.",
                resident.bytes as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}
