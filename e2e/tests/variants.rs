//! A variant switch on the real cluster: lowering the budget moves the fleet to the
//! cheaper variant as a surge rollout, and a client running throughout loses nothing.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kestrel_crds::ModelDeployment;
use kestrel_e2e::load::{fixed_rate, run};
use kestrel_e2e::{TestNamespace, condition, model_dir, prometheus_url, wait_for, worker_image};
use kube::Api;
use kube::api::{Patch, PatchParams};

#[tokio::test]
async fn lowering_the_budget_switches_to_the_cheaper_variant_without_a_failed_request() {
    let mut ns = TestNamespace::new("switch").await.unwrap();
    ns.start_operator(&["--prometheus-url", &prometheus_url()])
        .unwrap();
    let yaml = format!(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: minilm}}
spec:
  model: {{name: all-MiniLM-L6-v2, task: embeddings, source: {{hostPath: {{path: "{}"}}}}}}
  variants:
  - {{name: f32, precision: f32, pricePerHour: "1.00"}}
  - {{name: q8, precision: q8_0, pricePerHour: "0.40", qualityLoss: 0.0007}}
  slo: {{p95LatencyMs: 500}}
  scaling: {{minReplicas: 2, maxReplicas: 2}}
  budget: {{maxQualityLoss: 0.0005}}
  worker: {{image: "{}", imagePullPolicy: IfNotPresent}}
"#,
        model_dir().unwrap(),
        worker_image()
    );
    ns.apply_yaml(&yaml).await.unwrap();
    let md = ns
        .wait_md(
            "minilm",
            "f32 Ready 2/2 with fresh metrics",
            Duration::from_secs(240),
            |md| {
                condition(md, "Ready").is_some_and(|c| c.status == "True")
                    && condition(md, "MetricsAvailable").is_some_and(|c| c.status == "True")
                    && md.status.as_ref().is_some_and(|s| s.ready_replicas == 2)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        md.status.unwrap().active_variant.as_deref(),
        Some("f32"),
        "q8 loses too much quality at first"
    );

    let url = ns.serving_url("minilm").await.unwrap();
    // A client well within capacity, running before, during and after the switch.
    let client = tokio::spawn(async move {
        run(
            &url,
            &fixed_rate(20.0, Duration::from_secs(75)),
            64,
            "The cat sits outside.",
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The platform team accepts q8's measured loss (0.0007, docs/worker.md) and halves
    // the budget: f32 (2 × 1.00/h) no longer fits 1.00/h, q8 (2 × 0.40/h) does.
    let mds: Api<ModelDeployment> = ns.api();
    let patch = serde_json::json!({"spec": {"budget": {"maxQualityLoss": 0.001, "maxCostPerHour": "1.00"}}});
    mds.patch("minilm", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    let deployments: Api<Deployment> = ns.api();
    let md = ns
        .wait_md(
            "minilm",
            "the fleet on q8, f32 gone",
            Duration::from_secs(180),
            |md| {
                md.status.as_ref().is_some_and(|s| {
                    s.active_variant.as_deref() == Some("q8")
                        && s.variants.iter().all(|v| v.name == "q8")
                        && s.ready_replicas == 2
                })
            },
        )
        .await
        .unwrap();
    wait_for(
        "the f32 Deployment to be pruned",
        Duration::from_secs(60),
        || async { Ok(deployments.get_opt("minilm-f32").await?.is_none()) },
    )
    .await
    .unwrap();
    let status = md.status.unwrap();
    assert_eq!(status.cost_per_hour.as_deref(), Some("0.80"));
    let events = ns.events().await.unwrap();
    assert!(
        events.contains("VariantSwitch"),
        "the switch is explained:\n{events}"
    );

    let report = client.await.unwrap();
    println!(
        "client during the switch: sent {} ok {} 429 {} failed {} p95 {:.0} ms",
        report.sent,
        report.ok,
        report.rejected,
        report.failed,
        report.quantile_ms(0.95)
    );
    assert!(
        report.sent > 1000,
        "the client ran throughout ({} requests)",
        report.sent
    );
    assert_eq!(
        report.failed, 0,
        "failed requests during the switch: {:?}",
        report.failures
    );
    assert_eq!(report.rejected, 0, "no backpressure at 20 req/s");
}
