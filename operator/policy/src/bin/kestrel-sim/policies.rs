//! The policies compared: Kestrel's own `decide()` and re-implementations of the
//! anchors' autoscalers, each with its upstream defaults (see docs/autoscaling.md).
//!
//! Every anchor runs one variant and aims at the same per-replica concurrency as
//! Kestrel's `targetQueueDepthPerReplica` (`target`), as a user would configure it.

use std::collections::BTreeMap;

use kestrel_policy::{
    Budget, Decision, DecisionInput, DecisionReason, Fleet, PolicyMemory, ScalingLimits, Signals,
    Targets, Timestamp, Tuning, VariantReplicas, VariantSpec, decide,
};

use crate::model::{Autoscaler, Replicas, SimVariant, View};

/// Replica limits shared by every policy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min: u32,
    pub max: u32,
    pub initial: u32,
}

impl Limits {
    fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max.max(self.min))
    }
}

fn one(variant: usize, n: u32) -> Replicas {
    BTreeMap::from([(variant, n)])
}

// ---------------------------------------------------------------- kestrel

/// Kestrel: the operator's `decide()`, fed what the operator would read from
/// Prometheus: the newest scrape at least `lag_s` old (scrapes every few seconds),
/// queue gauges averaged over 10 s, rates over the stable (60 s) and short (10 s)
/// windows, and the p95 over 60 s.
pub struct Kestrel {
    pub variant_specs: Vec<VariantSpec>,
    pub targets: Targets,
    pub scaling: ScalingLimits,
    pub budget: Budget,
    pub tuning: Tuning,
    pub lag_s: f64,
    pub start_variant: usize,
    pub limits: Limits,
    pub memory: PolicyMemory,
    /// How many decisions had each reason.
    pub reasons: BTreeMap<&'static str, u64>,
    /// The messages of decisions that changed something: (time, reason, message).
    pub log: Vec<(f64, DecisionReason, String)>,
}

impl Kestrel {
    fn signals(&self, now: f64, view: &View) -> Option<Signals> {
        let s = view.scrape_at(now - self.lag_s)?;
        let rate_over = |w: f64| -> Option<(f64, f64)> {
            let old = view.scrape_at(s.t - w)?;
            let span = s.t - old.t;
            (span > 0.0).then(|| {
                (
                    (s.arrivals - old.arrivals) as f64 / span,
                    (s.completions - old.completions) as f64 / span,
                )
            })
        };
        let (arrival_rate, throughput) = rate_over(60.0).unwrap_or((0.0, 0.0));
        // sum(avg_over_time(gauge[10s])): the scrapes in (t − 10 s, t].
        let recent: Vec<_> = view
            .scrapes
            .iter()
            .filter(|x| x.t > s.t - 10.0 && x.t <= s.t)
            .collect();
        let avg = |f: fn(&crate::model::Sample) -> f64| {
            recent.iter().map(|x| f(x)).sum::<f64>() / recent.len().max(1) as f64
        };
        Some(Signals {
            queue_depth: avg(|x| x.queue),
            in_flight: avg(|x| x.in_flight),
            arrival_rate,
            arrival_rate_short: rate_over(10.0).map(|r| r.0),
            p95_ms: view.latency_quantile(s.t - 60.0, s.t, 0.95),
            observed_throughput: Some(throughput),
            age_seconds: now - s.t,
        })
    }
}

impl Autoscaler for Kestrel {
    fn period_s(&self) -> f64 {
        10.0
    }

    fn initial(&self) -> Replicas {
        one(self.start_variant, self.limits.clamp(self.limits.initial))
    }

    fn evaluate(&mut self, now: f64, view: &View) -> Replicas {
        let fleet = Fleet {
            variants: self
                .variant_specs
                .iter()
                .zip(&view.fleet)
                .map(|(v, c)| {
                    (
                        v.name.clone(),
                        VariantReplicas {
                            replicas: c.replicas,
                            ready: c.ready,
                        },
                    )
                })
                .collect(),
            pending_unschedulable: view.pending.then(|| {
                "0/N nodes are available: Insufficient resources (simulated --max-scheduled)"
                    .to_string()
            }),
            startup_s: view.startup_s,
        };
        let input = DecisionInput {
            targets: self.targets.clone(),
            scaling: self.scaling.clone(),
            budget: self.budget.clone(),
            tuning: self.tuning.clone(),
            variants: self.variant_specs.clone(),
            fleet,
            signals: self.signals(now, view),
        };
        let d: Decision = decide(&input, &self.memory, Timestamp(now));
        *self.reasons.entry(d.reason.as_str()).or_default() += 1;
        let changed = self
            .variant_specs
            .iter()
            .zip(&view.fleet)
            .any(|(v, c)| d.replicas.get(&v.name).copied().unwrap_or(c.replicas) != c.replicas);
        if changed {
            self.log.push((now, d.reason, d.message.clone()));
        }
        self.memory = d.memory;
        self.variant_specs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| d.replicas.get(&v.name).map(|&n| (i, n)))
            .collect()
    }

    fn explain(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .log
            .iter()
            .map(|(t, r, m)| format!("t={t:.0}s {r}: {m}"))
            .collect();
        let counts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        out.push(format!("decisions by reason: {}", counts.join(" ")));
        out
    }
}

/// The policy crate's view of the simulator's variants.
pub fn variant_specs(variants: &[SimVariant], allowed: &[bool]) -> Vec<VariantSpec> {
    variants
        .iter()
        .zip(allowed)
        .map(|(v, &allowed)| VariantSpec {
            name: v.name.clone(),
            price_per_replica_hour: v.price_per_hour,
            quality_loss: v.quality_loss,
            capacity: v.capacity.clone(),
            allowed,
        })
        .collect()
}

// ---------------------------------------------------------------- hpa

/// Kubernetes HPA v2 on a Pods metric (in-flight requests per pod, AverageValue
/// `target`, read through Prometheus like Kestrel's): 15 s sync, tolerance 0.1,
/// scale-up at most max(100 %, 4 pods) per period, 300 s scale-down stabilization
/// (the highest recommendation over the window).
pub struct Hpa {
    pub variant: usize,
    pub target: f64,
    pub lag_s: f64,
    pub limits: Limits,
    pub current: u32,
    pub recommendations: Vec<(f64, u32)>,
}

impl Autoscaler for Hpa {
    fn period_s(&self) -> f64 {
        15.0
    }

    fn initial(&self) -> Replicas {
        one(self.variant, self.limits.clamp(self.limits.initial))
    }

    fn evaluate(&mut self, now: f64, view: &View) -> Replicas {
        let ready = view.fleet[self.variant].ready;
        self.current = view.fleet[self.variant].replicas;
        let Some(s) = view.scrape_at(now - self.lag_s) else {
            return one(self.variant, self.current);
        };
        let mut rec = self.current;
        if ready > 0 {
            let ratio = (s.in_flight / ready as f64) / self.target;
            if (ratio - 1.0).abs() > 0.1 {
                rec = (ready as f64 * ratio).ceil() as u32;
            }
        }
        rec = self.limits.clamp(rec);
        self.recommendations.push((now, rec));
        self.recommendations.retain(|(t, _)| now - t <= 300.0);
        let stabilized = if rec < self.current {
            self.recommendations
                .iter()
                .map(|r| r.1)
                .max()
                .unwrap_or(rec)
                .min(self.current)
        } else {
            rec.min((self.current * 2).max(self.current + 4))
        };
        self.current = self.limits.clamp(stabilized);
        one(self.variant, self.current)
    }
}

// ---------------------------------------------------------------- kpa

/// Knative KPA: concurrency target 70 % of `target` per pod, averaged over a 60 s
/// stable and a 6 s panic window from per-second scrapes of the queue-proxies (no
/// Prometheus lag), evaluated every 2 s; panic when the panic window wants ≥ 2× the
/// ready pods, and no scale-down until 60 s after the last panic; scale-down at most
/// halves (max-scale-down-rate 2).
pub struct Kpa {
    pub variant: usize,
    pub target: f64,
    pub limits: Limits,
    pub current: u32,
    pub panic_until: f64,
}

impl Autoscaler for Kpa {
    fn period_s(&self) -> f64 {
        2.0
    }

    fn initial(&self) -> Replicas {
        one(self.variant, self.limits.clamp(self.limits.initial))
    }

    fn evaluate(&mut self, now: f64, view: &View) -> Replicas {
        let per_pod = self.target * 0.7;
        let ready = view.fleet[self.variant].ready.max(1);
        self.current = view.fleet[self.variant].replicas;
        let stable = (view.mean_in_flight(now, 60.0) / per_pod).ceil() as u32;
        let panic = (view.mean_in_flight(now, 6.0) / per_pod).ceil() as u32;
        if panic as f64 / ready as f64 >= 2.0 {
            self.panic_until = now + 60.0;
        }
        let mut want = if now < self.panic_until {
            panic.max(stable).max(self.current)
        } else {
            stable
        };
        want = want.max(ready.div_ceil(2)).min(ready.saturating_mul(1000));
        self.current = self.limits.clamp(want);
        one(self.variant, self.current)
    }
}

// ---------------------------------------------------------------- ray serve

/// Ray Serve: `target_ongoing_requests` = `target`, replicas report every 10 s and the
/// controller averages over a 30 s look-back; a scale-up must be wanted for 30 s
/// (upscale_delay_s) and a scale-down for 600 s (downscale_delay_s) before it applies.
pub struct RayServe {
    pub variant: usize,
    pub target: f64,
    pub limits: Limits,
    pub current: u32,
    pub up_since: Option<f64>,
    pub down_since: Option<f64>,
}

impl Autoscaler for RayServe {
    fn period_s(&self) -> f64 {
        1.0
    }

    fn initial(&self) -> Replicas {
        one(self.variant, self.limits.clamp(self.limits.initial))
    }

    fn evaluate(&mut self, now: f64, view: &View) -> Replicas {
        self.current = view.fleet[self.variant].replicas;
        let reported = (now / 10.0).floor() * 10.0;
        let want = self
            .limits
            .clamp((view.mean_in_flight(reported, 30.0) / self.target).ceil() as u32);
        if want > self.current {
            self.down_since = None;
            let since = *self.up_since.get_or_insert(now);
            if now - since >= 30.0 {
                self.current = want;
                self.up_since = None;
            }
        } else if want < self.current {
            self.up_since = None;
            let since = *self.down_since.get_or_insert(now);
            if now - since >= 600.0 {
                self.current = want;
                self.down_since = None;
            }
        } else {
            self.up_since = None;
            self.down_since = None;
        }
        one(self.variant, self.current)
    }
}

// ---------------------------------------------------------------- static peak

/// Peak provisioning: a fixed fleet sized by the capacity model for the trace's
/// highest 10 s arrival rate (an oracle: it knows the peak in advance).
pub struct StaticPeak {
    pub variant: usize,
    pub replicas: u32,
}

impl Autoscaler for StaticPeak {
    fn period_s(&self) -> f64 {
        60.0
    }

    fn initial(&self) -> Replicas {
        one(self.variant, self.replicas)
    }

    fn evaluate(&mut self, _now: f64, _view: &View) -> Replicas {
        one(self.variant, self.replicas)
    }
}
