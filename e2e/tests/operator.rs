//! The operator against a real API server, scheduler and kubelet: admission, owned
//! objects and garbage collection, `kubectl scale`, truthful status for pods that cannot
//! be scheduled or pulled, and `kubectl get` columns.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kestrel_crds::ModelDeployment;
use kestrel_e2e::{TestNamespace, condition, wait_for};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};

const MINUTE: Duration = Duration::from_secs(60);

/// A valid embeddings ModelDeployment; `extra` is spliced into `spec`.
fn md_yaml(name: &str, variants: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model: {{name: all-MiniLM-L6-v2, task: embeddings, source: {{hostPath: {{path: /tmp}}}}}}
  variants: {variants}
  slo: {{p95LatencyMs: 200}}
  worker: {{image: "kestrel-absent:none", imagePullPolicy: Never}}
{extra}
"#
    )
}

const F32: &str = "[{name: f32, precision: f32}]";

#[tokio::test]
async fn a_bad_spec_is_refused_at_admission_with_a_message_naming_the_field() {
    let ns = TestNamespace::new("admission").await.unwrap();
    let cases: &[(&str, String, &str)] = &[
        (
            "min above max",
            md_yaml("bad", F32, "  scaling: {minReplicas: 5, maxReplicas: 2}"),
            "spec.scaling.minReplicas must be less than or equal to spec.scaling.maxReplicas",
        ),
        ("no variants", md_yaml("bad", "[]", ""), "spec.variants"),
        (
            "duplicate variant names",
            md_yaml(
                "bad",
                "[{name: a, precision: f32}, {name: a, precision: f16}]",
                "",
            ),
            "variant names must be unique",
        ),
        (
            "quality loss above 1",
            md_yaml("bad", "[{name: a, precision: f32, qualityLoss: 1.5}]", ""),
            "spec.variants[0].qualityLoss",
        ),
        (
            "zero latency target",
            md_yaml("bad", F32, "").replace("p95LatencyMs: 200", "p95LatencyMs: 0"),
            "spec.slo.p95LatencyMs",
        ),
        (
            "unknown precision",
            md_yaml("bad", "[{name: a, precision: int3}]", ""),
            "spec.variants[0].precision",
        ),
        (
            "two weight sources",
            md_yaml("bad", F32, "").replace(
                "source: {hostPath:",
                "source: {persistentVolumeClaim: {claimName: w}, hostPath:",
            ),
            "set exactly one of persistentVolumeClaim or hostPath",
        ),
        (
            "gpu fields on a cpu variant",
            md_yaml(
                "bad",
                "[{name: a, precision: f32, accelerator: {kind: cpu, count: 2}}]",
                "",
            ),
            "apply only to kind nvidia",
        ),
        (
            "budget quality loss below 0",
            md_yaml("bad", F32, "  budget: {maxQualityLoss: -0.1}"),
            "spec.budget.maxQualityLoss",
        ),
        (
            "bad price",
            md_yaml(
                "bad",
                "[{name: a, precision: f32, pricePerHour: \"cheap\"}]",
                "",
            ),
            "spec.variants[0].pricePerHour",
        ),
    ];
    for (what, yaml, field) in cases {
        let file = std::env::temp_dir().join(format!("{}-bad.yaml", ns.name));
        std::fs::write(&file, yaml).unwrap();
        let out = tokio::process::Command::new(kestrel_e2e::kubectl_bin())
            .args(["apply", "-n", &ns.name, "-f"])
            .arg(&file)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: kubectl apply should have been refused"
        );
        assert!(
            stderr.contains(field),
            "{what}: the refusal should name {field:?}; got: {stderr}"
        );
    }
    let api: Api<ModelDeployment> = ns.api();
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing was stored"
    );
}

#[tokio::test]
async fn a_valid_spec_creates_owned_objects_that_are_garbage_collected_with_it() {
    let mut ns = TestNamespace::new("owned").await.unwrap();
    ns.start_operator(&[]).unwrap();
    ns.apply_yaml(&md_yaml(
        "minilm",
        F32,
        "  scaling: {enabled: false}\n  replicas: 2",
    ))
    .await
    .unwrap();

    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    let pdbs: Api<PodDisruptionBudget> = ns.api();
    wait_for("Deployment, Service and PDB", MINUTE, || async {
        Ok(deployments.get_opt("minilm-f32").await?.is_some()
            && services.get_opt("minilm").await?.is_some()
            && pdbs.get_opt("minilm").await?.is_some())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ns.operator_log()));

    let d = deployments.get("minilm-f32").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ModelDeployment", "minilm", Some(true))
    );
    assert_eq!(d.labels()["kestrel.dev/variant"], "f32");
    let managers: Vec<_> = d
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"kestrel-operator".to_owned()),
        "server-side applied by kestrel-operator: {managers:?}"
    );

    let mds: Api<ModelDeployment> = ns.api();
    mds.delete("minilm", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for(
        "garbage collection of the owned objects",
        MINUTE,
        || async {
            Ok(deployments.get_opt("minilm-f32").await?.is_none()
                && services.get_opt("minilm").await?.is_none()
                && pdbs.get_opt("minilm").await?.is_none())
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn kubectl_scale_changes_replicas_when_scaling_is_disabled() {
    let mut ns = TestNamespace::new("scale").await.unwrap();
    ns.start_operator(&[]).unwrap();
    ns.apply_yaml(&md_yaml(
        "minilm",
        F32,
        "  scaling: {enabled: false}\n  replicas: 1",
    ))
    .await
    .unwrap();
    ns.wait_md("minilm", "the first status", MINUTE, |md| {
        md.status.as_ref().is_some_and(|s| s.desired_replicas == 1)
    })
    .await
    .unwrap();
    ns.kubectl(&[
        "scale",
        "-n",
        &ns.name,
        "modeldeployment/minilm",
        "--replicas=3",
    ])
    .await
    .unwrap();
    let deployments: Api<Deployment> = ns.api();
    wait_for("the Deployment to follow kubectl scale", MINUTE, || async {
        Ok(deployments
            .get("minilm-f32")
            .await?
            .spec
            .and_then(|s| s.replicas)
            == Some(3))
    })
    .await
    .unwrap();
    let md = ns
        .wait_md("minilm", "desiredReplicas 3", MINUTE, |md| {
            md.status.as_ref().is_some_and(|s| s.desired_replicas == 3)
        })
        .await
        .unwrap();
    let status = md.status.unwrap();
    assert_eq!(
        status.selector.as_deref(),
        Some("kestrel.dev/model-deployment=minilm")
    );
    let scale = ns
        .kubectl(&[
            "get",
            "-n",
            &ns.name,
            "--raw",
            &format!(
                "/apis/kestrel.dev/v1alpha1/namespaces/{}/modeldeployments/minilm/scale",
                ns.name
            ),
        ])
        .await
        .unwrap();
    assert!(
        scale.contains("\"replicas\":3"),
        "scale subresource reports 3: {scale}"
    );
}

#[tokio::test]
async fn more_gpus_than_the_node_has_shows_ready_false_with_the_schedulers_reason() {
    let mut ns = TestNamespace::new("gpu-unsched").await.unwrap();
    ns.start_operator(&[]).unwrap();
    let variants = "[{name: big, precision: f16, accelerator: {kind: nvidia, count: 6, products: [NVIDIA-H100-80GB-HBM3]}}]";
    ns.apply_yaml(&md_yaml(
        "llm",
        variants,
        "  scaling: {enabled: false}\n  replicas: 1",
    ))
    .await
    .unwrap();
    let md = ns
        .wait_md("llm", "Ready=False Unschedulable", 2 * MINUTE, |md| {
            condition(md, "Ready")
                .is_some_and(|c| c.status == "False" && c.reason == "Unschedulable")
        })
        .await
        .unwrap();
    let ready = condition(&md, "Ready").unwrap();
    assert!(
        ready.message.contains("nvidia.com/gpu"),
        "the scheduler's reason names the resource: {}",
        ready.message
    );
    assert!(
        ready.message.contains("0/1 replicas ready"),
        "{}",
        ready.message
    );
    // The scheduler's own counts ("0/3 nodes are available: …"), passed through.
    assert!(
        ready.message.contains("nodes are available") && ready.message.contains("0/"),
        "the scheduler's node counts: {}",
        ready.message
    );
    let degraded = condition(&md, "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "Unschedulable")
    );
    let events = ns.events().await.unwrap();
    assert!(
        events.contains("Warning llm Unschedulable"),
        "a Warning Event says so:\n{events}"
    );
}

#[tokio::test]
async fn a_gpu_variant_lands_on_a_node_of_an_acceptable_product() {
    let mut ns = TestNamespace::new("gpu-sched").await.unwrap();
    ns.start_operator(&[]).unwrap();
    let variants = "[{name: h100, precision: f16, accelerator: {kind: nvidia, count: 1, products: [NVIDIA-B200, NVIDIA-H100-80GB-HBM3]}}]";
    ns.apply_yaml(&md_yaml(
        "llm",
        variants,
        "  scaling: {enabled: false}\n  replicas: 1",
    ))
    .await
    .unwrap();
    let pods: Api<Pod> = ns.api();
    wait_for("the GPU pod to be scheduled", 2 * MINUTE, || async {
        Ok(pods
            .list(&ListParams::default().labels("kestrel.dev/model-deployment=llm"))
            .await?
            .items
            .iter()
            .any(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()))
    })
    .await
    .unwrap();
    let pod = pods
        .list(&ListParams::default().labels("kestrel.dev/model-deployment=llm"))
        .await
        .unwrap()
        .items
        .remove(0);
    let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ns.client.clone());
    let product = nodes
        .get(&node)
        .await
        .unwrap()
        .labels()
        .get("nvidia.com/gpu.product")
        .cloned();
    assert!(
        matches!(
            product.as_deref(),
            Some("NVIDIA-B200" | "NVIDIA-H100-80GB-HBM3")
        ),
        "pod landed on {node} with product {product:?}"
    );
    let limits = pod.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
}

/// Creates a cluster-scoped object unless it exists (tests running at once share it).
async fn ensure<K>(api: &Api<K>, object: serde_json::Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(object).unwrap();
    match api.create(&kube::api::PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("failed to create {object:?}: {e}"),
    }
}

/// The node a ModelDeployment's first scheduled pod is on, and that pod.
async fn scheduled_pod(ns: &TestNamespace, md: &str) -> (String, Pod) {
    let pods: Api<Pod> = ns.api();
    let params = ListParams::default().labels(&format!("kestrel.dev/model-deployment={md}"));
    let scheduled = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    wait_for(
        &format!("a pod of {md} to be scheduled"),
        2 * MINUTE,
        || async { Ok(pods.list(&params).await?.items.iter().any(scheduled)) },
    )
    .await
    .unwrap();
    let pod = pods
        .list(&params)
        .await
        .unwrap()
        .items
        .into_iter()
        .find(scheduled)
        .unwrap();
    (pod.spec.as_ref().unwrap().node_name.clone().unwrap(), pod)
}

#[tokio::test]
async fn gpu_pods_prefer_the_first_acceptable_product_with_the_runtime_and_priority_class() {
    use k8s_openapi::api::node::v1::RuntimeClass;
    use k8s_openapi::api::scheduling::v1::PriorityClass;
    // kwok's status-only GPU nodes (kestrel-sim-l4: NVIDIA-L4, kestrel-sim-a100:
    // NVIDIA-A100-SXM4-40GB) are tainted; these variants tolerate the taint, so each
    // could land on either, and the product order alone decides. One namespace (and
    // operator) per case.
    let placement = "  placement:\n    tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]\n    runtimeClassName: kestrel-e2e-gpu\n    priorityClassName: kestrel-e2e-gpu\n";
    let cases = [
        (
            "l4-first",
            "[NVIDIA-L4, NVIDIA-A100-SXM4-40GB]",
            "NVIDIA-L4",
        ),
        (
            "a100-first",
            "[NVIDIA-A100-SXM4-40GB, NVIDIA-L4]",
            "NVIDIA-A100-SXM4-40GB",
        ),
    ];
    for (name, products, want) in cases {
        let mut ns = TestNamespace::new(&format!("gpu-{name}")).await.unwrap();
        let labels = serde_json::json!({"kestrel.dev/e2e": "true"});
        ensure::<RuntimeClass>(
            &Api::all(ns.client.clone()),
            serde_json::json!({"metadata": {"name": "kestrel-e2e-gpu", "labels": labels}, "handler": "runc"}),
        )
        .await;
        ensure::<PriorityClass>(
            &Api::all(ns.client.clone()),
            serde_json::json!({"metadata": {"name": "kestrel-e2e-gpu", "labels": labels}, "value": 1000}),
        )
        .await;
        ns.start_operator(&[]).unwrap();
        let variants = format!(
            "[{{name: gpu, precision: f16, accelerator: {{kind: nvidia, count: 1, products: {products}}}}}]"
        );
        ns.apply_yaml(&md_yaml(
            name,
            &variants,
            &format!("  scaling: {{enabled: false}}\n  replicas: 1\n{placement}"),
        ))
        .await
        .unwrap();
        let (node, pod) = scheduled_pod(&ns, name).await;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ns.client.clone());
        let product = nodes.get(&node).await.unwrap().labels()["nvidia.com/gpu.product"].clone();
        assert_eq!(product, want, "{name}: the pod landed on {node}");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.runtime_class_name.as_deref(), Some("kestrel-e2e-gpu"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("kestrel-e2e-gpu"));
        assert_eq!(
            spec.priority,
            Some(1000),
            "admission resolved the PriorityClass"
        );
        let args = spec.containers[0].args.clone().unwrap().join(" ");
        assert!(args.contains("--device cuda:0"), "{args}");
    }
}

#[tokio::test]
async fn an_image_that_is_not_present_shows_ready_false_with_the_kubelets_reason() {
    let mut ns = TestNamespace::new("noimage").await.unwrap();
    ns.start_operator(&[]).unwrap();
    ns.apply_yaml(&md_yaml(
        "minilm",
        F32,
        "  scaling: {enabled: false}\n  replicas: 1",
    ))
    .await
    .unwrap();
    let md = ns
        .wait_md("minilm", "Ready=False ImageUnavailable", 2 * MINUTE, |md| {
            condition(md, "Ready").is_some_and(|c| c.reason == "ImageUnavailable")
        })
        .await
        .unwrap();
    let msg = &condition(&md, "Ready").unwrap().message;
    assert!(
        msg.contains("kestrel-absent:none"),
        "names the image: {msg}"
    );
}

#[tokio::test]
async fn a_precision_the_task_cannot_serve_is_reported_in_status_not_retried_hot() {
    let mut ns = TestNamespace::new("badprec").await.unwrap();
    ns.start_operator(&[]).unwrap();
    ns.apply_yaml(&md_yaml("minilm", "[{name: k4, precision: q4_k_m}]", ""))
        .await
        .unwrap();
    let md = ns
        .wait_md("minilm", "Ready=False InvalidSpec", MINUTE, |md| {
            condition(md, "Ready").is_some_and(|c| c.reason == "InvalidSpec")
        })
        .await
        .unwrap();
    let msg = &condition(&md, "Ready").unwrap().message;
    assert!(msg.contains("spec.variants[0].precision"), "{msg}");
    let deployments: Api<Deployment> = ns.api();
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing was created"
    );
    let events = ns.events().await.unwrap();
    assert!(events.contains("Warning minilm InvalidSpec"), "{events}");
}

/// Found in the field: with ModelDeployments and their objects already present when the
/// operator starts, reconciles that waited for the caches' first list were never woken
/// (one of two stayed unreconciled), and the stuck reconcile kept SIGTERM from stopping
/// the operator.
#[tokio::test]
async fn a_restarted_operator_reconciles_every_existing_model_deployment_and_stops_on_sigterm() {
    let mut ns = TestNamespace::new("restart").await.unwrap();
    let names = ["a", "b", "c", "d"];
    let apply = |max_replicas: u32| {
        names.map(|name| {
            md_yaml(
                name,
                F32,
                &format!(
                    "  scaling: {{enabled: false, maxReplicas: {max_replicas}}}\n  replicas: 0"
                ),
            )
        })
    };
    for yaml in apply(4) {
        ns.apply_yaml(&yaml).await.unwrap();
    }
    let mds: Api<ModelDeployment> = ns.api();
    let all_at = |generation: i64| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                Ok(mds
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .all(|md| {
                        md.status.as_ref().and_then(|s| s.observed_generation) == Some(generation)
                    }))
            }
        }
    };
    for (round, generation) in [(1, 1), (2, 2)] {
        if round == 2 {
            // Changed while no operator runs: the next one finds them and their objects.
            for yaml in apply(5) {
                ns.apply_yaml(&yaml).await.unwrap();
            }
        }
        ns.start_operator(&[]).unwrap();
        wait_for(
            "every ModelDeployment reconciled",
            MINUTE,
            all_at(generation),
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", ns.operator_log()));
        let status = ns
            .terminate_operator(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", ns.operator_log()));
        assert!(status.success(), "round {round}: exit status {status}");
    }
}
