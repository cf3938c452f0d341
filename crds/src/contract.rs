//! The worker <-> operator contract: ports, metric names, labels and environment.
//!
//! The worker exports exactly these series and the operator's PromQL reads exactly
//! these names; nothing else in the project spells them. This module must stay free
//! of dependencies so that any binary can use it.

/// The one TCP port the worker serves on: the OpenAI-compatible route, `/health`,
/// `/ready` and `/metrics`.
pub const DEFAULT_WORKER_PORT: u16 = 8080;
/// Name of the worker's container port; the Service targets it by name.
pub const WORKER_PORT_NAME: &str = "http";
/// Liveness: the process is alive.
pub const HEALTH_PATH: &str = "/health";
/// Readiness: the model is loaded and warmed, and the worker is not draining.
pub const READY_PATH: &str = "/ready";
/// Prometheus exposition.
pub const METRICS_PATH: &str = "/metrics";

/// Series names as they appear in the exposition (and so in PromQL).
pub mod metrics {
    /// Gauge: requests admitted and waiting for a batch.
    pub const QUEUE_DEPTH: &str = "kestrel_worker_queue_depth";
    /// Gauge: requests admitted and not yet answered (waiting or running).
    pub const IN_FLIGHT: &str = "kestrel_worker_in_flight_requests";
    /// Histogram (seconds): admission to response, for every answered request.
    pub const REQUEST_DURATION: &str = "kestrel_worker_request_duration_seconds";
    /// Histogram (seconds): admission to the start of the batch that ran it.
    pub const QUEUE_WAIT: &str = "kestrel_worker_queue_wait_seconds";
    /// Histogram: requests (embeddings task: inputs) per executed batch.
    pub const BATCH_SIZE: &str = "kestrel_worker_batch_size";
    /// Counter: requests by `outcome` (see [`super::labels::OUTCOME`]).
    pub const REQUESTS_TOTAL: &str = "kestrel_worker_requests_total";
    /// Counter: input tokens processed.
    pub const TOKENS_TOTAL: &str = "kestrel_worker_tokens_total";
    /// Gauge, always 1: labels `model`, `variant`, `precision`, `device`.
    pub const MODEL_INFO: &str = "kestrel_worker_model_info";

    // Text generation (the generation task adds these; same naming rules).
    /// Histogram (seconds): admission to the first generated token.
    pub const TIME_TO_FIRST_TOKEN: &str = "kestrel_worker_time_to_first_token_seconds";
    /// Histogram (seconds): gap between consecutive generated tokens of a sequence.
    pub const INTER_TOKEN_LATENCY: &str = "kestrel_worker_inter_token_latency_seconds";
    /// Counter: prompt tokens processed.
    pub const PROMPT_TOKENS_TOTAL: &str = "kestrel_worker_prompt_tokens_total";
    /// Counter: tokens generated.
    pub const GENERATED_TOKENS_TOTAL: &str = "kestrel_worker_generated_tokens_total";
    /// Gauge: sequences being decoded.
    pub const RUNNING_SEQUENCES: &str = "kestrel_worker_running_sequences";
    /// Gauge: sequences admitted and waiting for a decode slot.
    pub const WAITING_SEQUENCES: &str = "kestrel_worker_waiting_sequences";
    /// Gauge: fraction (0..1) of the KV-cache budget in use.
    pub const KV_CACHE_USAGE: &str = "kestrel_worker_kv_cache_usage_ratio";

    /// Bucket bounds (seconds) of the duration histograms: 1 ms … 10 s.
    pub const DURATION_BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
        5.0, 10.0,
    ];
    /// Bucket bounds of the batch-size histogram.
    pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
}

/// Metric label names and values.
pub mod labels {
    pub const OUTCOME: &str = "outcome";
    pub const OUTCOME_OK: &str = "ok";
    pub const OUTCOME_REJECTED: &str = "rejected";
    pub const OUTCOME_ERROR: &str = "error";
    pub const OUTCOME_CANCELLED: &str = "cancelled";
    pub const MODEL: &str = "model";
    pub const VARIANT: &str = "variant";
    pub const PRECISION: &str = "precision";
    pub const DEVICE: &str = "device";
}

/// Kubernetes labels the operator puts on every object and pod it makes. Prometheus'
/// pod discovery maps pod labels to series labels with `.`, `/` and `-` turned into `_`.
pub mod pod_labels {
    pub const MODEL_DEPLOYMENT: &str = "kestrel.dev/model-deployment";
    pub const VARIANT: &str = "kestrel.dev/variant";
    /// The same labels as Prometheus series labels.
    pub const MODEL_DEPLOYMENT_SERIES: &str = "kestrel_dev_model_deployment";
    pub const VARIANT_SERIES: &str = "kestrel_dev_variant";
}

/// Environment the operator sets on worker containers (the worker reads flags; these
/// are their env fallbacks).
pub mod env {
    pub const MODEL_DIR: &str = "KESTREL_MODEL_DIR";
    pub const VARIANT: &str = "KESTREL_VARIANT";
    pub const PORT: &str = "KESTREL_PORT";
    pub const MAX_QUEUE: &str = "KESTREL_MAX_QUEUE";
    pub const MAX_BATCH: &str = "KESTREL_MAX_BATCH";
    pub const DEVICE: &str = "KESTREL_DEVICE";
    pub const DRAIN_DELAY_SECONDS: &str = "KESTREL_DRAIN_DELAY_SECONDS";
}
