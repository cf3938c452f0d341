//! The operator's own metrics (`/metrics` of the operator, not of workers).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub resource: &'static str,
    pub verb: &'static str,
}

/// Labels as name/value pairs (per-ModelDeployment series).
pub type Labels = Vec<(&'static str, String)>;

/// Counters and histograms the reconciler updates.
#[derive(Clone)]
pub struct Metrics {
    /// `kestrel_modeldeployment_condition{namespace,name,type,status}`: 1 for each
    /// condition's current status, 0 for the others.
    pub md_condition: Family<Labels, Gauge>,
    /// `kestrel_modeldeployment_replicas{namespace,name,variant,state}` (desired|ready).
    pub md_replicas: Family<Labels, Gauge>,
    pub md_p95_target: Family<Labels, Gauge<f64, AtomicU64>>,
    pub md_cost: Family<Labels, Gauge<f64, AtomicU64>>,
    pub md_budget: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Decisions that changed replicas or variant, by reason.
    pub md_decisions: Family<Labels, Counter>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub writes: Family<WriteLabels, Counter>,
    pub leader: Gauge,
    pub registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let md_condition = Family::<Labels, Gauge>::default();
        let md_replicas = Family::<Labels, Gauge>::default();
        let md_p95_target = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let md_cost = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let md_budget = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let md_decisions = Family::<Labels, Counter>::default();
        {
            let md = root.sub_registry_with_prefix("kestrel_modeldeployment");
            md.register(
                "condition",
                "Status conditions: 1 for the current status of each type",
                md_condition.clone(),
            );
            md.register(
                "replicas",
                "Replicas per variant by state (desired, ready)",
                md_replicas.clone(),
            );
            md.register(
                "p95_target_seconds",
                "The SLO's p95 latency target",
                md_p95_target.clone(),
            );
            md.register(
                "cost_per_hour",
                "Cost per hour of the replicas that exist",
                md_cost.clone(),
            );
            md.register(
                "budget_per_hour",
                "The budget's maximum cost per hour",
                md_budget.clone(),
            );
            md.register(
                "decisions",
                "Decisions that changed replicas or variant, by reason",
                md_decisions.clone(),
            );
        }
        let registry = root.sub_registry_with_prefix("kestrel_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ]);
        let writes = Family::<WriteLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by result (ok, error, invalid_spec)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register(
            "write_calls",
            "Write calls to the API server by resource and verb",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            md_condition,
            md_replicas,
            md_p95_target,
            md_cost,
            md_budget,
            md_decisions,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            registry: Arc::new(root),
        }
    }
}

impl Metrics {
    pub fn write(&self, resource: &'static str, verb: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { resource, verb })
            .inc();
    }

    pub fn reconciled(&self, result: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, category: &'static str) {
        self.errors.get_or_create(&ErrorLabels { category }).inc();
    }

    /// Publishes one ModelDeployment's status as gauges.
    pub fn observe_status(
        &self,
        namespace: &str,
        name: &str,
        status: &kestrel_crds::ModelDeploymentStatus,
        p95_target_ms: Option<f64>,
        budget_per_hour: Option<f64>,
    ) {
        let md = || {
            vec![
                ("namespace", namespace.to_owned()),
                ("name", name.to_owned()),
            ]
        };
        for c in &status.conditions {
            for s in ["True", "False", "Unknown"] {
                let mut l = md();
                l.extend([("type", c.type_.clone()), ("status", s.to_owned())]);
                self.md_condition
                    .get_or_create(&l)
                    .set(i64::from(c.status == s));
            }
        }
        for v in &status.variants {
            for (state, n) in [("desired", v.desired_replicas), ("ready", v.ready_replicas)] {
                let mut l = md();
                l.extend([("variant", v.name.clone()), ("state", state.to_owned())]);
                self.md_replicas.get_or_create(&l).set(i64::from(n));
            }
        }
        if let Some(t) = p95_target_ms {
            self.md_p95_target.get_or_create(&md()).set(t / 1000.0);
        }
        if let Some(c) = status.cost_per_hour.as_deref().and_then(|c| c.parse().ok()) {
            self.md_cost.get_or_create(&md()).set(c);
        }
        match budget_per_hour {
            Some(b) => {
                self.md_budget.get_or_create(&md()).set(b);
            }
            None => {
                self.md_budget.remove(&md());
            }
        }
    }

    pub fn decided(&self, namespace: &str, name: &str, reason: &str) {
        let l = vec![
            ("namespace", namespace.to_owned()),
            ("name", name.to_owned()),
            ("reason", reason.to_owned()),
        ];
        self.md_decisions.get_or_create(&l).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;
    use kestrel_crds::v1alpha1::VariantStatus;

    #[test]
    fn a_model_deployments_status_becomes_gauges_an_alert_can_read() {
        let m = Metrics::default();
        let status = kestrel_crds::ModelDeploymentStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Unschedulable".into(),
                message: String::new(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            variants: vec![VariantStatus {
                name: "f32".into(),
                replicas: 2,
                ready_replicas: 1,
                desired_replicas: 2,
            }],
            cost_per_hour: Some("0.20".into()),
            ..Default::default()
        };
        m.observe_status("search", "minilm", &status, Some(200.0), Some(1.5));
        m.decided("search", "minilm", "ScaleUpQueueDepth");
        let text = m.encode();
        for line in [
            r#"kestrel_modeldeployment_condition{namespace="search",name="minilm",type="Ready",status="False"} 1"#,
            r#"kestrel_modeldeployment_condition{namespace="search",name="minilm",type="Ready",status="True"} 0"#,
            r#"kestrel_modeldeployment_replicas{namespace="search",name="minilm",variant="f32",state="ready"} 1"#,
            r#"kestrel_modeldeployment_p95_target_seconds{namespace="search",name="minilm"} 0.2"#,
            r#"kestrel_modeldeployment_cost_per_hour{namespace="search",name="minilm"} 0.2"#,
            r#"kestrel_modeldeployment_budget_per_hour{namespace="search",name="minilm"} 1.5"#,
            r#"kestrel_modeldeployment_decisions_total{namespace="search",name="minilm",reason="ScaleUpQueueDepth"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        m.reconciled("ok", std::time::Duration::from_millis(3));
        assert!(
            m.encode()
                .contains(r#"kestrel_operator_reconciles_total{result="ok"} 1"#)
        );
    }
}
