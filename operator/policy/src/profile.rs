//! The worker profile: capacity data measured by `kestrel-worker profile --json`.
//!
//! This module is the schema of that JSON (`kestrel.dev/worker-profile/v1`). The
//! worker emits exactly these types and the policy reads them as capacity data; a
//! field added here must be added to the worker's output in the same change.
//!
//! ```json
//! {"schema":"kestrel.dev/worker-profile/v1","model":"all-MiniLM-L6-v2","task":"embeddings",
//!  "machine":{"description":"…","threads":2,"device":"cpu"},
//!  "variants":[{"variant":"f32","precision":"f32","device":"cpu","load_seconds":0.4,
//!    "rss_bytes":123456789,
//!    "quality":{"reference":"f32","min_cosine":1.0,"mean_cosine":1.0,"quality_loss":0.0},
//!    "batches":[{"batch_size":1,"latency_ms":12.0,"items_per_second":83.0}],
//!    "concurrency":[{"concurrency":1,"p50_ms":13.0,"p95_ms":15.0,"items_per_second":75.0}]}]}
//! ```
//!
//! Parsing never does I/O: hand [`WorkerProfile::from_json`] the text.

use serde::{Deserialize, Serialize};

use crate::input::{BatchLatency, VariantCapacity, VariantSpec};

/// The schema tag every profile carries.
pub const PROFILE_SCHEMA: &str = "kestrel.dev/worker-profile/v1";

/// The `task` of a text-generation profile (the ModelDeployment's `model.task`).
pub const TEXT_GENERATION: &str = "text-generation";

/// One `kestrel-worker profile --json` output: every variant of one model on one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProfile {
    /// Always [`PROFILE_SCHEMA`].
    pub schema: String,
    /// Model name, e.g. `all-MiniLM-L6-v2`.
    pub model: String,
    /// Task, e.g. `embeddings`.
    pub task: String,
    /// Where the figures were measured.
    pub machine: ProfileMachine,
    /// One entry per variant measured.
    pub variants: Vec<ProfileVariant>,
}

/// The machine a profile was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileMachine {
    /// Free text: CPU/GPU model, engine, and how the figures were obtained.
    pub description: String,
    /// Compute threads the worker used.
    pub threads: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// One variant (precision) of the model as measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileVariant {
    /// Variant name as used in the ModelDeployment (`f32`, `int8`, …).
    pub variant: String,
    /// Numeric precision of the weights (`f32`, `f16`, `int8`, `q8_0`, …).
    pub precision: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Seconds from process start to a loaded, warmed model.
    pub load_seconds: f64,
    /// Resident memory after loading, in bytes.
    pub rss_bytes: u64,
    /// Quality against the reference variant.
    pub quality: ProfileQuality,
    /// Engine latency and throughput against batch size (ascending batch sizes).
    pub batches: Vec<ProfileBatch>,
    /// End-to-end latency against client concurrency.
    pub concurrency: Vec<ProfileConcurrency>,
    /// Text generation only: prompt-pass and first-token figures. `batches` are then
    /// decode steps: sequences per step, step latency, generated tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<ProfileGeneration>,
}

/// A text-generation variant's prompt-pass figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileGeneration {
    /// Prompt tokens per second of the prompt pass (one 128-token prompt).
    pub prompt_tokens_per_second: f64,
    /// Generated tokens per second of one sequence alone (decode batch 1).
    pub generated_tokens_per_second: f64,
    /// Prompt pass and first token of a 32-token prompt, alone, in milliseconds.
    pub ttft_ms: f64,
    /// Bytes of the weights as loaded.
    pub weight_bytes: u64,
}

/// What the text-generation requests a fleet serves look like, on average: it turns a
/// variant's decode-step curve into a curve of whole requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationShape {
    /// Prompt tokens per request; `None` uses the profile's own first-token prompt.
    pub prompt_tokens: Option<f64>,
    /// Generated tokens per request.
    pub generated_tokens: f64,
    /// True when the SLO is on time to first token, false for the whole request.
    pub first_token_slo: bool,
}

/// Quality of a variant's outputs against the reference variant's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileQuality {
    /// The reference variant (usually `f32`).
    pub reference: String,
    /// Lowest cosine similarity over the fixed sentence set.
    pub min_cosine: f64,
    /// Mean cosine similarity over the fixed sentence set.
    pub mean_cosine: f64,
    /// `1 − min_cosine`: what the budget's `maxQualityLoss` is compared with.
    pub quality_loss: f64,
}

/// One point of the service-time-against-batch-size curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileBatch {
    /// Inputs per batch.
    pub batch_size: u32,
    /// Wall time to run one batch of this size, in milliseconds.
    pub latency_ms: f64,
    /// `batch_size / latency`, in inputs per second.
    pub items_per_second: f64,
}

/// One point of the latency-against-concurrency curve (HTTP path included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileConcurrency {
    /// Concurrent clients.
    pub concurrency: u32,
    /// Median request latency, milliseconds.
    pub p50_ms: f64,
    /// 95th-percentile request latency, milliseconds.
    pub p95_ms: f64,
    /// Throughput at that concurrency, inputs per second.
    pub items_per_second: f64,
}

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The text is not valid profile JSON.
    #[error("failed to parse worker profile: {0}")]
    Parse(#[from] serde_json::Error),
    /// The schema tag is not one this crate reads.
    #[error("failed to read worker profile: schema is {found:?}, expected {PROFILE_SCHEMA:?}")]
    Schema {
        /// The tag found in the file.
        found: String,
    },
    /// A variant has no usable batch curve.
    #[error("failed to read worker profile: variant {variant:?} has {what}")]
    BadVariant {
        /// The variant's name.
        variant: String,
        /// What is wrong with it.
        what: String,
    },
}

impl WorkerProfile {
    /// Parses and checks a profile (schema tag, at least one variant, positive batch curves).
    pub fn from_json(text: &str) -> Result<Self, ProfileError> {
        let profile: WorkerProfile = serde_json::from_str(text)?;
        if profile.schema != PROFILE_SCHEMA {
            return Err(ProfileError::Schema {
                found: profile.schema,
            });
        }
        for v in &profile.variants {
            let bad = |what: &str| ProfileError::BadVariant {
                variant: v.variant.clone(),
                what: what.to_string(),
            };
            if v.batches.is_empty() {
                return Err(bad("no batch measurements"));
            }
            if v.batches
                .iter()
                .any(|b| b.batch_size == 0 || !(b.latency_ms.is_finite() && b.latency_ms > 0.0))
            {
                return Err(bad("a batch with size 0 or a non-positive latency"));
            }
            if !v.quality.quality_loss.is_finite() {
                return Err(bad("a non-finite quality loss"));
            }
            let generates = profile.task == TEXT_GENERATION;
            match &v.generation {
                None if generates => return Err(bad("no generation figures")),
                Some(g)
                    if !(g.ttft_ms.is_finite()
                        && g.ttft_ms > 0.0
                        && g.prompt_tokens_per_second.is_finite()
                        && g.prompt_tokens_per_second > 0.0) =>
                {
                    return Err(bad("a non-positive first-token time or prompt speed"));
                }
                _ => {}
            }
        }
        Ok(profile)
    }

    /// The variant named `name`, if measured.
    pub fn variant(&self, name: &str) -> Option<&ProfileVariant> {
        self.variants.iter().find(|v| v.variant == name)
    }
}

impl ProfileVariant {
    /// The policy's capacity model of one replica of this variant.
    pub fn capacity(&self) -> VariantCapacity {
        let mut batches: Vec<BatchLatency> = self
            .batches
            .iter()
            .map(|b| BatchLatency {
                batch_size: b.batch_size,
                latency_ms: b.latency_ms,
            })
            .collect();
        batches.sort_by_key(|b| b.batch_size);
        VariantCapacity::from_batches(batches)
    }

    /// One replica's capacity in whole requests of `shape`, from a text-generation
    /// variant's decode-step curve; `None` for a variant without generation figures.
    ///
    /// With `b` sequences running, each step yields `b` tokens in `step(b)`, and each
    /// request's prompt pass (`prefill`, one prompt at a time) stalls the others: `b`
    /// requests of `T` generated tokens take `L(b) = b · prefill + T · step(b)`. The
    /// first token comes after its prompt pass and one step: `F(b) = prefill + step(b)`.
    pub fn request_capacity(&self, shape: &GenerationShape) -> Option<VariantCapacity> {
        let g = self.generation.as_ref()?;
        let prefill_ms = shape
            .prompt_tokens
            .filter(|p| p.is_finite() && *p > 0.0)
            .map_or(g.ttft_ms, |p| p * 1000.0 / g.prompt_tokens_per_second);
        let tokens = if shape.generated_tokens.is_finite() {
            shape.generated_tokens.max(1.0)
        } else {
            1.0
        };
        let point = |b: &ProfileBatch, latency_ms: f64| BatchLatency {
            batch_size: b.batch_size,
            latency_ms,
        };
        let whole = self
            .batches
            .iter()
            .map(|b| point(b, b.batch_size as f64 * prefill_ms + tokens * b.latency_ms))
            .collect();
        let capacity = VariantCapacity::from_batches(whole);
        Some(if shape.first_token_slo {
            let first = self
                .batches
                .iter()
                .map(|b| point(b, prefill_ms + b.latency_ms))
                .collect();
            capacity.with_first_token(first)
        } else {
            capacity
        })
    }

    /// The policy's view of this variant at `price_per_replica_hour` (the operator's
    /// price for the accelerator it runs on, or the spec's override).
    pub fn spec(&self, price_per_replica_hour: f64, allowed: bool) -> VariantSpec {
        VariantSpec {
            name: self.variant.clone(),
            price_per_replica_hour,
            quality_loss: self.quality.quality_loss,
            capacity: self.capacity(),
            allowed,
        }
    }
}
