//! apply: make the cluster match what build produced. Server-side apply under one field
//! manager; objects whose applied hash (and replicas) already match are skipped, so an
//! idle resync writes nothing; Deployments of variants no longer planned are deleted.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use tracing::info;

use crate::build::{Desired, applied_hash};
use crate::metrics::Metrics;
use crate::observe::Observed;

pub const FIELD_MANAGER: &str = "kestrel-operator";

/// What apply changed, for Events.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("failed to apply {kind} {namespace}/{name}: {source}")]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("failed to delete {kind} {namespace}/{name}: {source}")]
    Delete {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What apply will do, decided without I/O.
#[derive(Debug, Default, PartialEq)]
pub struct ApplyPlan<'a> {
    pub deployments: Vec<&'a Deployment>,
    pub service: Option<&'a Service>,
    pub pdb: Option<&'a PodDisruptionBudget>,
    pub delete_deployments: Vec<String>,
    pub delete_pdb: Option<String>,
}

/// Compares desired with observed: only differing objects are written. Pure.
pub fn plan<'a>(desired: &'a Desired, observed: &Observed) -> ApplyPlan<'a> {
    let deployments = desired
        .deployments
        .iter()
        .filter(|(variant, d)| {
            let want_replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            match observed.deployments.get(*variant) {
                Some(o) => {
                    o.applied_hash.as_ref() != applied_hash(*d) || o.spec_replicas != want_replicas
                }
                None => true,
            }
        })
        .map(|(_, d)| d)
        .collect();
    let service = match &observed.service {
        Some(o) if o.applied_hash.as_ref() == applied_hash(&desired.service) => None,
        _ => Some(&desired.service),
    };
    let pdb = desired.pdb.as_ref().filter(|want| match &observed.pdb {
        Some(o) => o.applied_hash.as_ref() != applied_hash(*want),
        None => true,
    });
    let delete_deployments = observed
        .deployments
        .iter()
        .filter(|(variant, _)| !desired.deployments.contains_key(*variant))
        .map(|(_, d)| d.name.clone())
        .collect();
    let delete_pdb = match (&desired.pdb, &observed.pdb) {
        (None, Some(o)) => Some(o.name.clone()),
        _ => None,
    };
    ApplyPlan {
        deployments,
        service,
        pdb,
        delete_deployments,
        delete_pdb,
    }
}

pub async fn apply(
    client: &Client,
    namespace: &str,
    desired: &Desired,
    observed: &Observed,
    metrics: &Metrics,
) -> Result<Applied, ApplyError> {
    let todo = plan(desired, observed);
    let mut applied = Applied::default();
    let pp = PatchParams::apply(FIELD_MANAGER).force();

    // Scale up and create before deleting, so a variant switch never drops capacity.
    for d in todo.deployments {
        let name = d.name_any();
        let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        metrics.write("deployment", "apply");
        api.patch(&name, &pp, &Patch::Apply(d))
            .await
            .map_err(|source| ApplyError::Apply {
                kind: "Deployment",
                namespace: namespace.into(),
                name: name.clone(),
                source,
            })?;
        let variant = d
            .labels()
            .get(kestrel_crds::contract::pod_labels::VARIANT)
            .cloned()
            .unwrap_or_default();
        let list = if observed.deployments.contains_key(&variant) {
            &mut applied.updated
        } else {
            &mut applied.created
        };
        list.push(format!("Deployment {name}"));
    }
    if let Some(s) = todo.service {
        let name = s.name_any();
        let api: Api<Service> = Api::namespaced(client.clone(), namespace);
        metrics.write("service", "apply");
        api.patch(&name, &pp, &Patch::Apply(s))
            .await
            .map_err(|source| ApplyError::Apply {
                kind: "Service",
                namespace: namespace.into(),
                name: name.clone(),
                source,
            })?;
        let list = if observed.service.is_some() {
            &mut applied.updated
        } else {
            &mut applied.created
        };
        list.push(format!("Service {name}"));
    }
    if let Some(p) = todo.pdb {
        let name = p.name_any();
        let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
        metrics.write("poddisruptionbudget", "apply");
        api.patch(&name, &pp, &Patch::Apply(p))
            .await
            .map_err(|source| ApplyError::Apply {
                kind: "PodDisruptionBudget",
                namespace: namespace.into(),
                name: name.clone(),
                source,
            })?;
        let list = if observed.pdb.is_some() {
            &mut applied.updated
        } else {
            &mut applied.created
        };
        list.push(format!("PodDisruptionBudget {name}"));
    }
    for name in todo.delete_deployments {
        let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        metrics.write("deployment", "delete");
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(ApplyError::Delete {
                    kind: "Deployment",
                    namespace: namespace.into(),
                    name,
                    source,
                });
            }
        }
        info!(%namespace, deployment = %name, "pruned the Deployment of a variant no longer planned");
        applied.deleted.push(format!("Deployment {name}"));
    }
    if let Some(name) = todo.delete_pdb {
        let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
        metrics.write("poddisruptionbudget", "delete");
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(ApplyError::Delete {
                    kind: "PodDisruptionBudget",
                    namespace: namespace.into(),
                    name,
                    source,
                });
            }
        }
        applied.deleted.push(format!("PodDisruptionBudget {name}"));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::build;
    use crate::config::PriceTable;
    use crate::fixtures::{md, plan as plan_of};
    use crate::observe::{DeploymentState, ObjectState};
    use crate::validate::validate;

    fn desired(replicas: &[(&str, i32)]) -> Desired {
        let mut m = md("minilm");
        m.spec.variants.push(crate::fixtures::variant(
            "q8",
            kestrel_crds::v1alpha1::Precision::Q8_0,
        ));
        let v = validate(&m, Some("w:1"), &PriceTable::default()).unwrap();
        build(&v, &plan_of(replicas))
    }

    /// What the cluster would hold after applying `d`.
    fn as_observed(d: &Desired) -> Observed {
        Observed {
            deployments: d
                .deployments
                .iter()
                .map(|(v, dep)| {
                    let n = dep.spec.as_ref().unwrap().replicas.unwrap();
                    (
                        v.clone(),
                        DeploymentState {
                            name: dep.name_any(),
                            applied_hash: applied_hash(dep).cloned(),
                            spec_replicas: n,
                            replicas: n,
                            ready_replicas: n,
                            updated_replicas: n,
                        },
                    )
                })
                .collect(),
            service: Some(ObjectState {
                name: "minilm".into(),
                applied_hash: applied_hash(&d.service).cloned(),
            }),
            pdb: d.pdb.as_ref().map(|p| ObjectState {
                name: "minilm".into(),
                applied_hash: applied_hash(p).cloned(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_idle_resync_writes_nothing() {
        let d = desired(&[("f32", 2)]);
        assert_eq!(plan(&d, &as_observed(&d)), ApplyPlan::default());
    }

    #[test]
    fn a_fresh_model_deployment_creates_everything() {
        let d = desired(&[("f32", 2)]);
        let p = plan(&d, &Observed::default());
        assert_eq!(p.deployments.len(), 1);
        assert!(p.service.is_some() && p.pdb.is_some());
    }

    #[test]
    fn replicas_changed_by_someone_else_are_put_back() {
        let d = desired(&[("f32", 2)]);
        let mut o = as_observed(&d);
        o.deployments.get_mut("f32").unwrap().spec_replicas = 7;
        assert_eq!(plan(&d, &o).deployments.len(), 1);
    }

    #[test]
    fn a_variant_no_longer_planned_is_pruned_and_a_lone_replica_loses_its_pdb() {
        let before = desired(&[("f32", 2), ("q8", 2)]);
        let after = desired(&[("q8", 1)]);
        let p = plan(&after, &as_observed(&before));
        assert_eq!(p.delete_deployments, vec!["minilm-f32".to_owned()]);
        assert_eq!(p.delete_pdb.as_deref(), Some("minilm"));
        assert_eq!(p.deployments.len(), 1, "q8 goes from 2 to 1");
    }
}
