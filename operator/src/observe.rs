//! observe: read what exists (owned objects and pod states from the caches, serving
//! signals from Prometheus); everything it returns is plain data.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kestrel_crds::contract::pod_labels;
use kube::ResourceExt;

use crate::build::APPLIED_HASH;
use crate::cache::{CachedDeployment, CachedPod, Caches, belongs_to};
use crate::signals::SignalsReading;

/// Everything reconcile knows about the world for one ModelDeployment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Worker Deployments by variant label.
    pub deployments: BTreeMap<String, DeploymentState>,
    /// Hash annotation of the Service, if it exists.
    pub service: Option<ObjectState>,
    /// Hash annotation of the PodDisruptionBudget, if it exists.
    pub pdb: Option<ObjectState>,
    /// Problems of worker pods, worst first.
    pub pod_problems: Vec<PodProblem>,
    /// Median seconds from creation to Ready of the worker pods that became Ready
    /// without a restart (what a new replica costs in time); none before the first.
    pub startup_s: Option<f64>,
    /// Serving signals (None when not read, e.g. scaling disabled).
    pub signals: Option<SignalsReading>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectState {
    pub name: String,
    pub applied_hash: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeploymentState {
    pub name: String,
    pub applied_hash: Option<String>,
    pub spec_replicas: i32,
    /// Pods of this Deployment (all revisions).
    pub replicas: i32,
    pub ready_replicas: i32,
    /// Replicas of the current revision (a rollout is done when it equals spec).
    pub updated_replicas: i32,
}

/// Why a worker pod is not serving, as the user should read it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PodProblem {
    /// The scheduler cannot place the pod (its message says why, with counts).
    Unschedulable { pod: String, message: String },
    /// The image cannot be pulled or is not present with pull policy Never.
    ImageUnavailable {
        pod: String,
        reason: String,
        message: String,
    },
    /// The container keeps crashing; `last_reason` is the last termination reason (e.g. OOMKilled).
    CrashLooping {
        pod: String,
        last_reason: String,
        restarts: i32,
        message: String,
    },
    /// The container cannot be created from its config (missing volume, secret…).
    ConfigError {
        pod: String,
        reason: String,
        message: String,
    },
    /// The container runs but readiness keeps failing.
    NotReady { pod: String },
    /// The container has not been created for a long time (a volume that cannot be
    /// mounted, a missing secret…); the pod's Events say which.
    StuckCreating { pod: String, seconds: i64 },
}

impl PodProblem {
    /// The condition reason this problem surfaces as.
    pub fn reason(&self) -> &'static str {
        match self {
            PodProblem::Unschedulable { .. } => "Unschedulable",
            PodProblem::ImageUnavailable { .. } => "ImageUnavailable",
            PodProblem::CrashLooping { last_reason, .. } if last_reason == "OOMKilled" => {
                "OOMKilled"
            }
            PodProblem::CrashLooping { .. } => "CrashLoopBackOff",
            PodProblem::ConfigError { .. } => "ContainerConfigError",
            PodProblem::NotReady { .. } => "ReadinessFailing",
            PodProblem::StuckCreating { .. } => "ContainerNotCreated",
        }
    }

    pub fn message(&self) -> String {
        match self {
            PodProblem::Unschedulable { pod, message } => {
                format!("pod {pod} cannot be scheduled: {message}")
            }
            PodProblem::ImageUnavailable {
                pod,
                reason,
                message,
            } => format!("pod {pod}: {reason}: {message}"),
            PodProblem::CrashLooping {
                pod,
                last_reason,
                restarts,
                message,
            } => {
                let detail = if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                };
                format!(
                    "pod {pod} is crash-looping ({restarts} restarts), last exit {last_reason}{detail}"
                )
            }
            PodProblem::ConfigError {
                pod,
                reason,
                message,
            } => format!("pod {pod}: {reason}: {message}"),
            PodProblem::NotReady { pod } => {
                format!("pod {pod} is running but its readiness probe fails")
            }
            PodProblem::StuckCreating { pod, seconds } => format!(
                "pod {pod} has not started its container for {seconds}s; `kubectl describe pod {pod}` shows why (e.g. a volume that cannot be mounted)"
            ),
        }
    }
}

/// A container still being created after this long is reported as stuck.
pub const STUCK_CREATING_SECONDS: i64 = 90;

/// Reads one pod's state into a problem, if it has one. Pure (`now` in Unix seconds).
pub fn pod_problem(pod: &CachedPod, now: i64) -> Option<PodProblem> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return Some(PodProblem::Unschedulable {
            pod: name,
            message: c.message.clone().unwrap_or_default(),
        });
    }
    for cs in status.container_statuses.as_deref().unwrap_or_default() {
        let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
        let reason = waiting.and_then(|w| w.reason.clone()).unwrap_or_default();
        let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
        match reason.as_str() {
            "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" | "InvalidImageName" => {
                return Some(PodProblem::ImageUnavailable {
                    pod: name,
                    reason,
                    message,
                });
            }
            "CrashLoopBackOff" => {
                let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                return Some(PodProblem::CrashLooping {
                    pod: name,
                    last_reason: last
                        .and_then(|t| t.reason.clone())
                        .unwrap_or_else(|| "Error".into()),
                    restarts: cs.restart_count,
                    message: last
                        .and_then(|t| t.message.clone())
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                });
            }
            "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
                return Some(PodProblem::ConfigError {
                    pod: name,
                    reason,
                    message,
                });
            }
            "ContainerCreating" | "PodInitializing" => {
                let created = pod
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(now, |t| t.0.as_second());
                if now - created > STUCK_CREATING_SECONDS {
                    return Some(PodProblem::StuckCreating {
                        pod: name,
                        seconds: now - created,
                    });
                }
            }
            _ => {}
        }
        let running = cs.state.as_ref().and_then(|s| s.running.as_ref());
        // A container that has run a while and restarted but is still not ready: its probe fails.
        if running.is_some() && !cs.ready && cs.restart_count > 0 {
            return Some(PodProblem::NotReady { pod: name });
        }
    }
    None
}

/// Reads a Deployment into the state reconcile needs. Pure.
pub fn deployment_state(d: &CachedDeployment) -> DeploymentState {
    DeploymentState {
        name: d.name_any(),
        applied_hash: d.annotations().get(APPLIED_HASH).cloned(),
        spec_replicas: d.spec.replicas.unwrap_or(1),
        replicas: d.status.replicas.unwrap_or(0),
        ready_replicas: d.status.ready_replicas.unwrap_or(0),
        updated_replicas: d.status.updated_replicas.unwrap_or(0),
    }
}

/// Reads what the operator owns for one ModelDeployment from its caches. Pure over the
/// caches' contents (`now` in Unix seconds).
pub fn owned_objects(now: i64, caches: &Caches, namespace: &str, name: &str) -> Observed {
    let object_state = |meta: ObjectMeta| ObjectState {
        applied_hash: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(APPLIED_HASH).cloned()),
        name: meta.name.unwrap_or_default(),
    };
    let pods = caches.pods_of(namespace, name);
    let mut pod_problems: Vec<PodProblem> =
        pods.iter().filter_map(|p| pod_problem(p, now)).collect();
    pod_problems.sort();
    let mut startups: Vec<i64> = pods.iter().filter_map(|p| startup_seconds(p)).collect();
    startups.sort_unstable();
    Observed {
        deployments: caches
            .deployments_of(namespace, name)
            .iter()
            .filter_map(|d| {
                Some((
                    d.labels().get(pod_labels::VARIANT)?.clone(),
                    deployment_state(d),
                ))
            })
            .collect(),
        // Only objects that carry our label are ours; a same-named foreign object is left alone.
        service: caches
            .service(namespace, name)
            .filter(|m| belongs_to(m, namespace, name))
            .map(object_state),
        pdb: caches
            .pdb(namespace, name)
            .filter(|m| belongs_to(m, namespace, name))
            .map(object_state),
        pod_problems,
        startup_s: startups.get(startups.len() / 2).map(|&s| s as f64),
        signals: None,
    }
}

/// Seconds from a pod's creation to its Ready condition, for a pod that is Ready and
/// whose containers never restarted (a later Ready after a crash says nothing of how
/// long a new replica takes).
pub fn startup_seconds(pod: &CachedPod) -> Option<i64> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0.as_second();
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some()
        || status
            .container_statuses
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|c| c.restart_count > 0)
    {
        return None;
    }
    let ready = status
        .conditions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    let at = ready.last_transition_time.as_ref()?.0.as_second();
    (at >= created).then_some(at - created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> CachedPod {
        serde_json::from_value(json!({"metadata": {"name": "p-1"}, "status": status})).unwrap()
    }

    #[test]
    fn unschedulable_pods_carry_the_schedulers_message() {
        let p = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}),
        );
        let problem = pod_problem(&p, 0).unwrap();
        assert_eq!(problem.reason(), "Unschedulable");
        assert_eq!(
            problem.message(),
            "pod p-1 cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        );
    }

    #[test]
    fn a_crash_loop_after_an_oom_kill_says_oomkilled() {
        let p = pod(
            json!({"phase": "Running", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "",
            "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        );
        let problem = pod_problem(&p, 0).unwrap();
        assert_eq!(problem.reason(), "OOMKilled");
        assert_eq!(
            problem.message(),
            "pod p-1 is crash-looping (4 restarts), last exit OOMKilled"
        );
    }

    #[test]
    fn image_never_pull_is_an_image_problem() {
        let p = pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "worker", "image": "w:1", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image w:1 is not present"}}}]}),
        );
        assert_eq!(
            pod_problem(&p, 0).unwrap().message(),
            "pod p-1: ErrImageNeverPull: image w:1 is not present"
        );
    }

    #[test]
    fn a_container_stuck_creating_is_reported_after_the_grace() {
        let p: CachedPod = serde_json::from_value(json!({"metadata": {"name": "p-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "worker", "image": "w", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}})).unwrap();
        let created = 1_767_225_600; // 2026-01-01T00:00:00Z
        assert_eq!(pod_problem(&p, created + 30), None);
        let problem = pod_problem(&p, created + 120).unwrap();
        assert_eq!(problem.reason(), "ContainerNotCreated");
        assert!(problem.message().contains("120s"), "{}", problem.message());
    }

    #[test]
    fn startup_is_creation_to_ready_of_pods_that_never_restarted() {
        let at = |created: &str, status: serde_json::Value| -> CachedPod {
            serde_json::from_value(json!({
                "metadata": {"name": "p-1", "creationTimestamp": created},
                "status": status
            }))
            .unwrap()
        };
        let ready = |at: &str, restarts: i32| {
            json!({"phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": at}],
                "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": true,
                    "restartCount": restarts, "state": {"running": {}}}]})
        };
        let table = [
            (ready("2026-11-22T10:00:12Z", 0), Some(12)),
            // Restarted: its Ready time is the restart's, not the startup's.
            (ready("2026-11-22T10:05:00Z", 1), None),
            // Not Ready yet.
            (
                json!({"phase": "Pending", "conditions": [{"type": "Ready", "status": "False",
                    "lastTransitionTime": "2026-11-22T10:00:01Z"}]}),
                None,
            ),
        ];
        for (status, want) in table {
            let p = at("2026-11-22T10:00:00Z", status.clone());
            assert_eq!(startup_seconds(&p), want, "{status}");
        }
    }

    #[test]
    fn a_healthy_running_pod_has_no_problem() {
        let p = pod(
            json!({"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {}}}]}),
        );
        assert_eq!(pod_problem(&p, 0), None);
    }
}
