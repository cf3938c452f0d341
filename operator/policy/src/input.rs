//! What [`crate::decide`] is told: targets and limits, variants with their capacity and
//! price, the fleet as it is, and the observed signals.
//!
//! These are the policy's own small types; the operator converts Kubernetes objects
//! and Prometheus answers into them at its edge. Nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Seconds on the caller's clock: Unix seconds in the operator, simulated seconds in
/// `kestrel-sim`. Only differences between timestamps matter to the policy.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub f64);

impl Timestamp {
    /// Seconds elapsed from `earlier` to `self` (negative if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> f64 {
        self.0 - earlier.0
    }

    /// This timestamp moved `seconds` later.
    pub fn plus(self, seconds: f64) -> Timestamp {
        Timestamp(self.0 + seconds)
    }
}

/// Everything one decision is computed from (besides memory and the clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionInput {
    /// Latency and queue targets (spec.slo).
    pub targets: Targets,
    /// Replica limits and scale-down pacing (spec.scaling).
    pub scaling: ScalingLimits,
    /// Cost and quality limits (spec.budget).
    pub budget: Budget,
    /// Operator-level knobs; [`Tuning::default`] holds the anchors' defaults.
    pub tuning: Tuning,
    /// Every variant of the spec, allowed or not.
    pub variants: Vec<VariantSpec>,
    /// The replicas that exist now.
    pub fleet: Fleet,
    /// The latest serving signals, or `None` when they could not be read.
    pub signals: Option<Signals>,
}

/// The latency and queue targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// The p95 request latency to hold, milliseconds (spec.slo.p95LatencyMs).
    pub p95_latency_ms: f64,
    /// Requests in the system per replica to aim for (spec.slo.targetQueueDepthPerReplica).
    pub queue_depth_per_replica: f64,
}

/// Replica limits and the pace of scale-down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingLimits {
    /// Never fewer replicas of the target variant than this.
    pub min_replicas: u32,
    /// Never more replicas of the target variant than this.
    pub max_replicas: u32,
    /// Scale down only to the highest recommendation seen over this many seconds.
    pub scale_down_delay_s: f64,
    /// At most this fraction of the replicas goes per decision (0.5: at most halve).
    pub max_scale_down_fraction: f64,
}

/// What gives way when the cheapest variant that holds the SLO costs more than the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BudgetPolicy {
    /// Stay within the budget: cap replicas (or step down in precision), accept the latency.
    #[default]
    HoldBudget,
    /// Hold the latency target: exceed the budget and say by how much.
    HoldSlo,
}

/// Cost and quality limits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Budget {
    /// Most the fleet may cost per hour; `None` = no limit.
    pub max_cost_per_hour: Option<f64>,
    /// Most quality loss (1 − min cosine against the reference) a variant may have.
    pub max_quality_loss: Option<f64>,
    /// Which gives way when both cannot hold.
    pub policy: BudgetPolicy,
}

/// Operator-level knobs. Defaults are the anchors' (Knative KPA windows and panic
/// threshold, HPA tolerance-like bounds); see `docs/autoscaling.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    /// Signals older than this are stale: treated as missing.
    pub max_signal_age_s: f64,
    /// The stable window over which demand is averaged for burst detection.
    pub stable_window_s: f64,
    /// Burst mode when short-window demand is at least this multiple of the stable window's.
    pub burst_threshold: f64,
    /// A p95 over target grows the fleet by at most this factor per decision.
    pub max_latency_step: f64,
    /// The window the observed p95 is computed over (the PromQL range). The p95 only
    /// drives scale-up once the fleet has been fully Ready for this long: a p95 that
    /// still includes the old fleet's requests would compound the last scale-up.
    pub latency_window_s: f64,
    /// Plan replicas so each runs at most this fraction of its profiled capacity.
    pub target_utilization: f64,
    /// A variant switch needs at least this relative saving (0.10 = 10 %).
    pub switch_min_saving: f64,
    /// … sustained for this many seconds.
    pub switch_window_s: f64,
    /// Correct profiled capacity online from observed throughput when saturated.
    pub correct_capacity: bool,
    /// At a burst's onset (and in burst mode while the Ready fleet clears it this
    /// fast) the queue rule sizes a backlog by the rate that clears it within the time
    /// a new replica takes to be Ready (`Fleet::startup_s`), or within this many
    /// seconds until that has been observed: replicas started for a backlog the fleet
    /// drains before they are Ready only cost. 0 turns the rule off.
    #[serde(default = "default_backlog_drain_s")]
    pub backlog_drain_s: f64,
}

fn default_backlog_drain_s() -> f64 {
    30.0
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_signal_age_s: 30.0,
            stable_window_s: 60.0,
            burst_threshold: 2.0,
            max_latency_step: 2.0,
            latency_window_s: 60.0,
            target_utilization: 0.8,
            switch_min_saving: 0.10,
            switch_window_s: 300.0,
            correct_capacity: true,
            backlog_drain_s: default_backlog_drain_s(),
        }
    }
}

/// One variant of the model: what a replica costs, loses and can do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSpec {
    /// The variant's name (spec.variants[].name).
    pub name: String,
    /// Price of one replica for one hour (accelerator price, from operator config or spec).
    pub price_per_replica_hour: f64,
    /// 1 − min cosine against the reference (from the profile).
    pub quality_loss: f64,
    /// One replica's capacity (from the profile).
    pub capacity: VariantCapacity,
    /// False when the spec or the operator excludes it from selection.
    pub allowed: bool,
}

/// One point of a replica's service-time curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchLatency {
    /// Inputs per batch.
    pub batch_size: u32,
    /// Time to run the batch, milliseconds.
    pub latency_ms: f64,
}

/// A replica's capacity: its service time against batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantCapacity {
    /// Inputs per second at the best batch size.
    pub items_per_second: f64,
    /// Service time against batch size, ascending batch sizes.
    pub batches: Vec<BatchLatency>,
    /// When the SLO is on time to first token (text generation): the first token's
    /// latency with `batch_size` sequences running, ascending. `None`: the SLO's
    /// latency is the request's whole service time (`batches`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<Vec<BatchLatency>>,
}

/// Replicas of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VariantReplicas {
    /// Desired replicas as set on the variant's Deployment.
    pub replicas: u32,
    /// Replicas whose pods are Ready.
    pub ready: u32,
}

/// The replicas that exist now.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Fleet {
    /// Per variant name; variants without a Deployment may be absent.
    pub variants: BTreeMap<String, VariantReplicas>,
    /// The scheduler's reason when some pods are Pending as Unschedulable.
    pub pending_unschedulable: Option<String>,
    /// Seconds a new replica takes from creation to Ready, as observed (the median of
    /// the replicas that became Ready without a restart); none until one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_s: Option<f64>,
}

impl Fleet {
    /// Replicas of `variant` (zero if absent).
    pub fn of(&self, variant: &str) -> VariantReplicas {
        self.variants.get(variant).copied().unwrap_or_default()
    }

    /// Ready replicas over all variants.
    pub fn ready_total(&self) -> u32 {
        self.variants.values().map(|v| v.ready).sum()
    }
}

/// Serving signals for the whole ModelDeployment (all variants together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Requests admitted and waiting for a batch (sum over pods; best averaged over a
    /// short window, e.g. `sum(avg_over_time(...[10s]))`, so one scrape's transient
    /// backlog does not size the fleet).
    pub queue_depth: f64,
    /// Requests admitted and not answered, waiting or running (sum over pods; same
    /// short-window average as `queue_depth`).
    pub in_flight: f64,
    /// Arrivals per second over the stable window (e.g. `rate(...[1m])`).
    pub arrival_rate: f64,
    /// Arrivals per second over a short window (e.g. `rate(...[10s])`), if queried.
    pub arrival_rate_short: Option<f64>,
    /// Observed p95 latency, milliseconds; `None` when no request finished in the window.
    pub p95_ms: Option<f64>,
    /// Answered requests per second over the stable window, if queried.
    pub observed_throughput: Option<f64>,
    /// Age of the newest sample behind these values, seconds.
    pub age_seconds: f64,
}

/// Why a [`DecisionInput`] cannot be decided on; check with [`DecisionInput::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    /// A target or limit is out of range.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// The offending field, spec-style.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// No variant is listed.
    #[error("invalid variants: none listed")]
    NoVariants,
}

impl DecisionInput {
    /// Checks the ranges decide() relies on. decide() never panics on bad input, but
    /// its answers are only meaningful for input that passes this.
    pub fn validate(&self) -> Result<(), InputError> {
        let bad = |field: &'static str, why: String| Err(InputError::Invalid { field, why });
        if !(self.targets.p95_latency_ms.is_finite() && self.targets.p95_latency_ms > 0.0) {
            return bad("slo.p95LatencyMs", "must be positive".into());
        }
        if !(self.targets.queue_depth_per_replica.is_finite()
            && self.targets.queue_depth_per_replica > 0.0)
        {
            return bad("slo.targetQueueDepthPerReplica", "must be positive".into());
        }
        if self.scaling.min_replicas > self.scaling.max_replicas {
            return bad(
                "scaling.minReplicas",
                format!(
                    "{} is above maxReplicas {}",
                    self.scaling.min_replicas, self.scaling.max_replicas
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.scaling.max_scale_down_fraction) {
            return bad("scaling.maxScaleDownFraction", "must be in 0..=1".into());
        }
        if self.variants.is_empty() {
            return Err(InputError::NoVariants);
        }
        for v in &self.variants {
            if !(v.price_per_replica_hour.is_finite() && v.price_per_replica_hour >= 0.0) {
                return bad("variants[].price", format!("{}: must be ≥ 0", v.name));
            }
            if !(v.capacity.items_per_second.is_finite() && v.capacity.items_per_second > 0.0) {
                return bad(
                    "variants[].capacity",
                    format!("{}: must be positive", v.name),
                );
            }
        }
        Ok(())
    }
}
