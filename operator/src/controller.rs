//! The ModelDeployment controller: runs the pipeline observe → validate → decide →
//! build → apply → status for each object, with per-object backoff on errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kestrel_crds::contract::metrics as series;
use kestrel_crds::v1alpha1::{LatencyMetric, Task};
use kestrel_crds::{ModelDeployment, ModelDeploymentStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, predicates, reflector};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::{info, warn};

use crate::apply::{self, ApplyError, FIELD_MANAGER};
use crate::cache::{self, Caches};
use crate::config::PriceTable;
use crate::events::Publisher;
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

/// What every watched scope shares: the client, the Event publisher, metrics, settings
/// and the signal source.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub events: Arc<Publisher>,
    pub metrics: Metrics,
    pub config: Config,
    pub signals: Arc<dyn MetricsSource>,
}

/// One watched scope's reconcile context: the shared parts (reached through `Deref`),
/// the caches of owned objects and the per-object failure counts for backoff.
pub struct Context {
    shared: Shared,
    pub caches: Caches,
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
}

impl Context {
    pub fn new(shared: Shared, caches: Caches) -> Self {
        Self {
            shared,
            caches,
            failures: Mutex::default(),
        }
    }
}

impl std::ops::Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// A reconcile that failed; the category is the metric label, the Event reason and the
/// log field.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
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
    // Being deleted: the garbage collector removes what it owns; applying now would
    // re-create objects the collector just deleted and hold the deletion up.
    if md.metadata.deletion_timestamp.is_some() {
        return Ok((Action::await_change(), "deleting"));
    }

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

    let mut observed = observe::owned_objects(now.0.as_second(), &ctx.caches, &namespace, &name);
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
            generation: valid.task == Task::TextGeneration,
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
    ctx.metrics.write("event", "create");
    if let Err(e) = ctx.events.publish(ev, &md.object_ref(&())).await {
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
    shared: Shared,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let (caches, owned_changed, _watches) = cache::start(&client, namespace.as_deref());
    // Reconciles start once the caches hold their first list: before that, an owned
    // object would look missing and be "created" again. Waited for here, once: kube's
    // readiness future wakes only its most recent waiter, and reconciles that each waited
    // for it were never woken (one of two ModelDeployments stayed unreconciled).
    info!(namespace = ?namespace, "listing owned objects");
    caches.ready().await;
    let ctx = Arc::new(Context::new(shared, caches));
    let api: Api<ModelDeployment> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    // Only spec changes (generation) trigger a reconcile; the operator's own status writes
    // must not, or every status write would schedule the next one.
    let (reader, writer) = reflector::store();
    ctx.metrics.track(reader.clone());
    let model_deployments = watcher(api, cache::list_config().any_semantic())
        .default_backoff()
        .modify(cache::slim_model_deployment)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(model_deployments, reader)
        .with_config(ControllerConfig::default().concurrency(RECONCILE_CONCURRENCY))
        // Changes of owned Deployments, Services, PDBs and pods, from the cache watches.
        .reconcile_on(owned_changed)
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
