//! The ModelDeployment controller: runs the pipeline observe → validate → decide →
//! build → apply → status for each object, with per-object backoff on errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kestrel_crds::contract::{metrics as series, pod_labels};
use kestrel_crds::v1alpha1::LatencyMetric;
use kestrel_crds::{ModelDeployment, ModelDeploymentStatus};
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, predicates, reflector};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::{info, warn};

use crate::apply::{self, ApplyError, FIELD_MANAGER};
use crate::config::PriceTable;
use crate::metrics::Metrics;
use crate::signals::{MetricsSource, SignalsQuery};
use crate::status::{self, EventSpec, Outcome};
use crate::{build, decide, observe, validate};

/// Reconciles running at once: enough to keep up, few enough that each one's API calls
/// are not queued behind a thousand others.
const RECONCILE_CONCURRENCY: u16 = 8;

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Config {
    pub default_image: Option<String>,
    pub prices: PriceTable,
    /// How often an autoscaled ModelDeployment is re-evaluated.
    pub evaluation_interval: Duration,
    /// How often an idle ModelDeployment with scaling disabled is re-checked.
    pub idle_resync: Duration,
    /// Window for rates and quantiles in the signal queries.
    pub signal_window_seconds: u32,
    /// Worker profiles: per-variant capacity for the autoscaler.
    pub profiles: crate::autoscale::Profiles,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: Config,
    pub signals: Arc<dyn MetricsSource>,
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Metrics,
        config: Config,
        signals: Arc<dyn MetricsSource>,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            config,
            signals,
            failures: Mutex::default(),
        }
    }
}

/// A reconcile that failed; the category is the metric label, the Event reason and the
/// log field.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to observe the objects of {namespace}/{name}: {source}")]
    Observe {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("failed to write the status of {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

impl ReconcileError {
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Observe { .. } => "ObserveFailed",
            ReconcileError::Apply(_) => "ApplyFailed",
            ReconcileError::Status { .. } => "StatusWriteFailed",
        }
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusPatch<'a> {
    api_version: &'static str,
    kind: &'static str,
    status: &'a ModelDeploymentStatus,
}

/// Now, at the second (metav1.Time's precision), so re-reading a status compares equal.
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).expect("now is a valid time"))
}

pub async fn reconcile(
    md: Arc<ModelDeployment>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = pipeline(&md, &ctx).await;
    let took = started.elapsed();
    match &result {
        Ok((_, label)) => {
            ctx.metrics.reconciled(label, took);
            ctx.failures
                .lock()
                .expect("not poisoned")
                .remove(&ObjectRef::from(md.as_ref()));
        }
        Err(e) => {
            ctx.metrics.reconciled("error", took);
            ctx.metrics.failed(e.category());
            let ev = EventSpec {
                warning: true,
                reason: e.category().into(),
                action: "Reconcile".into(),
                message: e.to_string(),
            };
            publish(&ctx, &md, &ev).await;
        }
    }
    result.map(|(action, _)| action)
}

async fn pipeline(
    md: &ModelDeployment,
    ctx: &Context,
) -> Result<(Action, &'static str), ReconcileError> {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let now = now();
    let prev = md.status.as_ref();

    let valid = match validate::validate(
        md,
        ctx.config.default_image.as_deref(),
        &ctx.config.prices,
    ) {
        Ok(v) => v,
        Err(err) => {
            warn!(%namespace, %name, error = %err, category = "InvalidSpec", "spec cannot be served");
            let next = status::compute(prev, md.metadata.generation, &Outcome::Invalid(&err), &now);
            write_status(ctx, md, prev, &next).await?;
            // An invalid spec waits for the next change instead of retrying hot.
            return Ok((Action::await_change(), "invalid_spec"));
        }
    };

    let mut observed = observe::owned_objects(now.0.as_second(), &ctx.client, &namespace, &name)
        .await
        .map_err(|source| ReconcileError::Observe {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    if valid.scaling.enabled {
        let query = SignalsQuery {
            namespace: namespace.clone(),
            name: name.clone(),
            latency_metric: match valid.slo.latency_metric {
                LatencyMetric::RequestDuration => series::REQUEST_DURATION,
                LatencyMetric::TimeToFirstToken => series::TIME_TO_FIRST_TOKEN,
            },
            window_seconds: ctx.config.signal_window_seconds,
            short_window_seconds: 15,
        };
        observed.signals = Some(ctx.signals.read(&query).await);
    }

    let memory = prev.and_then(|s| s.policy_memory.as_ref());
    let plan = decide::decide(
        &valid,
        &observed,
        memory,
        now.0.as_second() as f64,
        &ctx.config.profiles,
    );
    let desired = build::build(&valid, &plan);
    let applied = apply::apply(&ctx.client, &namespace, &desired, &observed, &ctx.metrics).await?;
    if !applied.is_empty() {
        info!(%namespace, %name, created = ?applied.created, updated = ?applied.updated, deleted = ?applied.deleted,
            replicas = plan.total(), variant = %plan.target_variant, reason = %plan.reason, "applied");
    }
    for what in &applied.created {
        publish(
            ctx,
            md,
            &EventSpec {
                warning: false,
                reason: "Created".into(),
                action: format!("Create-{}", what.replace(' ', "-")),
                message: format!("created {what}"),
            },
        )
        .await;
    }

    let next = status::compute(
        prev,
        md.metadata.generation,
        &Outcome::Planned {
            md: &valid,
            observed: &observed,
            plan: &plan,
        },
        &now,
    );
    write_status(ctx, md, prev, &next).await?;
    ctx.metrics.observe_status(
        &namespace,
        &name,
        &next,
        Some(valid.slo.p95_latency_ms),
        valid.budget.max_cost_per_hour,
    );

    let settled =
        next.ready_replicas == next.desired_replicas && next.replicas == next.desired_replicas;
    let requeue = if valid.scaling.enabled {
        ctx.config.evaluation_interval
    } else if !settled {
        Duration::from_secs(10)
    } else {
        ctx.config.idle_resync
    };
    Ok((Action::requeue(requeue), "ok"))
}

/// Writes the status only when it changed, then publishes the Events the change implies.
async fn write_status(
    ctx: &Context,
    md: &ModelDeployment,
    prev: Option<&ModelDeploymentStatus>,
    next: &ModelDeploymentStatus,
) -> Result<(), ReconcileError> {
    if prev == Some(next) {
        return Ok(());
    }
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = StatusPatch {
        api_version: "kestrel.dev/v1alpha1",
        kind: "ModelDeployment",
        status: next,
    };
    ctx.metrics.write("modeldeployment/status", "apply");
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| ReconcileError::Status {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    })?;
    for ev in status::events(prev, next) {
        if let ("Scaled" | "VariantSwitch", Some(d)) = (ev.reason.as_str(), &next.last_decision) {
            ctx.metrics.decided(&namespace, &name, &d.reason);
        }
        publish(ctx, md, &ev).await;
    }
    Ok(())
}

async fn publish(ctx: &Context, md: &ModelDeployment, ev: &EventSpec) {
    let event = Event {
        type_: if ev.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: ev.reason.clone(),
        note: Some(ev.message.chars().take(1000).collect()),
        action: ev.action.clone(),
        secondary: None,
    };
    ctx.metrics.write("event", "create");
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        warn!(namespace = ?md.namespace(), name = %md.name_any(), error = %e, "failed to publish an Event");
    }
}

/// Backs off per object: 1 s, 2 s, 4 s … up to 5 min; a success resets it.
pub fn error_policy(md: Arc<ModelDeployment>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("not poisoned");
    let n = failures.entry(ObjectRef::from(md.as_ref())).or_insert(0);
    *n += 1;
    let delay = backoff(*n);
    warn!(namespace = ?md.namespace(), name = %md.name_any(), category = err.category(), error = %err,
        retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.saturating_sub(1)).min(300))
}

/// Runs the controller over one namespace (or all when None) until `shutdown` fires.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=kestrel-operator");
    let pods = watcher::Config::default().labels(pod_labels::MODEL_DEPLOYMENT);
    // Owned objects only trigger reconciles (reconcile reads them fresh): watching their
    // metadata is enough and keeps memory flat with thousands of objects.
    let deployments = watcher(
        api::<PartialObjectMeta<Deployment>>(&client, &namespace),
        owned.clone(),
    )
    .default_backoff()
    .touched_objects();
    let services = watcher(
        api::<PartialObjectMeta<Service>>(&client, &namespace),
        owned.clone(),
    )
    .default_backoff()
    .touched_objects();
    let pdbs = watcher(
        api::<PartialObjectMeta<PodDisruptionBudget>>(&client, &namespace),
        owned,
    )
    .default_backoff()
    .touched_objects();
    // Only spec changes (generation) trigger a reconcile; the operator's own status writes
    // must not, or every status write would schedule the next one.
    let (reader, writer) = reflector::store();
    let model_deployments = watcher(
        api::<ModelDeployment>(&client, &namespace),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(model_deployments, reader)
        .with_config(ControllerConfig::default().concurrency(RECONCILE_CONCURRENCY))
        .owns_stream(deployments)
        .owns_stream(services)
        .owns_stream(pdbs)
        // Pod failures (unschedulable, crash loops) change status without touching the Deployment.
        .watches(api::<Pod>(&client, &namespace), pods, |pod: Pod| {
            let md = pod.labels().get(pod_labels::MODEL_DEPLOYMENT)?.clone();
            Some(ObjectRef::new(&md).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_at_five_minutes() {
        let got: Vec<u64> = [1, 2, 3, 4, 10, 40]
            .iter()
            .map(|n| backoff(*n).as_secs())
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 300, 300]);
    }
}
