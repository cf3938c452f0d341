//! The operator's own metrics (`/metrics` of the operator, not of workers).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kestrel_crds::ModelDeployment;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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
    /// Per-ModelDeployment gauges, read from the ModelDeployment caches at each scrape.
    pub status_gauges: StatusGauges,
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
        let md_decisions = Family::<Labels, Counter>::default();
        let status_gauges = StatusGauges::default();
        {
            let md = root.sub_registry_with_prefix("kestrel_modeldeployment");
            md.register_collector(Box::new(status_gauges.clone()));
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
            "Reconciles by result (ok, error, invalid_spec, deleting)",
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
            status_gauges,
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

    /// Publishes the status of the ModelDeployments in this cache (one per watched
    /// scope) as gauges.
    pub fn track(&self, model_deployments: Store<ModelDeployment>) {
        self.status_gauges
            .stores
            .lock()
            .expect("not poisoned")
            .push(model_deployments);
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

/// The per-ModelDeployment gauges: `condition{namespace,name,type,status}` (1 for each
/// condition's current status, 0 for the others), `replicas{namespace,name,variant,state}`
/// (desired|ready), `p95_target_seconds`, `cost_per_hour` and `budget_per_hour`.
///
/// They are encoded from the ModelDeployment caches at each scrape, not kept as series:
/// a thousand ModelDeployments cost no memory here, and a deleted one's series vanish
/// with it instead of staying at their last value.
#[derive(Clone, Default)]
pub struct StatusGauges {
    stores: Arc<Mutex<Vec<Store<ModelDeployment>>>>,
}

impl fmt::Debug for StatusGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusGauges").finish_non_exhaustive()
    }
}

impl StatusGauges {
    fn snapshot(&self) -> Vec<Arc<ModelDeployment>> {
        let mut mds: Vec<_> = self
            .stores
            .lock()
            .expect("not poisoned")
            .iter()
            .flat_map(Store::state)
            .collect();
        mds.sort_by_key(|md| (md.namespace(), md.name_any()));
        mds
    }
}

impl Collector for StatusGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mds = self.snapshot();
        let ids: Vec<(String, String)> = mds
            .iter()
            .map(|md| (md.namespace().unwrap_or_default(), md.name_any()))
            .collect();
        let rows = || {
            mds.iter()
                .zip(&ids)
                .map(|(md, (ns, name))| (md, ns.as_str(), name.as_str()))
        };
        {
            let help = "Status conditions: 1 for the current status of each type";
            let mut family =
                encoder.encode_descriptor("condition", help, None, MetricType::Gauge)?;
            for (md, namespace, name) in rows() {
                for c in md.status.iter().flat_map(|s| &s.conditions) {
                    for status in ["True", "False", "Unknown"] {
                        let labels = [
                            ("namespace", namespace),
                            ("name", name),
                            ("type", c.type_.as_str()),
                            ("status", status),
                        ];
                        ConstGauge::new(i64::from(c.status == status))
                            .encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let help = "Replicas per variant by state (desired, ready)";
            let mut family =
                encoder.encode_descriptor("replicas", help, None, MetricType::Gauge)?;
            for (md, namespace, name) in rows() {
                for v in md.status.iter().flat_map(|s| &s.variants) {
                    for (state, n) in [("desired", v.desired_replicas), ("ready", v.ready_replicas)]
                    {
                        let labels = [
                            ("namespace", namespace),
                            ("name", name),
                            ("variant", v.name.as_str()),
                            ("state", state),
                        ];
                        ConstGauge::new(i64::from(n)).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        type Value = fn(&ModelDeployment) -> Option<f64>;
        let per_object: [(&str, &str, Value); 3] = [
            ("p95_target_seconds", "The SLO's p95 latency target", |md| {
                Some(f64::from(md.spec.slo.p95_latency_ms) / 1000.0)
            }),
            (
                "cost_per_hour",
                "Cost per hour of the replicas that exist",
                |md| md.status.as_ref()?.cost_per_hour.as_deref()?.parse().ok(),
            ),
            (
                "budget_per_hour",
                "The budget's maximum cost per hour",
                |md| {
                    md.spec
                        .budget
                        .as_ref()?
                        .max_cost_per_hour
                        .as_deref()?
                        .parse()
                        .ok()
                },
            ),
        ];
        for (metric, help, value) in per_object {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Gauge)?;
            for (md, namespace, name) in rows() {
                if let Some(v) = value(md) {
                    let labels = [("namespace", namespace), ("name", name)];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
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
        let (store, mut writer) = kube::runtime::reflector::store::<ModelDeployment>();
        let mut md = crate::fixtures::md("minilm");
        md.metadata.namespace = Some("search".into());
        md.spec.slo.p95_latency_ms = 200;
        md.spec.budget = Some(kestrel_crds::v1alpha1::BudgetSpec {
            max_cost_per_hour: Some("1.5".into()),
            ..Default::default()
        });
        md.status = Some(kestrel_crds::ModelDeploymentStatus {
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
        });
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(md));
        m.track(store.clone());
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

    #[test]
    fn a_deleted_model_deployments_gauges_vanish_with_it() {
        let m = Metrics::default();
        let (store, mut writer) = kube::runtime::reflector::store::<ModelDeployment>();
        let mut md = crate::fixtures::md("gone");
        md.metadata.namespace = Some("search".into());
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(md.clone()));
        m.track(store);
        let series =
            r#"kestrel_modeldeployment_p95_target_seconds{namespace="search",name="gone"}"#;
        assert!(m.encode().contains(series));
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Delete(md));
        assert!(!m.encode().contains(series), "{}", m.encode());
    }
}
