//! status: what the user reads, computed from what was observed and decided. The
//! computation is pure (the clock is passed in); lastTransitionTime moves only when a
//! condition's status changes; Ready derives from the other conditions.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kestrel_crds::condition_types as ct;
use kestrel_crds::v1alpha1::{LastDecision, ModelDeploymentStatus, ObservedSignals, VariantStatus};

use crate::decide::Plan;
use crate::observe::Observed;
use crate::signals::SignalsReading;
use crate::validate::{SpecError, ValidDeployment};

/// What reconcile concluded, for the status to report.
pub enum Outcome<'a> {
    Invalid(&'a SpecError),
    Planned {
        md: &'a ValidDeployment,
        observed: &'a Observed,
        plan: &'a Plan,
    },
}

/// A condition before timestamps: type, status, reason, message.
type Cond = (&'static str, &'static str, String, String);

pub fn compute(
    prev: Option<&ModelDeploymentStatus>,
    generation: Option<i64>,
    outcome: &Outcome<'_>,
    now: &Time,
) -> ModelDeploymentStatus {
    let prev_default = ModelDeploymentStatus::default();
    let prev = prev.unwrap_or(&prev_default);
    let mut status = match outcome {
        Outcome::Invalid(err) => ModelDeploymentStatus {
            // Keep reporting what runs; the spec error stops changes, not pods.
            replicas: prev.replicas,
            ready_replicas: prev.ready_replicas,
            desired_replicas: prev.desired_replicas,
            ready: prev.ready.clone(),
            variants: prev.variants.clone(),
            active_variant: prev.active_variant.clone(),
            selector: prev.selector.clone(),
            signals: prev.signals.clone(),
            cost_per_hour: prev.cost_per_hour.clone(),
            projected_cost_per_hour: prev.projected_cost_per_hour.clone(),
            last_decision: prev.last_decision.clone(),
            policy_memory: prev.policy_memory.clone(),
            conditions: stamp(&prev.conditions, invalid_conditions(err), now),
            observed_generation: generation,
        },
        Outcome::Planned { md, observed, plan } => planned(prev, md, observed, plan, now),
    };
    status.observed_generation = generation;
    status
}

fn planned(
    prev: &ModelDeploymentStatus,
    md: &ValidDeployment,
    observed: &Observed,
    plan: &Plan,
    now: &Time,
) -> ModelDeploymentStatus {
    let mut variants: BTreeMap<String, VariantStatus> = BTreeMap::new();
    for (name, d) in &observed.deployments {
        let v = variants
            .entry(name.clone())
            .or_insert_with(|| VariantStatus {
                name: name.clone(),
                ..Default::default()
            });
        v.replicas = d.replicas;
        v.ready_replicas = d.ready_replicas;
    }
    for (name, n) in &plan.replicas {
        variants
            .entry(name.clone())
            .or_insert_with(|| VariantStatus {
                name: name.clone(),
                ..Default::default()
            })
            .desired_replicas = *n;
    }
    let replicas: i32 = variants.values().map(|v| v.replicas).sum();
    let ready: i32 = variants.values().map(|v| v.ready_replicas).sum();
    let desired = plan.total();
    let running: BTreeMap<String, i32> = variants
        .values()
        .map(|v| (v.name.clone(), v.replicas))
        .collect();

    let last_decision = if prev.desired_replicas != desired
        || prev.active_variant.as_deref() != Some(plan.target_variant.as_str())
        || prev.last_decision.is_none()
    {
        Some(LastDecision {
            time: now.clone(),
            reason: plan.reason.clone(),
            message: plan.message.clone(),
            from_replicas: prev.desired_replicas,
            to_replicas: desired,
            variant: Some(plan.target_variant.clone()),
            predicted_p95_ms: plan.predicted_p95_ms.map(|p| p.round() as i64),
        })
    } else {
        prev.last_decision.clone()
    };

    let signals = match &observed.signals {
        Some(SignalsReading::Fresh(s)) => Some(ObservedSignals {
            p95_latency_ms: s.p95_ms.map(|p| p.round() as i64),
            queue_depth: Some(round2(s.in_flight)),
            request_rate: Some(round2(s.arrival_rate)),
            observed_at: Some(now.clone()),
        }),
        // Stale numbers would mislead: show none rather than old ones.
        _ => None,
    };

    ModelDeploymentStatus {
        observed_generation: None,
        replicas,
        ready_replicas: ready,
        desired_replicas: desired,
        ready: Some(format!("{ready}/{desired}")),
        variants: variants.into_values().collect(),
        active_variant: Some(plan.target_variant.clone()),
        selector: Some(crate::build::selector_string(md)),
        signals,
        cost_per_hour: Some(money(md.cost_per_hour(&running))),
        projected_cost_per_hour: Some(money(plan.projected_cost_per_hour)),
        last_decision,
        policy_memory: plan.memory.clone(),
        conditions: stamp(
            &prev.conditions,
            planned_conditions(md, observed, plan, ready, desired),
            now,
        ),
    }
}

fn invalid_conditions(err: &SpecError) -> Vec<Cond> {
    let msg = err.to_string();
    vec![
        (ct::READY, "False", "InvalidSpec".into(), msg.clone()),
        (
            ct::PROGRESSING,
            "False",
            "InvalidSpec".into(),
            "waiting for a corrected spec".into(),
        ),
        (ct::DEGRADED, "True", "InvalidSpec".into(), msg),
    ]
}

fn planned_conditions(
    md: &ValidDeployment,
    observed: &Observed,
    plan: &Plan,
    ready: i32,
    desired: i32,
) -> Vec<Cond> {
    let target = &plan.target_variant;
    let target_ready = observed
        .deployments
        .get(target)
        .map_or(0, |d| d.ready_replicas);
    let target_desired = plan.replicas.get(target).copied().unwrap_or(0);
    let others_running: i32 = observed
        .deployments
        .iter()
        .filter(|(v, _)| *v != target)
        .map(|(_, d)| d.replicas)
        .sum();
    let rolling = observed
        .deployments
        .get(target)
        .is_some_and(|d| d.updated_replicas < d.spec_replicas || d.replicas > d.spec_replicas);

    let problem = observed.pod_problems.first();
    let degraded = match problem {
        Some(p) => {
            let more = observed.pod_problems.len() - 1;
            let suffix = if more > 0 {
                format!(" (and {more} more pod(s) with problems)")
            } else {
                String::new()
            };
            (
                ct::DEGRADED,
                "True",
                p.reason().to_owned(),
                format!("{}{suffix}", p.message()),
            )
        }
        None => (
            ct::DEGRADED,
            "False",
            "AsExpected".into(),
            "no worker pod reports a problem".into(),
        ),
    };

    let progressing = if others_running > 0 && target_ready < target_desired {
        (
            ct::PROGRESSING,
            "True",
            "VariantSwitch".into(),
            format!(
                "switching to {target}: {target_ready}/{target_desired} ready; the old variant keeps serving until then"
            ),
        )
    } else if others_running > 0 {
        (
            ct::PROGRESSING,
            "True",
            "VariantSwitch".into(),
            format!("{target} is ready; scaling the old variant down"),
        )
    } else if ready < desired {
        (
            ct::PROGRESSING,
            "True",
            "ScalingUp".into(),
            format!("{ready}/{desired} replicas ready"),
        )
    } else if observed
        .deployments
        .values()
        .map(|d| d.replicas)
        .sum::<i32>()
        > desired
    {
        (
            ct::PROGRESSING,
            "True",
            "ScalingDown".into(),
            format!("scaling down to {desired} replica(s)"),
        )
    } else if rolling {
        (
            ct::PROGRESSING,
            "True",
            "RollingOut".into(),
            format!("rolling out a new revision of {target}"),
        )
    } else {
        (
            ct::PROGRESSING,
            "False",
            "Stable".into(),
            format!("{ready}/{desired} replicas of {target} ready"),
        )
    };

    let metrics = match &plan.metrics_available {
        None => (
            ct::METRICS_AVAILABLE,
            "Unknown",
            "NotNeeded".into(),
            "scaling is disabled; signals are not read".into(),
        ),
        Some(Ok(())) => (
            ct::METRICS_AVAILABLE,
            "True",
            "SignalsFresh".into(),
            "serving signals are fresh".into(),
        ),
        Some(Err(m)) => (
            ct::METRICS_AVAILABLE,
            "False",
            "SignalsMissing".into(),
            format!("{m}; replicas are held"),
        ),
    };

    let variant = md
        .variant(target)
        .expect("the plan only names variants of the spec");
    let variant_selected = (
        ct::VARIANT_SELECTED,
        "True",
        if md.scaling.enabled {
            "CheapestFeasible".to_owned()
        } else {
            "ScalingDisabled".to_owned()
        },
        format!(
            "variant {target} ({}, {}/h per replica){}",
            variant.precision.as_str(),
            money(variant.price_per_hour),
            if md.scaling.enabled {
                ""
            } else {
                ": the first variant runs while scaling is disabled"
            }
        ),
    );

    let budget = match &plan.budget_constrained {
        Some((reason, msg)) => (ct::BUDGET_CONSTRAINED, "True", reason.clone(), msg.clone()),
        None => (
            ct::BUDGET_CONSTRAINED,
            "False",
            "WithinBudget".into(),
            "the plan fits the budget".into(),
        ),
    };
    let limited = match &plan.scaling_limited {
        Some((reason, msg)) => (ct::SCALING_LIMITED, "True", reason.clone(), msg.clone()),
        None => (
            ct::SCALING_LIMITED,
            "False",
            "WithinBounds".into(),
            "replicas follow the signals".into(),
        ),
    };

    // Ready: the fleet serves at the capacity the plan wants; during a variant switch
    // the old variant at full strength counts.
    let old_desired: i32 = plan
        .replicas
        .iter()
        .filter(|(v, _)| *v != target)
        .map(|(_, n)| n)
        .sum();
    let old_ready: i32 = observed
        .deployments
        .iter()
        .filter(|(v, _)| *v != target)
        .map(|(_, d)| d.ready_replicas)
        .sum();
    let ready_cond = if desired == 0 {
        (
            ct::READY,
            "True",
            "ScaledToZero".into(),
            "no replicas are wanted".into(),
        )
    } else if target_ready >= target_desired || (old_desired > 0 && old_ready >= old_desired) {
        (
            ct::READY,
            "True",
            "AllReplicasReady".into(),
            format!("{ready}/{desired} replicas ready"),
        )
    } else if let Some(p) = problem {
        (
            ct::READY,
            "False",
            p.reason().to_owned(),
            format!("{ready}/{desired} replicas ready: {}", p.message()),
        )
    } else {
        (
            ct::READY,
            "False",
            "ReplicasNotReady".into(),
            format!("{ready}/{desired} replicas ready"),
        )
    };

    vec![
        ready_cond,
        progressing,
        degraded,
        metrics,
        variant_selected,
        budget,
        limited,
    ]
}

/// Turns computed conditions into metav1 Conditions, keeping lastTransitionTime where
/// the status did not change.
fn stamp(prev: &[Condition], conds: Vec<Cond>, now: &Time) -> Vec<Condition> {
    conds
        .into_iter()
        .map(|(type_, status, reason, message)| {
            let last = prev.iter().find(|c| c.type_ == type_);
            let last_transition_time = match last {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason,
                message,
                last_transition_time,
                observed_generation: None,
            }
        })
        .collect()
}

pub fn condition<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

pub fn money(v: f64) -> String {
    format!("{v:.2}")
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// An Event to publish about the ModelDeployment.
#[derive(Clone, Debug, PartialEq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    /// What was done; Events with the same reason and action within minutes are merged
    /// into one series (keeping the first message), so each distinct decision gets its own.
    pub action: String,
    pub message: String,
}

/// Events for what changed between two statuses: scaling, variant switches, new failures.
pub fn events(
    prev: Option<&ModelDeploymentStatus>,
    next: &ModelDeploymentStatus,
) -> Vec<EventSpec> {
    let mut out = Vec::new();
    let empty = ModelDeploymentStatus::default();
    let prev = prev.unwrap_or(&empty);
    if let Some(d) = &next.last_decision
        && prev.last_decision.as_ref() != Some(d)
    {
        {
            if prev.active_variant.is_some() && prev.active_variant != next.active_variant {
                out.push(EventSpec {
                    warning: false,
                    reason: "VariantSwitch".into(),
                    action: format!("SwitchTo-{}", d.variant.as_deref().unwrap_or("-")),
                    message: format!(
                        "{} → {}: {}",
                        prev.active_variant.as_deref().unwrap_or("-"),
                        d.variant.as_deref().unwrap_or("-"),
                        d.message
                    ),
                });
            }
            if d.from_replicas != d.to_replicas || prev.last_decision.is_none() {
                out.push(EventSpec {
                    warning: false,
                    reason: "Scaled".into(),
                    action: format!("Scale{}To{}", d.from_replicas, d.to_replicas),
                    message: format!(
                        "{} → {} replicas ({}): {}",
                        d.from_replicas, d.to_replicas, d.reason, d.message
                    ),
                });
            }
        }
    }
    for type_ in [ct::DEGRADED, ct::SCALING_LIMITED, ct::BUDGET_CONSTRAINED] {
        let (Some(n), p) = (condition(next, type_), condition(prev, type_)) else {
            continue;
        };
        let changed = p.is_none_or(|p| p.status != n.status || p.reason != n.reason);
        if n.status == "True" && changed {
            out.push(EventSpec {
                action: "Observe".into(),
                warning: type_ == ct::DEGRADED,
                reason: n.reason.clone(),
                message: n.message.clone(),
            });
        }
    }
    if let (Some(n), p) = (
        condition(next, ct::METRICS_AVAILABLE),
        condition(prev, ct::METRICS_AVAILABLE),
    ) && n.status == "False"
        && p.is_none_or(|p| p.status != "False")
    {
        out.push(EventSpec {
            action: "Observe".into(),
            warning: true,
            reason: n.reason.clone(),
            message: n.message.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PriceTable;
    use crate::fixtures::md;
    use crate::observe::{DeploymentState, PodProblem};
    use crate::validate::validate;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn valid() -> ValidDeployment {
        validate(&md("minilm"), Some("w:1"), &PriceTable::default()).unwrap()
    }

    fn plan(n: i32) -> Plan {
        Plan {
            replicas: BTreeMap::from([("f32".to_owned(), n)]),
            target_variant: "f32".into(),
            reason: "QueueDepthHigh".into(),
            message: "queue 40 over 2 replicas".into(),
            predicted_p95_ms: Some(120.4),
            projected_cost_per_hour: 0.1 * f64::from(n),
            metrics_available: Some(Ok(())),
            scaling_limited: None,
            budget_constrained: None,
            memory: None,
        }
    }

    fn observed(spec: i32, ready: i32) -> Observed {
        Observed {
            deployments: BTreeMap::from([(
                "f32".to_owned(),
                DeploymentState {
                    name: "minilm-f32".into(),
                    applied_hash: None,
                    spec_replicas: spec,
                    replicas: spec,
                    ready_replicas: ready,
                    updated_replicas: spec,
                },
            )]),
            ..Default::default()
        }
    }

    /// The status computed at `t` for `generation` from (spec, observed, plan).
    fn planned(
        prev: Option<&ModelDeploymentStatus>,
        generation: i64,
        (md, observed, plan): (&ValidDeployment, &Observed, &Plan),
        t: i64,
    ) -> ModelDeploymentStatus {
        compute(
            prev,
            Some(generation),
            &Outcome::Planned { md, observed, plan },
            &at(t),
        )
    }

    fn cond<'a>(s: &'a ModelDeploymentStatus, t: &str) -> &'a Condition {
        condition(s, t).unwrap()
    }

    #[test]
    fn all_replicas_ready_makes_ready_true_and_fills_the_columns() {
        let (v, o, p) = (valid(), observed(2, 2), plan(2));
        let s = planned(None, 3, (&v, &o, &p), 100);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").reason, "Stable");
        assert_eq!(s.ready.as_deref(), Some("2/2"));
        assert_eq!(s.active_variant.as_deref(), Some("f32"));
        assert_eq!(s.cost_per_hour.as_deref(), Some("0.20"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.selector.as_deref(),
            Some("kestrel.dev/model-deployment=minilm")
        );
    }

    #[test]
    fn an_unschedulable_pod_makes_ready_false_with_the_schedulers_message() {
        let v = valid();
        let mut o = observed(2, 1);
        o.pod_problems = vec![PodProblem::Unschedulable {
            pod: "minilm-f32-x".into(),
            message: "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into(),
        }];
        let p = plan(2);
        let s = planned(None, 1, (&v, &o, &p), 100);
        let ready = cond(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert!(
            ready.message.contains("1/2 replicas ready"),
            "{}",
            ready.message
        );
        assert!(
            ready.message.contains("Insufficient nvidia.com/gpu"),
            "{}",
            ready.message
        );
        assert_eq!(cond(&s, "Degraded").status, "True");
    }

    #[test]
    fn last_transition_time_moves_only_when_the_status_changes() {
        let v = valid();
        let p = plan(2);
        let (o1, o2) = (observed(2, 1), observed(2, 2));
        let s1 = planned(None, 1, (&v, &o1, &p), 100);
        let s2 = planned(Some(&s1), 1, (&v, &o1, &p), 200);
        assert_eq!(cond(&s2, "Ready").last_transition_time, at(100));
        let s3 = planned(Some(&s2), 1, (&v, &o2, &p), 300);
        assert_eq!(cond(&s3, "Ready").last_transition_time, at(300));
        assert_eq!(cond(&s3, "Degraded").last_transition_time, at(100));
    }

    #[test]
    fn a_second_identical_evaluation_changes_nothing() {
        let (v, o, p) = (valid(), observed(2, 2), plan(2));
        let s1 = planned(None, 1, (&v, &o, &p), 100);
        let s2 = planned(Some(&s1), 1, (&v, &o, &p), 200);
        assert_eq!(s1, s2);
        assert!(events(Some(&s1), &s2).is_empty());
    }

    #[test]
    fn an_invalid_spec_keeps_what_runs_and_says_why() {
        let (v, o, p) = (valid(), observed(2, 2), plan(2));
        let s1 = planned(None, 1, (&v, &o, &p), 100);
        let err = SpecError::MissingImage;
        let s2 = compute(Some(&s1), Some(2), &Outcome::Invalid(&err), &at(200));
        assert_eq!(s2.ready.as_deref(), Some("2/2"));
        let ready = cond(&s2, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(ready.message.contains("spec.worker.image"));
        assert_eq!(s2.observed_generation, Some(2));
    }

    #[test]
    fn scaling_records_a_decision_and_an_event() {
        let v = valid();
        let (o, p2, p4) = (observed(2, 2), plan(2), plan(4));
        let s1 = planned(None, 1, (&v, &o, &p2), 100);
        let s2 = planned(Some(&s1), 1, (&v, &o, &p4), 110);
        let d = s2.last_decision.as_ref().unwrap();
        assert_eq!(
            (d.from_replicas, d.to_replicas, d.predicted_p95_ms),
            (2, 4, Some(120))
        );
        let ev = events(Some(&s1), &s2);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].reason, "Scaled");
        assert_eq!(
            ev[0].message,
            "2 → 4 replicas (QueueDepthHigh): queue 40 over 2 replicas"
        );
        assert_eq!(cond(&s2, "Progressing").reason, "ScalingUp");
    }

    #[test]
    fn missing_metrics_show_as_a_false_condition_and_a_warning_once() {
        let v = valid();
        let o = observed(2, 2);
        let mut p = plan(2);
        p.metrics_available = Some(Err("Prometheus at http://prom:9090 is unreachable".into()));
        let s1 = planned(None, 1, (&v, &o, &p), 100);
        let c = cond(&s1, "MetricsAvailable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "SignalsMissing")
        );
        assert!(
            events(None, &s1)
                .iter()
                .any(|e| e.warning && e.reason == "SignalsMissing")
        );
        let s2 = planned(Some(&s1), 1, (&v, &o, &p), 110);
        assert!(events(Some(&s1), &s2).is_empty());
    }

    #[test]
    fn a_variant_switch_is_progressing_until_the_new_variant_is_ready() {
        let mut m = md("minilm");
        m.spec.variants.push(crate::fixtures::variant(
            "q8",
            kestrel_crds::v1alpha1::Precision::Q8_0,
        ));
        let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
        let mut o = observed(2, 2);
        o.deployments.insert(
            "q8".into(),
            DeploymentState {
                name: "minilm-q8".into(),
                spec_replicas: 2,
                replicas: 2,
                ready_replicas: 1,
                updated_replicas: 2,
                applied_hash: None,
            },
        );
        let mut p = plan(2);
        p.replicas.insert("q8".into(), 2);
        p.target_variant = "q8".into();
        let s = planned(None, 1, (&v, &o, &p), 100);
        let c = cond(&s, "Progressing");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "VariantSwitch")
        );
        assert_eq!(s.variants.len(), 2);
        // The old variant still serves at full capacity: the model is Ready.
        assert_eq!(cond(&s, "Ready").status, "True");
    }
}
