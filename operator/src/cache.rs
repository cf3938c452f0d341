//! cache: what the operator owns, held in reflector stores so that a reconcile reads
//! memory, not the API server. Each watch keeps only the fields reconcile reads
//! (`slim_*`), so a thousand ModelDeployments cost a few MiB, and feeds a trigger
//! channel that wakes the owning ModelDeployment's reconcile.
//!
//! The watches run in their own tasks, outside the controller: a controller at its
//! concurrency limit stops polling its trigger streams, and a reconcile that waited
//! for a cache driven by those streams would never finish.

use std::borrow::Cow;
use std::sync::Arc;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kestrel_crds::ModelDeployment;
use kestrel_crds::contract::pod_labels;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::Deserialize;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::build::APPLIED_HASH;

/// Label every object the operator applies carries.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=kestrel-operator";

/// A Deployment as the cache holds it: metadata, the replica count it asks for, and
/// the counts of its status. The full object (a pod template, conditions) is about
/// 2.5 KiB of struct before any string; this is a tenth of that.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CachedDeployment {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReplicasSpec,
    #[serde(default)]
    pub status: ReplicaCounts,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ReplicasSpec {
    pub replicas: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub updated_replicas: Option<i32>,
}

/// A pod as the cache holds it: metadata and status (where its problems are read).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CachedPod {
    pub metadata: ObjectMeta,
    pub status: Option<PodStatus>,
}

/// Implements [`Resource`] for a cached view by taking the API coordinates of the
/// full type it is read from.
macro_rules! view_of {
    ($view:ty, $full:ty) => {
        impl Resource for $view {
            type DynamicType = ();
            type Scope = <$full as Resource>::Scope;
            fn kind(_: &()) -> Cow<'_, str> {
                <$full as Resource>::kind(&())
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as Resource>::group(&())
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as Resource>::version(&())
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as Resource>::plural(&())
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
view_of!(CachedDeployment, Deployment);
view_of!(CachedPod, Pod);

/// Read handles of the caches of owned objects, for one watched scope.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Store<CachedDeployment>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    pub pods: Store<CachedPod>,
}

impl Caches {
    /// Waits until every cache holds its first complete list. Await it from one task
    /// only: kube's readiness future wakes only the most recent of several waiters.
    pub async fn ready(&self) {
        // A dropped writer means the scope is shutting down; reconcile then reads empty
        // caches, but the controller is stopping too and applies nothing more.
        let _ = futures::join!(
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready(),
            self.pdbs.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
    }

    /// Worker Deployments of one ModelDeployment.
    pub fn deployments_of(&self, namespace: &str, name: &str) -> Vec<Arc<CachedDeployment>> {
        self.deployments
            .state_filter(|d| belongs_to(d.meta(), namespace, name))
    }

    /// Worker pods of one ModelDeployment.
    pub fn pods_of(&self, namespace: &str, name: &str) -> Vec<Arc<CachedPod>> {
        self.pods
            .state_filter(|p| belongs_to(p.meta(), namespace, name))
    }

    /// Metadata of the Service named like the ModelDeployment, if it exists.
    pub fn service(&self, namespace: &str, name: &str) -> Option<ObjectMeta> {
        self.services
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| s.metadata.clone())
    }

    /// Metadata of the PodDisruptionBudget named like the ModelDeployment, if it exists.
    pub fn pdb(&self, namespace: &str, name: &str) -> Option<ObjectMeta> {
        self.pdbs
            .get(&ObjectRef::new(name).within(namespace))
            .map(|p| p.metadata.clone())
    }
}

/// Whether an object carries the label of ModelDeployment `namespace/name`.
pub fn belongs_to(meta: &ObjectMeta, namespace: &str, name: &str) -> bool {
    meta.namespace.as_deref() == Some(namespace)
        && meta
            .labels
            .as_ref()
            .and_then(|l| l.get(pod_labels::MODEL_DEPLOYMENT))
            .map(String::as_str)
            == Some(name)
}

/// The ModelDeployment an owned object belongs to, from its label.
pub fn owner_of(meta: &ObjectMeta) -> Option<ObjectRef<ModelDeployment>> {
    let md = meta.labels.as_ref()?.get(pod_labels::MODEL_DEPLOYMENT)?;
    Some(ObjectRef::new(md).within(meta.namespace.as_deref()?))
}

/// Keeps of an object's metadata what reconcile and the caches' keys read: name,
/// namespace, uid, the two Kestrel labels, the applied-hash annotation, and the
/// timestamps. Managed fields (the write history of every field manager) are most of
/// an object's size.
pub fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == pod_labels::MODEL_DEPLOYMENT || k == pod_labels::VARIANT);
    }
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k == APPLIED_HASH);
    }
}

/// Keeps of a pod what its problems are read from: scheduling conditions and container
/// states.
pub fn slim_pod(p: &mut CachedPod) {
    slim_meta(&mut p.metadata);
    p.metadata.annotations = None;
    if let Some(s) = p.status.take() {
        p.status = Some(PodStatus {
            phase: s.phase,
            conditions: s.conditions,
            container_statuses: s.container_statuses,
            ..Default::default()
        });
    }
}

/// Keeps of a ModelDeployment everything but its managed fields (the write history of
/// each field manager, often larger than the object itself).
pub fn slim_model_deployment(md: &mut ModelDeployment) {
    md.metadata.managed_fields = None;
}

/// Starts the watches of owned objects in one scope (a namespace, or all when None).
/// Returns the caches, the stream of ModelDeployments whose owned objects changed, and
/// the tasks, which stop when dropped.
pub fn start(
    client: &Client,
    namespace: Option<&str>,
) -> (
    Caches,
    impl Stream<Item = ObjectRef<ModelDeployment>> + Send + 'static,
    JoinSet<()>,
) {
    let (tx, rx) = mpsc::unbounded();
    let mut tasks = JoinSet::new();
    let owned = list_config().labels(MANAGED_BY_SELECTOR);
    let pods_config = list_config().labels(pod_labels::MODEL_DEPLOYMENT);

    let (deployments, writer) = reflector::store();
    let stream = watcher(api::<CachedDeployment>(client, namespace), owned.clone())
        .default_backoff()
        .modify(|d: &mut CachedDeployment| slim_meta(&mut d.metadata))
        .reflect(writer);
    tasks.spawn(forward("deployments", stream, tx.clone()));

    let (services, writer) = reflector::store();
    let stream = watcher(
        api::<PartialObjectMeta<Service>>(client, namespace),
        owned.clone(),
    )
    .default_backoff()
    .modify(|s: &mut PartialObjectMeta<Service>| slim_meta(&mut s.metadata))
    .reflect(writer);
    tasks.spawn(forward("services", stream, tx.clone()));

    let (pdbs, writer) = reflector::store();
    let stream = watcher(
        api::<PartialObjectMeta<PodDisruptionBudget>>(client, namespace),
        owned,
    )
    .default_backoff()
    .modify(|p: &mut PartialObjectMeta<PodDisruptionBudget>| slim_meta(&mut p.metadata))
    .reflect(writer);
    tasks.spawn(forward("poddisruptionbudgets", stream, tx.clone()));

    // Pod failures (unschedulable, crash loops) change status without touching the Deployment.
    let (pods, writer) = reflector::store();
    let stream = watcher(api::<CachedPod>(client, namespace), pods_config)
        .default_backoff()
        .modify(slim_pod)
        .reflect(writer);
    tasks.spawn(forward("pods", stream, tx));

    let caches = Caches {
        deployments,
        services,
        pdbs,
        pods,
    };
    (caches, rx, tasks)
}

/// Objects per page of a watch's initial list. Each page is held whole, managed fields
/// and all, until its objects are slimmed: small pages keep that transient peak (and the
/// heap fragmentation it leaves) small, at the cost of a few more list calls at start.
pub const LIST_PAGE_SIZE: u32 = 50;

/// The watch settings every cache and the ModelDeployment watch use.
pub fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// Drives one reflected watch and sends the owner of each changed object.
async fn forward<K>(
    kind: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    tx: mpsc::UnboundedSender<ObjectRef<ModelDeployment>>,
) where
    K: Resource + Clone + Send + 'static,
{
    let mut stream = std::pin::pin!(stream.touched_objects());
    let mut listed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(obj) => {
                if let Some(owner) = owner_of(obj.meta())
                    && tx.unbounded_send(owner).is_err()
                {
                    return;
                }
            }
            Err(e) => warn!(kind, error = %e, "watch failed; retrying with backoff"),
        }
        if !listed {
            listed = true;
            info!(kind, "watching owned objects");
        }
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cached_deployment_keeps_what_reconcile_reads() {
        let mut d: CachedDeployment = serde_json::from_value(json!({
            "metadata": {"name": "m-f32", "namespace": "ns",
                "labels": {"kestrel.dev/model-deployment": "m", "kestrel.dev/variant": "f32",
                    "app.kubernetes.io/name": "kestrel-worker"},
                "annotations": {APPLIED_HASH: "abc", "deployment.kubernetes.io/revision": "3"},
                "managedFields": [{"manager": "kestrel-operator", "operation": "Apply"}]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "worker", "image": "w"}]}}},
            "status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3,
                "conditions": [{"type": "Available", "status": "True"}]}
        }))
        .unwrap();
        slim_meta(&mut d.metadata);
        assert_eq!(
            crate::observe::deployment_state(&d),
            crate::observe::DeploymentState {
                name: "m-f32".into(),
                applied_hash: Some("abc".into()),
                spec_replicas: 3,
                replicas: 3,
                ready_replicas: 2,
                updated_replicas: 3,
            }
        );
        assert_eq!(
            owner_of(&d.metadata),
            Some(ObjectRef::new("m").within("ns"))
        );
        assert!(d.metadata.managed_fields.is_none());
        assert_eq!(d.metadata.labels.as_ref().unwrap().len(), 2);
        assert_eq!(d.metadata.annotations.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn a_slim_pod_keeps_its_problem() {
        let json = json!({
            "metadata": {"name": "m-f32-1", "namespace": "ns",
                "labels": {"kestrel.dev/model-deployment": "m"}},
            "spec": {"containers": [{"name": "worker", "image": "w", "args": ["serve"]}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available"}],
                "podIPs": [{"ip": "10.0.0.1"}]}
        });
        let mut p: CachedPod = serde_json::from_value(json).unwrap();
        let before = crate::observe::pod_problem(&p, 0);
        assert!(before.is_some());
        slim_pod(&mut p);
        assert_eq!(crate::observe::pod_problem(&p, 0), before);
        assert!(p.status.unwrap().pod_ips.is_none());
    }

    #[test]
    fn cached_views_use_the_api_coordinates_of_the_full_types() {
        assert_eq!(
            CachedDeployment::url_path(&(), Some("ns")),
            "/apis/apps/v1/namespaces/ns/deployments"
        );
        assert_eq!(
            CachedPod::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
    }

    #[test]
    fn objects_without_the_model_deployment_label_have_no_owner() {
        let meta = ObjectMeta {
            name: Some("x".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        };
        assert_eq!(owner_of(&meta), None);
    }
}
