//! build: the objects that should exist, from the valid spec and the plan. Pure.
//!
//! One Deployment per variant in the plan, one Service over all of them, a
//! PodDisruptionBudget when more than one replica is wanted. Every object carries the
//! same labels, an owner reference to the ModelDeployment, and a hash of its own
//! content so that apply can skip objects that already match (an idle resync writes
//! nothing).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, HostPathVolumeSource,
    Lifecycle, LifecycleHandler, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, PreferredSchedulingTerm, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kestrel_crds::contract::{self, env, pod_labels};
use serde::Serialize;

use crate::decide::Plan;
use crate::validate::{Accelerator, ValidDeployment, ValidVariant, WeightSource};

/// Annotation holding the hash of what the operator last applied to an object.
pub const APPLIED_HASH: &str = "kestrel.dev/applied-hash";
/// Where the model folder is mounted in worker containers.
pub const MODEL_MOUNT: &str = "/models/model";
/// Seconds the pod waits in preStop before SIGTERM, so endpoint removal propagates.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Grace after SIGTERM for the worker to finish what it holds.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
const GPU_RESOURCE: &str = "nvidia.com/gpu";
const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
const FIELD_MANAGER_NAME: &str = "kestrel-operator";

/// Everything that should exist for one ModelDeployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Worker Deployments by variant.
    pub deployments: BTreeMap<String, Deployment>,
    pub service: Service,
    pub pdb: Option<PodDisruptionBudget>,
}

pub fn build(md: &ValidDeployment, plan: &Plan) -> Desired {
    let deployments = plan
        .replicas
        .iter()
        // A variant planned at 0 that is not the target is done: its Deployment is pruned.
        .filter(|(name, replicas)| **replicas > 0 || **name == plan.target_variant)
        .filter_map(|(name, replicas)| {
            let variant = md.variant(name)?;
            Some((name.clone(), with_hash(deployment(md, variant, *replicas))))
        })
        .collect();
    Desired {
        deployments,
        service: with_hash(service(md)),
        pdb: (plan.total() > 1).then(|| with_hash(pdb(md))),
    }
}

/// Name of the Deployment of one variant.
pub fn deployment_name(md: &str, variant: &str) -> String {
    format!("{md}-{variant}")
}

/// Labels selecting every worker pod of a ModelDeployment.
pub fn selector_labels(md: &ValidDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(pod_labels::MODEL_DEPLOYMENT.to_owned(), md.name.clone())])
}

/// The label selector string of every worker pod (status.selector, for `kubectl scale`).
pub fn selector_string(md: &ValidDeployment) -> String {
    format!("{}={}", pod_labels::MODEL_DEPLOYMENT, md.name)
}

fn labels(md: &ValidDeployment, variant: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "kestrel-worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), md.name.clone()),
        (
            "app.kubernetes.io/component".to_owned(),
            "inference".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER_NAME.to_owned(),
        ),
        (pod_labels::MODEL_DEPLOYMENT.to_owned(), md.name.clone()),
    ]);
    if let Some(v) = variant {
        l.insert(pod_labels::VARIANT.to_owned(), v.to_owned());
    }
    l
}

fn meta(md: &ValidDeployment, name: String, variant: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(md.namespace.clone()),
        labels: Some(labels(md, variant)),
        owner_references: Some(vec![OwnerReference {
            api_version: "kestrel.dev/v1alpha1".into(),
            kind: "ModelDeployment".into(),
            name: md.name.clone(),
            uid: md.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..Default::default()
    }
}

fn deployment(md: &ValidDeployment, variant: &ValidVariant, replicas: i32) -> Deployment {
    let mut selector = selector_labels(md);
    selector.insert(pod_labels::VARIANT.into(), variant.name.clone());
    Deployment {
        metadata: meta(
            md,
            deployment_name(&md.name, &variant.name),
            Some(&variant.name),
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // Surge first: a replaced pod leaves only once its successor is Ready.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(md, Some(&variant.name))),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ("prometheus.io/port".to_owned(), md.worker.port.to_string()),
                        (
                            "prometheus.io/path".to_owned(),
                            contract::METRICS_PATH.to_owned(),
                        ),
                    ])),
                    ..Default::default()
                }),
                spec: Some(pod_spec(md, variant)),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn pod_spec(md: &ValidDeployment, variant: &ValidVariant) -> PodSpec {
    let placement = &md.placement;
    let mut tolerations = placement.tolerations.clone();
    if variant.accelerator.is_gpu() {
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    let (volume, mount_sub_path) = model_volume(&md.source);
    PodSpec {
        containers: vec![worker_container(md, variant, mount_sub_path)],
        volumes: Some(vec![
            volume,
            Volume {
                name: "tmp".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            },
        ]),
        node_selector: (!placement.node_selector.is_empty())
            .then(|| placement.node_selector.clone()),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity: affinity(placement.affinity.clone(), &variant.accelerator),
        priority_class_name: placement.priority_class_name.clone(),
        runtime_class_name: placement.runtime_class_name.clone(),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn model_volume(source: &WeightSource) -> (Volume, Option<String>) {
    match source {
        WeightSource::Pvc {
            claim_name,
            sub_path,
        } => (
            Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Default::default()
            },
            sub_path.clone(),
        ),
        WeightSource::HostPath { path } => (
            Volume {
                name: "model".into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.clone(),
                    type_: Some("Directory".into()),
                }),
                ..Default::default()
            },
            None,
        ),
    }
}

fn worker_container(
    md: &ValidDeployment,
    variant: &ValidVariant,
    model_sub_path: Option<String>,
) -> Container {
    let w = &md.worker;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--model".into(),
        MODEL_MOUNT.into(),
        "--variant".into(),
        variant.precision.as_str().into(),
        "--port".into(),
        w.port.to_string(),
        "--max-queue".into(),
        w.max_queue.to_string(),
        "--max-batch".into(),
        w.max_batch_size.to_string(),
    ];
    if variant.accelerator.is_gpu() {
        args.extend(["--device".into(), "cuda:0".into()]);
    }
    args.extend(w.args.iter().cloned());

    let mut env_vars = vec![
        EnvVar {
            name: env::VARIANT.into(),
            value: Some(variant.name.clone()),
            ..Default::default()
        },
        EnvVar {
            name: "KESTREL_MODEL_NAME".into(),
            value: Some(md.model_name.clone()),
            ..Default::default()
        },
    ];
    if variant.accelerator.is_gpu() {
        // The CUDA driver compiles the worker's kernels on first use (~0.7 s measured on an
        // H100) and caches them under $HOME, which the read-only root filesystem refuses:
        // on the pod's writable /tmp, a restarted container finds them compiled.
        env_vars.push(EnvVar {
            name: "CUDA_CACHE_PATH".into(),
            value: Some("/tmp/cuda-cache".into()),
            ..Default::default()
        });
    }
    env_vars.extend(w.env.iter().cloned());

    let port_name = contract::WORKER_PORT_NAME;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port_name.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    };

    Container {
        name: "worker".into(),
        image: Some(w.image.clone()),
        image_pull_policy: w.pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(args),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some(port_name.into()),
            container_port: w.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe(contract::READY_PATH, 2, 2)),
        liveness_probe: Some(probe(contract::HEALTH_PATH, 10, 3)),
        // Loading weights takes a while; liveness starts counting once the process answers.
        startup_probe: Some(probe(contract::HEALTH_PATH, 2, 60)),
        resources: Some(resources(w.resources.clone(), &variant.accelerator)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "model".into(),
                mount_path: MODEL_MOUNT.into(),
                read_only: Some(true),
                sub_path: model_sub_path,
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The spec's resources plus the variant's GPUs (whole GPUs, or a MIG slice).
fn resources(
    base: Option<ResourceRequirements>,
    accelerator: &Accelerator,
) -> ResourceRequirements {
    let mut r = base.unwrap_or_default();
    if let Accelerator::Nvidia {
        count, mig_profile, ..
    } = accelerator
    {
        let name = match mig_profile {
            Some(profile) => format!("nvidia.com/mig-{profile}"),
            None => GPU_RESOURCE.to_owned(),
        };
        let q = Quantity(count.to_string());
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(name.clone(), q.clone());
        r.requests.get_or_insert_with(BTreeMap::new).insert(name, q);
    }
    r
}

/// The spec's affinity, plus, for a GPU variant with products: a required term allowing
/// only those products and preferred terms weighted by their order.
fn affinity(base: Option<Affinity>, accelerator: &Accelerator) -> Option<Affinity> {
    let products = match accelerator {
        Accelerator::Nvidia { products, .. } if !products.is_empty() => products,
        _ => return base,
    };
    let mut affinity = base.unwrap_or_default();
    let node = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let allowed = NodeSelectorRequirement {
        key: GPU_PRODUCT_LABEL.into(),
        operator: "In".into(),
        values: Some(products.clone()),
    };
    let required = node
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
    // Terms are ORed: the product rule must hold in each of them.
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(allowed.clone());
    }
    let preferred = node
        .preferred_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new);
    for (i, product) in products.iter().enumerate() {
        preferred.push(PreferredSchedulingTerm {
            weight: (100 - 10 * i as i32).max(1),
            preference: NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: GPU_PRODUCT_LABEL.into(),
                    operator: "In".into(),
                    values: Some(vec![product.clone()]),
                }]),
                ..Default::default()
            },
        });
    }
    Some(affinity)
}

fn service(md: &ValidDeployment) -> Service {
    Service {
        metadata: meta(md, md.name.clone(), None),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(md)),
            ports: Some(vec![ServicePort {
                name: Some(contract::WORKER_PORT_NAME.into()),
                port: md.worker.port,
                target_port: Some(IntOrString::String(contract::WORKER_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn pdb(md: &ValidDeployment) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(md, md.name.clone(), None),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Stamps an object with the hash of its content (stable FNV-1a over its JSON).
fn with_hash<K: Serialize + kube::Resource>(mut obj: K) -> K {
    let hash = content_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH.into(), hash);
    obj
}

pub fn content_hash<T: Serialize>(obj: &T) -> String {
    let bytes = serde_json::to_vec(obj).expect("Kubernetes objects serialize");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The applied-hash annotation of a built object.
pub fn applied_hash<K: kube::Resource>(obj: &K) -> Option<&String> {
    obj.meta().annotations.as_ref()?.get(APPLIED_HASH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PriceTable;
    use crate::fixtures::{gpu_variant, md, plan};
    use crate::validate::validate;
    use kestrel_crds::v1alpha1::{PlacementSpec, Precision};

    fn valid(m: &kestrel_crds::ModelDeployment) -> ValidDeployment {
        validate(m, Some("kestrel-worker:dev"), &PriceTable::default()).unwrap()
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn one_deployment_per_planned_variant_named_after_the_model_deployment() {
        let mut m = md("minilm");
        m.spec
            .variants
            .push(crate::fixtures::variant("q8", Precision::Q8_0));
        let d = build(&valid(&m), &plan(&[("f32", 2), ("q8", 1)]));
        let names: Vec<_> = d
            .deployments
            .values()
            .map(|d| d.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["minilm-f32", "minilm-q8"]);
        assert_eq!(
            d.deployments["f32"].spec.as_ref().unwrap().replicas,
            Some(2)
        );
        let labels = d.deployments["q8"].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kestrel.dev/variant"], "q8");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "kestrel-operator");
    }

    #[test]
    fn an_old_variant_planned_at_zero_loses_its_deployment_but_the_target_keeps_one() {
        let mut m = md("minilm");
        m.spec
            .variants
            .push(crate::fixtures::variant("q8", Precision::Q8_0));
        let mut p = plan(&[("q8", 2), ("f32", 0)]);
        p.target_variant = "q8".into();
        let d = build(&valid(&m), &p);
        assert_eq!(d.deployments.keys().collect::<Vec<_>>(), vec!["q8"]);
        let mut p = plan(&[("f32", 0)]);
        p.target_variant = "f32".into();
        assert_eq!(
            build(&valid(&m), &p).deployments.len(),
            1,
            "scaled to zero, not deleted"
        );
    }

    #[test]
    fn every_object_is_owned_by_the_model_deployment_as_controller() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 2)]));
        let owners = [
            d.deployments["f32"].metadata.owner_references.clone(),
            d.service.metadata.owner_references.clone(),
            d.pdb.as_ref().unwrap().metadata.owner_references.clone(),
        ];
        for o in owners {
            let o = &o.unwrap()[0];
            assert_eq!(
                (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
                ("ModelDeployment", "minilm", "uid-1")
            );
            assert_eq!(o.controller, Some(true));
        }
    }

    #[test]
    fn the_service_selects_all_variants_and_targets_the_named_port() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 1)]));
        let spec = d.service.spec.unwrap();
        assert_eq!(
            spec.selector.unwrap(),
            BTreeMap::from([("kestrel.dev/model-deployment".into(), "minilm".into())])
        );
        assert_eq!(
            spec.ports.unwrap()[0].target_port,
            Some(IntOrString::String("http".into()))
        );
    }

    #[test]
    fn a_pdb_exists_only_with_more_than_one_replica() {
        let v = valid(&md("minilm"));
        assert!(build(&v, &plan(&[("f32", 1)])).pdb.is_none());
        let pdb = build(&v, &plan(&[("f32", 2)])).pdb.unwrap();
        assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn worker_args_carry_the_variant_precision_queue_and_batch() {
        let mut m = md("minilm");
        m.spec.worker.max_queue = 64;
        m.spec.worker.args = vec!["--max-batch-wait-ms".into(), "3".into()];
        let d = build(&valid(&m), &plan(&[("f32", 1)]));
        let c = &pod(&d.deployments["f32"]).containers[0];
        assert_eq!(
            c.args.clone().unwrap().join(" "),
            "serve --model /models/model --variant f32 --port 8080 --max-queue 64 --max-batch 32 --max-batch-wait-ms 3"
        );
        assert_eq!(c.image.as_deref(), Some("kestrel-worker:dev"));
    }

    #[test]
    fn worker_pods_are_restricted() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 1)]));
        let p = pod(&d.deployments["f32"]);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let sc = p.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
    }

    #[test]
    fn probes_hit_ready_and_health_and_prestop_outlasts_endpoint_removal() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 1)]));
        let c = &pod(&d.deployments["f32"]).containers[0];
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        };
        assert_eq!(path(&c.readiness_probe), "/ready");
        assert_eq!(path(&c.liveness_probe), "/health");
        let sleep = c
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .as_ref()
            .unwrap();
        assert!(
            sleep.seconds
                < pod(&d.deployments["f32"])
                    .termination_grace_period_seconds
                    .unwrap()
        );
    }

    #[test]
    fn the_model_is_mounted_read_only() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 1)]));
        let p = pod(&d.deployments["f32"]);
        let mount = &p.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/models/model", Some(true))
        );
        let vol = &p.volumes.as_ref().unwrap()[0];
        assert_eq!(
            vol.host_path.as_ref().unwrap().path,
            "/var/lib/models/minilm"
        );
    }

    #[test]
    fn a_gpu_variant_requests_gpus_tolerates_the_taint_and_prefers_products_in_order() {
        let mut m = md("llm");
        m.spec.variants = vec![gpu_variant(
            "h",
            Precision::F16,
            2,
            &["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"],
        )];
        let d = build(&valid(&m), &plan(&[("h", 1)]));
        let p = pod(&d.deployments["h"]);
        let c = &p.containers[0];
        let res = c.resources.as_ref().unwrap();
        assert_eq!(
            res.limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("2".into())
        );
        assert_eq!(
            res.requests.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("2".into())
        );
        assert!(
            c.args
                .as_ref()
                .unwrap()
                .join(" ")
                .ends_with("--device cuda:0")
        );
        let env = c.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "CUDA_CACHE_PATH"
                    && e.value.as_deref() == Some("/tmp/cuda-cache")),
            "the kernel cache is on the writable /tmp: {env:?}"
        );
        let tol = &p.tolerations.as_ref().unwrap()[0];
        assert_eq!(
            (tol.key.as_deref(), tol.effect.as_deref()),
            (Some("nvidia.com/gpu"), Some("NoSchedule"))
        );
        let na = p.affinity.as_ref().unwrap().node_affinity.as_ref().unwrap();
        let req = &na
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            req.match_expressions.as_ref().unwrap()[0]
                .values
                .clone()
                .unwrap(),
            vec!["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]
        );
        let pref = na
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap();
        let weights: Vec<_> = pref
            .iter()
            .map(|p| {
                (
                    p.weight,
                    p.preference.match_expressions.as_ref().unwrap()[0]
                        .values
                        .clone()
                        .unwrap()[0]
                        .clone(),
                )
            })
            .collect();
        assert_eq!(
            weights,
            vec![
                (100, "NVIDIA-H100-80GB-HBM3".to_owned()),
                (90, "NVIDIA-A100-SXM4-80GB".to_owned())
            ]
        );
    }

    #[test]
    fn a_mig_profile_requests_the_mig_resource_instead_of_whole_gpus() {
        let mut m = md("llm");
        let mut v = gpu_variant("mig", Precision::F16, 1, &[]);
        v.accelerator.mig_profile = Some("1g.10gb".into());
        m.spec.variants = vec![v];
        let d = build(&valid(&m), &plan(&[("mig", 1)]));
        let res = pod(&d.deployments["mig"]).containers[0]
            .resources
            .clone()
            .unwrap();
        let limits = res.limits.unwrap();
        assert!(limits.contains_key("nvidia.com/mig-1g.10gb"));
        assert!(!limits.contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn placement_sets_runtime_and_priority_class_and_keeps_its_tolerations_beside_the_gpu_one() {
        let mut m = md("llm");
        m.spec.variants = vec![gpu_variant("h", Precision::F16, 1, &["NVIDIA-L4"])];
        m.spec.placement = Some(PlacementSpec {
            runtime_class_name: Some("nvidia".into()),
            priority_class_name: Some("inference-high".into()),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("ml".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let d = build(&valid(&m), &plan(&[("h", 1)]));
        let p = pod(&d.deployments["h"]);
        assert_eq!(p.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(p.priority_class_name.as_deref(), Some("inference-high"));
        let keys: Vec<_> = p
            .tolerations
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| t.key.clone().unwrap())
            .collect();
        assert_eq!(keys, vec!["dedicated", "nvidia.com/gpu"]);
    }

    #[test]
    fn cpu_variants_get_no_gpu_affinity_or_toleration() {
        let d = build(&valid(&md("minilm")), &plan(&[("f32", 1)]));
        let p = pod(&d.deployments["f32"]);
        assert!(p.tolerations.is_none());
        assert!(p.affinity.is_none());
    }

    #[test]
    fn the_hash_changes_with_content_and_only_with_content() {
        let v = valid(&md("minilm"));
        let a = build(&v, &plan(&[("f32", 1)]));
        let b = build(&v, &plan(&[("f32", 1)]));
        let c = build(&v, &plan(&[("f32", 2)]));
        let h = |d: &Desired| applied_hash(&d.deployments["f32"]).cloned();
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
    }
}
