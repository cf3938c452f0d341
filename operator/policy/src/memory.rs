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
    /// The short-window arrival rate's running mean and variance over the scale-down
    /// delay: how far demand swings, for the forecast's headroom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_stats: Option<ArrivalStats>,
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
            arrival_stats: None,
        }
    }
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn is_false(x: &bool) -> bool {
    !*x
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
    /// Made for a backlog (queue depth or p95 over what the arrival rate needs): held
    /// for the stable window only, since a drained backlog says nothing about demand.
    #[serde(default, skip_serializing_if = "is_false")]
    pub transient: bool,
}

/// Exponentially weighted mean and variance of the short-window arrival rate, with
/// a time constant of the scale-down delay (two numbers, whatever the period).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArrivalStats {
    /// When the last sample was taken.
    pub at: Timestamp,
    /// Mean rate, requests/s.
    pub mean: f64,
    /// Variance of the rate, (requests/s)².
    pub variance: f64,
}

impl ArrivalStats {
    /// Folds in a sample `rate` taken at `at`; `tau_s` is the time constant.
    pub fn from_sample(prev: Option<ArrivalStats>, at: Timestamp, rate: f64, tau_s: f64) -> Self {
        let Some(p) = prev.filter(|p| {
            p.mean.is_finite()
                && p.variance.is_finite()
                && p.variance >= 0.0
                && at.since(p.at) >= 0.0
        }) else {
            return ArrivalStats {
                at,
                mean: rate,
                variance: 0.0,
            };
        };
        let alpha = 1.0 - (-at.since(p.at) / tau_s.max(1.0)).exp();
        let d = rate - p.mean;
        ArrivalStats {
            at,
            mean: p.mean + alpha * d,
            variance: (1.0 - alpha) * (p.variance + alpha * d * d),
        }
    }

    /// Mean plus `sigmas` standard deviations.
    pub fn upper(&self, sigmas: f64) -> f64 {
        self.mean + sigmas.max(0.0) * self.variance.max(0.0).sqrt()
    }
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
        self.recommendations.retain(|r| {
            let window = if r.transient {
                stable_window_s.min(scale_down_delay_s)
            } else {
                scale_down_delay_s
            };
            now.since(r.at) <= window && now.since(r.at) >= 0.0
        });
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
    /// Remembers a recommendation; entries of the same kind (sustained or transient)
    /// closer than window/32 merge (keeping the higher, at the newer time), so the list
    /// stays bounded at any evaluation period.
    pub(crate) fn remember_recommendation(&mut self, rec: Recommendation, window_s: f64) {
        let same_kind = self
            .recommendations
            .iter_mut()
            .rev()
            .find(|r| r.transient == rec.transient);
        if let Some(last) = same_kind
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
