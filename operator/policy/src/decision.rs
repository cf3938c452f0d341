//! What [`crate::decide`] answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::input::Fleet;
use crate::memory::PolicyMemory;

/// The outcome of one decision: what to set, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Desired replicas per variant for this step. During a variant switch both the old
    /// and the new variant appear (surge rollout); a variant at 0 should be scaled to 0.
    pub replicas: BTreeMap<String, u32>,
    /// The variant the fleet converges to.
    pub target_variant: String,
    /// The main reason, for the Event reason and status (CamelCase when serialized).
    pub reason: DecisionReason,
    /// One human sentence, for status and Events.
    pub message: String,
    /// Predicted p95 (ms) of the target fleet at the forecast demand; `None` when
    /// the fleet cannot keep up or there are no signals.
    pub predicted_p95_ms: Option<f64>,
    /// Σ replicas × price per hour of [`Decision::replicas`].
    pub projected_cost_per_hour: f64,
    /// What the conditions should say.
    pub conditions: DecisionConditions,
    /// The recommendations this decision was made from (zero when not computed).
    pub recommendations: Recommendations,
    /// The memory to store for the next decision.
    pub memory: PolicyMemory,
}

/// The reason of a decision. One per decision, the most important one; the
/// conditions carry the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecisionReason {
    /// Nothing to change.
    Steady,
    /// More replicas: requests in the system over the per-replica target.
    ScaleUpQueueDepth,
    /// More replicas: the arrival rate over the replicas' capacity.
    ScaleUpArrivalRate,
    /// More replicas: the observed p95 over target.
    ScaleUpLatency,
    /// More replicas in burst mode (short-window demand ≥ threshold × stable window).
    ScaleUpBurst,
    /// Fewer replicas: the highest recommendation over the scale-down delay is lower.
    ScaleDown,
    /// Fewer replicas wanted now, held by the scale-down delay or burst mode.
    ScaleDownDeferred,
    /// Signals missing, stale or NaN: replicas held.
    MetricsUnavailable,
    /// Pods Pending as Unschedulable: no replicas added.
    PendingUnschedulable,
    /// The recommendation is over maxReplicas.
    MaxReplicas,
    /// The target variant changes; the surge rollout starts.
    VariantSwitch,
    /// A surge rollout to the target variant waits for its replicas to be Ready.
    RolloutInProgress,
    /// The budget caps replicas below what the SLO needs.
    BudgetCapped,
    /// No allowed variant meets the quality limit.
    NoFeasibleVariant,
}

impl DecisionReason {
    /// The reason as a CamelCase word, for an Event's reason field.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::Steady => "Steady",
            DecisionReason::ScaleUpQueueDepth => "ScaleUpQueueDepth",
            DecisionReason::ScaleUpArrivalRate => "ScaleUpArrivalRate",
            DecisionReason::ScaleUpLatency => "ScaleUpLatency",
            DecisionReason::ScaleUpBurst => "ScaleUpBurst",
            DecisionReason::ScaleDown => "ScaleDown",
            DecisionReason::ScaleDownDeferred => "ScaleDownDeferred",
            DecisionReason::MetricsUnavailable => "MetricsUnavailable",
            DecisionReason::PendingUnschedulable => "PendingUnschedulable",
            DecisionReason::MaxReplicas => "MaxReplicas",
            DecisionReason::VariantSwitch => "VariantSwitch",
            DecisionReason::RolloutInProgress => "RolloutInProgress",
            DecisionReason::BudgetCapped => "BudgetCapped",
            DecisionReason::NoFeasibleVariant => "NoFeasibleVariant",
        }
    }
}

impl std::fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the decision says the status conditions should be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionConditions {
    /// MetricsAvailable: false when signals were missing, stale or NaN.
    pub metrics_available: bool,
    /// ScalingLimited=True with this message (Pending pods, maxReplicas, no capacity).
    pub scaling_limited: Option<String>,
    /// BudgetConstrained=True with this message (capped p95 or projected overspend).
    pub budget_constrained: Option<String>,
}

/// The per-signal recommendations (replicas of the target variant) behind a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendations {
    /// From requests in the system ÷ target per replica (at a burst's onset, and in
    /// burst mode while the fleet clears the backlog that fast, no more than the
    /// arrival rate plus what clears the backlog within `backlog_drain_s` needs).
    pub queue_depth: u32,
    /// From forecast arrival rate ÷ per-replica capacity (and the p95 model).
    pub arrival_rate: u32,
    /// From observed p95 over target (0 when under target or unknown).
    pub latency: u32,
    /// Burst mode was active.
    pub burst: bool,
}

impl Decision {
    /// Total desired replicas over all variants.
    pub fn total_replicas(&self) -> u32 {
        self.replicas.values().sum()
    }

    /// Whether applying this decision changes `fleet`'s desired replicas (the operator
    /// emits an Event exactly when it does).
    pub fn changes(&self, fleet: &Fleet) -> bool {
        self.replicas
            .iter()
            .any(|(name, n)| fleet.of(name).replicas != *n)
    }
}
