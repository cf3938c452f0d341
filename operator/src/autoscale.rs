//! The bridge between the operator's view and kestrel-policy's pure decision: converts
//! the valid spec, the owned Deployments, the signals and the worker profiles into the
//! policy's input, and its Decision back into a [`Plan`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kestrel_crds::v1alpha1::{ConflictPolicy, LatencyMetric, Task};
use kestrel_policy::profile::{GenerationShape, ProfileMachine, ProfileVariant, WorkerProfile};
use kestrel_policy::{
    Budget, BudgetPolicy, DecisionInput, DecisionReason, Fleet, PolicyMemory, ScalingLimits,
    Signals, Targets, Timestamp, Tuning, VariantReplicas, VariantSpec,
};

use crate::decide::{Plan, unschedulable};
use crate::observe::Observed;
use crate::signals::SignalsReading;
use crate::validate::{ValidDeployment, ValidVariant, task_str};

/// Largest share of replicas removed in one scale-down step.
const MAX_SCALE_DOWN_FRACTION: f64 = 0.5;

/// Generated tokens per text-generation request until Prometheus has measured them:
/// the worker's `max_tokens` default, as OpenAI's.
const DEFAULT_GENERATED_TOKENS: f64 = 16.0;

/// Capacity data: the worker profiles the operator was given (`--profiles`).
#[derive(Clone, Debug, Default)]
pub struct Profiles(pub Vec<WorkerProfile>);

impl Profiles {
    /// The profiles bundled with the operator (measured with `kestrel-worker profile`):
    /// MiniLM embeddings and Gemma-3-270M text generation on a 2-core Xeon.
    pub fn bundled() -> Self {
        let texts = [
            include_str!("../../worker/profiles/cpu-2core-xeon.json"),
            include_str!("../../worker/profiles/gemma-cpu-2core-xeon.json"),
        ];
        Self(
            texts
                .iter()
                .map(|t| WorkerProfile::from_json(t).expect("a bundled profile parses"))
                .collect(),
        )
    }

    /// The measured variant closest to `v` among the profiles of `task` (among all
    /// profiles when none is of that task): same precision on the same kind of device,
    /// else the same precision anywhere, else the first one measured.
    fn for_variant(
        &self,
        task: Task,
        v: &ValidVariant,
    ) -> Option<(&ProfileMachine, &ProfileVariant)> {
        let task = task_str(task);
        let precision = v.precision.as_str();
        let same_precision = |p: &&ProfileVariant| {
            p.precision == precision
                || p.variant == precision
                || (precision == "q8_0" && p.precision == "int8")
        };
        let on_gpu = v.accelerator.is_gpu();
        let any_of_task = self.0.iter().any(|p| p.task == task);
        let all = || {
            self.0
                .iter()
                .filter(move |p| !any_of_task || p.task == task)
                .flat_map(|p| p.variants.iter().map(move |v| (&p.machine, v)))
        };
        all()
            .filter(|(_, p)| same_precision(p))
            .find(|(_, p)| p.device.starts_with("cuda") == on_gpu)
            .or_else(|| all().find(|(_, p)| same_precision(p)))
            .or_else(|| all().next())
    }
}

/// What the fleet's text-generation requests look like: tokens per request as
/// Prometheus measured them, the defaults until it has. `None` for other tasks.
fn generation_shape(md: &ValidDeployment, observed: &Observed) -> Option<GenerationShape> {
    if md.task != Task::TextGeneration {
        return None;
    }
    let fresh = match &observed.signals {
        Some(SignalsReading::Fresh(s)) => Some(s),
        _ => None,
    };
    Some(GenerationShape {
        prompt_tokens: fresh.and_then(|s| s.prompt_tokens_per_request),
        generated_tokens: fresh
            .and_then(|s| s.generated_tokens_per_request)
            .filter(|t| *t >= 1.0)
            .unwrap_or(DEFAULT_GENERATED_TOKENS),
        first_token_slo: md.slo.latency_metric == LatencyMetric::TimeToFirstToken,
    })
}

/// The share of a CPU profile's speed that one replica gets: its CPU limit over the
/// threads the profile was measured with, at most 1. `None` without a CPU limit (the
/// replica may use the whole node, as the profile did) or for a GPU profile.
///
/// Without it a replica limited to 0.4 core was planned as if it had the profile
/// machine's 2 cores: the policy recommended one replica for 190 requests/s that one
/// such replica could not serve (140/s), and scaled a loaded fleet down.
fn cpu_share(resources: Option<&ResourceRequirements>, machine: &ProfileMachine) -> Option<f64> {
    if machine.device != "cpu" || machine.threads == 0 {
        return None;
    }
    let limit = resources?.limits.as_ref()?.get("cpu")?;
    let cores = cpu_cores(&limit.0)?;
    Some((cores / f64::from(machine.threads)).min(1.0))
}

/// A Kubernetes CPU quantity in cores: `400m` → 0.4, `1.5` → 1.5, `2` → 2.
fn cpu_cores(q: &str) -> Option<f64> {
    let q = q.trim();
    let cores = match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => q.parse::<f64>().ok()?,
    };
    (cores.is_finite() && cores > 0.0).then_some(cores)
}

/// Builds the policy's input. Pure.
pub fn input(md: &ValidDeployment, observed: &Observed, profiles: &Profiles) -> DecisionInput {
    let shape = generation_shape(md, observed);
    let variants = md
        .variants
        .iter()
        .filter_map(|v| {
            let (machine, measured) = profiles.for_variant(md.task, v)?;
            let mut spec: VariantSpec = measured.spec(v.price_per_hour, true);
            spec.name = v.name.clone();
            // Text generation: the decode-step curve becomes one of whole requests.
            if let Some(capacity) = shape.as_ref().and_then(|s| measured.request_capacity(s)) {
                spec.capacity = capacity;
            }
            // No faster than the worker's own batch limit lets it be.
            let max_batch = u32::try_from(md.worker.max_batch_size).unwrap_or(1);
            spec.capacity = spec.capacity.up_to_batch(max_batch);
            if !v.accelerator.is_gpu()
                && let Some(share) = cpu_share(md.worker.resources.as_ref(), machine)
            {
                spec.capacity = spec.capacity.scaled(share);
            }
            if let Some(q) = v.quality_loss {
                spec.quality_loss = q;
            }
            Some(spec)
        })
        .collect();
    let fleet = Fleet {
        variants: observed
            .deployments
            .iter()
            .map(|(name, d)| {
                let replicas = VariantReplicas {
                    replicas: d.spec_replicas.max(0) as u32,
                    ready: d.ready_replicas.max(0) as u32,
                };
                (name.clone(), replicas)
            })
            .collect(),
        pending_unschedulable: unschedulable(observed),
        startup_s: observed.startup_s,
    };
    let signals = match &observed.signals {
        Some(SignalsReading::Fresh(s)) => Some(Signals {
            queue_depth: s.waiting,
            in_flight: s.in_flight,
            arrival_rate: s.arrival_rate,
            arrival_rate_short: s.arrival_rate_short,
            p95_ms: s.p95_ms,
            observed_throughput: Some(s.throughput),
            age_seconds: s.age_seconds,
        }),
        _ => None,
    };
    DecisionInput {
        targets: Targets {
            p95_latency_ms: md.slo.p95_latency_ms,
            queue_depth_per_replica: md.slo.target_queue_per_replica,
        },
        scaling: ScalingLimits {
            min_replicas: md.scaling.min_replicas.max(0) as u32,
            max_replicas: md.scaling.max_replicas.max(0) as u32,
            scale_down_delay_s: f64::from(md.scaling.scale_down_delay_seconds),
            max_scale_down_fraction: MAX_SCALE_DOWN_FRACTION,
        },
        budget: Budget {
            max_cost_per_hour: md.budget.max_cost_per_hour,
            max_quality_loss: md.budget.max_quality_loss,
            policy: match md.budget.on_conflict {
                ConflictPolicy::HoldBudget => BudgetPolicy::HoldBudget,
                ConflictPolicy::HoldSlo => BudgetPolicy::HoldSlo,
            },
        },
        tuning: Tuning::default(),
        variants,
        fleet,
        signals,
    }
}

/// Decides replicas and variant for an autoscaled ModelDeployment. Pure.
pub fn decide(
    md: &ValidDeployment,
    observed: &Observed,
    memory: Option<&serde_json::Value>,
    now: f64,
    profiles: &Profiles,
) -> Plan {
    let input = input(md, observed, profiles);
    // A memory that does not parse (an older operator's) starts afresh rather than fail.
    let memory: PolicyMemory = memory
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let d = kestrel_policy::decide(&input, &memory, Timestamp(now));
    let why_no_metrics = match &observed.signals {
        Some(SignalsReading::Unavailable(m)) => m.clone(),
        Some(SignalsReading::NoData) => {
            "Prometheus has no samples from this model's workers yet".into()
        }
        Some(SignalsReading::Fresh(s)) => {
            format!("the newest worker sample is {:.0}s old", s.age_seconds)
        }
        None => "signals were not read".into(),
    };
    let limited_reason = match d.reason {
        DecisionReason::PendingUnschedulable => "Unschedulable",
        DecisionReason::MaxReplicas => "MaxReplicas",
        _ => "Limited",
    };
    let budget_reason = match md.budget.on_conflict {
        ConflictPolicy::HoldBudget => "BudgetHeld",
        ConflictPolicy::HoldSlo => "BudgetExceeded",
    };
    Plan {
        replicas: d
            .replicas
            .iter()
            .map(|(k, v)| (k.clone(), i32::try_from(*v).unwrap_or(i32::MAX)))
            .collect::<BTreeMap<_, _>>(),
        target_variant: d.target_variant.clone(),
        reason: d.reason.as_str().to_owned(),
        message: d.message.clone(),
        predicted_p95_ms: d.predicted_p95_ms,
        projected_cost_per_hour: d.projected_cost_per_hour,
        metrics_available: Some(if d.conditions.metrics_available {
            Ok(())
        } else {
            Err(why_no_metrics)
        }),
        scaling_limited: d
            .conditions
            .scaling_limited
            .clone()
            .map(|m| (limited_reason.to_owned(), m)),
        budget_constrained: d
            .conditions
            .budget_constrained
            .clone()
            .map(|m| (budget_reason.to_owned(), m)),
        memory: serde_json::to_value(&d.memory).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PriceTable;
    use crate::fixtures::{md, variant};
    use crate::observe::DeploymentState;
    use crate::signals::Signals as Observedsignals;
    use crate::validate::validate;
    use kestrel_crds::v1alpha1::Precision;

    fn fleet(n: i32) -> Observed {
        Observed {
            deployments: BTreeMap::from([(
                "f32".to_owned(),
                DeploymentState {
                    name: "m-f32".into(),
                    spec_replicas: n,
                    replicas: n,
                    ready_replicas: n,
                    updated_replicas: n,
                    applied_hash: None,
                },
            )]),
            ..Default::default()
        }
    }

    fn load(in_flight: f64) -> SignalsReading {
        SignalsReading::Fresh(Observedsignals {
            waiting: in_flight * 0.7,
            in_flight,
            arrival_rate: 10.0,
            arrival_rate_short: Some(10.0),
            throughput: 10.0,
            p95_ms: Some(150.0),
            prompt_tokens_per_request: None,
            generated_tokens_per_request: None,
            scraped_workers: 1,
            age_seconds: 3.0,
        })
    }

    #[test]
    fn a_deep_queue_scales_up_and_says_why() {
        let v = validate(&md("minilm"), Some("w:1"), &PriceTable::default()).unwrap();
        let mut o = fleet(2);
        o.signals = Some(load(48.0));
        let p = decide(&v, &o, None, 1_000.0, &Profiles::bundled());
        assert!(p.replicas["f32"] > 2, "{p:?}");
        assert!(p.reason.starts_with("ScaleUp"), "{}", p.reason);
        assert!(p.message.contains("queue depth 48"), "{}", p.message);
        assert_eq!(p.metrics_available, Some(Ok(())));
        assert!(p.memory.is_some());
    }

    #[test]
    fn missing_metrics_hold_the_fleet_and_say_why() {
        let v = validate(&md("minilm"), Some("w:1"), &PriceTable::default()).unwrap();
        let mut o = fleet(3);
        o.signals = Some(SignalsReading::Unavailable(
            "failed to query Prometheus at http://p:9090: refused".into(),
        ));
        let p = decide(&v, &o, None, 1_000.0, &Profiles::bundled());
        assert_eq!(p.replicas["f32"], 3);
        assert_eq!(
            p.metrics_available,
            Some(Err(
                "failed to query Prometheus at http://p:9090: refused".into()
            ))
        );
    }

    #[test]
    fn a_new_model_deployment_starts_at_min_replicas_before_any_signal() {
        let mut m = md("minilm");
        m.spec.scaling.min_replicas = 2;
        let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
        let o = Observed {
            signals: Some(SignalsReading::NoData),
            ..Default::default()
        };
        let p = decide(&v, &o, None, 1_000.0, &Profiles::bundled());
        assert_eq!(p.total(), 2, "{p:?}");
    }

    #[test]
    fn every_spec_variant_finds_capacity_data() {
        let mut m = md("minilm");
        m.spec.variants.push(variant("q8", Precision::Q8_0));
        let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
        let i = input(&v, &Observed::default(), &Profiles::bundled());
        let names: Vec<_> = i.variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, vec!["f32", "q8"]);
        assert!(i.variants.iter().all(|v| v.capacity.items_per_second > 0.0));
    }

    fn with_cpu_limit(limit: Option<&str>) -> ValidDeployment {
        let mut m = md("minilm");
        m.spec.worker.resources = limit.map(|l| ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "cpu".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(l.into()),
            )])),
            ..Default::default()
        });
        validate(&m, Some("w:1"), &PriceTable::default()).unwrap()
    }

    #[test]
    fn a_cpu_limit_below_the_profile_machine_shrinks_each_replica_capacity() {
        let profiles = Profiles::bundled();
        let threads = f64::from(profiles.0[0].machine.threads);
        let full = |limit| {
            input(&with_cpu_limit(limit), &Observed::default(), &profiles).variants[0]
                .capacity
                .items_per_second
        };
        let unlimited = full(None);
        assert!(
            (full(Some("400m")) - unlimited * 0.4 / threads).abs() < 1e-6,
            "{} vs {unlimited}",
            full(Some("400m"))
        );
        // More cores than the profile machine had: no faster than measured.
        assert_eq!(full(Some("16")), unlimited);
        assert_eq!(full(Some("not-a-quantity")), unlimited);
    }

    #[test]
    fn a_cpu_limited_fleet_needs_more_replicas_for_the_same_rate() {
        let rate = |n: f64| {
            let mut o = fleet(1);
            o.signals = Some(SignalsReading::Fresh(Observedsignals {
                waiting: 0.0,
                in_flight: 1.0,
                arrival_rate: n,
                arrival_rate_short: Some(n),
                throughput: n,
                p95_ms: Some(40.0),
                prompt_tokens_per_request: None,
                generated_tokens_per_request: None,
                scraped_workers: 1,
                age_seconds: 3.0,
            }));
            o
        };
        let replicas = |limit, n| {
            decide(
                &with_cpu_limit(limit),
                &rate(n),
                None,
                1_000.0,
                &Profiles::bundled(),
            )
            .replicas["f32"]
        };
        assert_eq!(replicas(None, 150.0), 1);
        assert!(replicas(Some("400m"), 150.0) > 1);
    }

    #[test]
    fn cpu_quantities_parse_as_cores() {
        for (q, want) in [("400m", Some(0.4)), ("1.5", Some(1.5)), ("2", Some(2.0))] {
            assert_eq!(cpu_cores(q), want, "{q}");
        }
        for q in ["", "0", "-1", "m", "1Gi"] {
            assert_eq!(cpu_cores(q), None, "{q}");
        }
    }

    /// A Gemma ModelDeployment: one q8_0 CPU variant, p95 time to first token ≤ 1 s.
    fn gemma() -> ValidDeployment {
        let mut m = md("gemma");
        m.spec.model.task = Task::TextGeneration;
        m.spec.variants = vec![variant("q8", Precision::Q8_0)];
        m.spec.slo.latency_metric = LatencyMetric::TimeToFirstToken;
        m.spec.slo.p95_latency_ms = 1000;
        validate(&m, Some("w:1"), &PriceTable::default()).unwrap()
    }

    fn chatting(rate: f64, generated_tokens: Option<f64>) -> Observed {
        let mut o = fleet(1);
        o.deployments = o
            .deployments
            .into_values()
            .map(|d| ("q8".to_owned(), d))
            .collect();
        o.signals = Some(SignalsReading::Fresh(Observedsignals {
            waiting: 0.0,
            in_flight: 1.0,
            arrival_rate: rate,
            arrival_rate_short: Some(rate),
            throughput: rate,
            p95_ms: Some(400.0),
            prompt_tokens_per_request: Some(32.0),
            generated_tokens_per_request: generated_tokens,
            scraped_workers: 1,
            age_seconds: 3.0,
        }));
        o
    }

    #[test]
    fn text_generation_plans_with_the_text_generation_profile_in_requests() {
        let profiles = Profiles::bundled();
        let gemma_q8 = profiles.0[1].variant("q8_0").unwrap();
        let step_1 = gemma_q8.batches[0].latency_ms;
        let i = input(&gemma(), &chatting(0.5, Some(64.0)), &profiles);
        let c = &i.variants[0].capacity;
        // Whole requests of 64 tokens: a few per second (5.5 with the committed
        // profile: 16 × 64-token answers in ~2.9 s), not MiniLM's hundreds of inputs.
        assert!(
            c.items_per_second > 0.3 && c.items_per_second < 20.0,
            "{c:?}"
        );
        // Alone, a request is its 32-token prompt pass plus 64 steps.
        let prefill = 32.0 * 1000.0
            / gemma_q8
                .generation
                .as_ref()
                .unwrap()
                .prompt_tokens_per_second;
        assert!((c.batch_latency_ms(1.0) - (prefill + 64.0 * step_1)).abs() < 1e-6);
        // The SLO is on the first token: the idle prediction is the prompt pass and a step.
        let idle = c.predict_p95_ms(0.0, 1.0).unwrap();
        assert!((idle - 2.0 * (prefill + step_1)).abs() < 1e-6, "{idle}");
    }

    #[test]
    fn longer_answers_at_the_same_request_rate_need_more_replicas() {
        let replicas = |tokens| {
            decide(
                &gemma(),
                &chatting(1.5, tokens),
                None,
                1_000.0,
                &Profiles::bundled(),
            )
            .replicas["q8"]
        };
        let short = replicas(Some(16.0));
        let long = replicas(Some(256.0));
        assert!(
            long > short,
            "{short} replicas for 16 tokens, {long} for 256"
        );
        // Before Prometheus has measured tokens per request, the worker's default holds.
        assert_eq!(replicas(None), short);
    }

    #[test]
    fn an_embeddings_deployment_never_plans_with_the_text_generation_profile() {
        let md = with_cpu_limit(None);
        let i = input(&md, &Observed::default(), &Profiles::bundled());
        let minilm = Profiles::bundled().0[0]
            .variant("f32")
            .unwrap()
            .capacity()
            .up_to_batch(md.worker.max_batch_size as u32);
        assert_eq!(i.variants[0].capacity, minilm);
    }

    #[test]
    fn a_worker_batch_limit_caps_the_planned_capacity() {
        let at = |max_batch: i32| {
            let mut m = md("minilm");
            m.spec.worker.max_batch_size = max_batch;
            let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
            input(&v, &Observed::default(), &Profiles::bundled()).variants[0]
                .capacity
                .items_per_second
        };
        assert!(at(4) < at(32), "{} vs {}", at(4), at(32));
    }
}
