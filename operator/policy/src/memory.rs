//! What the policy remembers between decisions.
//!
//! The operator stores [`PolicyMemory`] in the ModelDeployment's status as JSON, so it
//! survives operator restarts; it must stay small. Every list is pruned by time to
//! its window and capped in length, whatever the caller's evaluation period.

use serde::{Deserialize, Serialize};

use crate::input::Timestamp;

/// Longest any remembered list may grow (a 300 s window at a 10 s period holds 31).
pub const MAX_REMEMBERED: usize = 64;

/// The policy's memory. `PolicyMemory::default()` is the right start for a new object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMemory {
    /// Recommendations over the scale-down delay (newest last).
    #[serde(default)]
    pub recommendations: Vec<Recommendation>,
    /// Requests in the system over the stable window (newest last), for burst detection.
    #[serde(default)]
    pub demand: Vec<DemandSample>,
    /// Start of the current unbroken run of decisions on fresh signals: scale-down
    /// waits until it covers the scale-down delay (so a restart or a metrics outage
    /// never scales down on a partial history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_since: Option<Timestamp>,
    /// Since when the target variant has had all its replicas Ready and no other
    /// variant has had any (the p95 then describes this fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_since: Option<Timestamp>,
    /// Burst mode holds scale-down until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_until: Option<Timestamp>,
    /// The variant the fleet converges to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_variant: Option<String>,
    /// When the target variant last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch_at: Option<Timestamp>,
    /// A cheaper variant and since when it has been cheaper enough to switch to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_candidate: Option<SwitchCandidate>,
    /// Observed ÷ profiled capacity (1 = as profiled), learned when the fleet is saturated.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub capacity_speed: f64,
}

impl Default for PolicyMemory {
    fn default() -> Self {
        PolicyMemory {
            recommendations: Vec::new(),
            demand: Vec::new(),
            observed_since: None,
            settled_since: None,
            burst_until: None,
            target_variant: None,
            last_switch_at: None,
            switch_candidate: None,
            capacity_speed: 1.0,
        }
    }
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// One past recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// When it was made.
    pub at: Timestamp,
    /// Replicas recommended …
    pub replicas: u32,
    /// … of this variant.
    pub variant: String,
}

/// Requests in the system at one decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DemandSample {
    /// When it was observed.
    pub at: Timestamp,
    /// In-flight requests (waiting or running).
    pub in_system: f64,
}

/// A variant cheaper than the target, waiting out the switch hysteresis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchCandidate {
    /// The cheaper variant.
    pub variant: String,
    /// Since when it has been at least the minimum saving cheaper.
    pub since: Timestamp,
    /// The latest relative saving (0.25 = 25 % cheaper).
    pub saving: f64,
}

impl PolicyMemory {
    /// Drops what fell out of its window and caps list lengths.
    pub(crate) fn prune(&mut self, now: Timestamp, scale_down_delay_s: f64, stable_window_s: f64) {
        self.recommendations
            .retain(|r| now.since(r.at) <= scale_down_delay_s && now.since(r.at) >= 0.0);
        self.demand
            .retain(|d| now.since(d.at) <= stable_window_s && now.since(d.at) >= 0.0);
        cap(&mut self.recommendations);
        cap(&mut self.demand);
        if self.burst_until.is_some_and(|t| t <= now) {
            self.burst_until = None;
        }
        if !(self.capacity_speed.is_finite() && self.capacity_speed > 0.0) {
            self.capacity_speed = 1.0;
        }
    }
}

impl PolicyMemory {
    /// Remembers a recommendation; entries closer than window/32 merge (keeping the
    /// higher, at the newer time), so the list stays bounded at any evaluation period.
    pub(crate) fn remember_recommendation(&mut self, rec: Recommendation, window_s: f64) {
        if let Some(last) = self.recommendations.last_mut()
            && last.variant == rec.variant
            && rec.at.since(last.at) < window_s / 32.0
        {
            last.replicas = last.replicas.max(rec.replicas);
            last.at = rec.at;
            return;
        }
        self.recommendations.push(rec);
        cap(&mut self.recommendations);
    }

    /// Remembers a demand sample; samples closer than window/32 are averaged.
    pub(crate) fn remember_demand(&mut self, sample: DemandSample, window_s: f64) {
        if let Some(last) = self.demand.last_mut()
            && sample.at.since(last.at) < window_s / 32.0
        {
            last.in_system = 0.5 * (last.in_system + sample.in_system);
            last.at = sample.at;
            return;
        }
        self.demand.push(sample);
        cap(&mut self.demand);
    }
}

fn cap<T>(list: &mut Vec<T>) {
    if list.len() > MAX_REMEMBERED {
        list.drain(..list.len() - MAX_REMEMBERED);
    }
}
