//! Serving signals behind one trait, so reconcile reads them the same way from a real
//! Prometheus or from a test's table.

use futures::future::BoxFuture;

/// What reconcile asks for: one ModelDeployment's workers.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalsQuery {
    pub namespace: String,
    pub name: String,
    /// The latency histogram whose p95 is compared with the SLO.
    pub latency_metric: &'static str,
    /// Window for rates and quantiles, in seconds.
    pub window_seconds: u32,
    /// Short window for burst detection and gauge averages, in seconds.
    pub short_window_seconds: u32,
    /// Text generation: also read prompt and generated tokens per request.
    pub generation: bool,
}

/// Signals of one ModelDeployment at one instant (sums over its workers).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Signals {
    /// Requests admitted and waiting for a batch (averaged over a short window).
    pub waiting: f64,
    /// Requests admitted and not answered, waiting or running (averaged likewise).
    pub in_flight: f64,
    /// Requests per second arriving, answered or refused, over the stable window.
    pub arrival_rate: f64,
    /// Requests per second arriving over a short window (burst detection).
    pub arrival_rate_short: Option<f64>,
    /// Requests per second answered successfully.
    pub throughput: f64,
    /// p95 latency in milliseconds; None when no request completed in the window.
    pub p95_ms: Option<f64>,
    /// Text generation: prompt tokens per answered request over the stable window.
    pub prompt_tokens_per_request: Option<f64>,
    /// Text generation: generated tokens per answered request over the stable window.
    pub generated_tokens_per_request: Option<f64>,
    /// Workers Prometheus scraped successfully.
    pub scraped_workers: u32,
    /// Age of the newest sample, seconds.
    pub age_seconds: f64,
}

/// The outcome of reading signals: a reading, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum SignalsReading {
    Fresh(Signals),
    /// No worker has been scraped yet (e.g. no pod is running).
    NoData,
    /// The metrics backend failed; the message says how.
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error("failed to query Prometheus at {url}: {message}")]
    Query { url: String, message: String },
}

/// A source of serving signals.
pub trait MetricsSource: Send + Sync {
    fn read<'a>(&'a self, query: &'a SignalsQuery) -> BoxFuture<'a, SignalsReading>;
}

/// No metrics backend configured: every read says so.
pub struct NoMetrics;

impl MetricsSource for NoMetrics {
    fn read<'a>(&'a self, _query: &'a SignalsQuery) -> BoxFuture<'a, SignalsReading> {
        Box::pin(async {
            SignalsReading::Unavailable("no Prometheus URL is configured (--prometheus-url)".into())
        })
    }
}
pub mod prometheus;
