//! Scaling down under load loses nothing: worker pods leave the Service's endpoints,
//! keep serving through their preStop delay, then drain what they hold.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kestrel_e2e::load::{fixed_rate, run};
use kestrel_e2e::{TestNamespace, condition, model_dir, wait_for, worker_image};
use kube::Api;

#[tokio::test]
async fn scaling_down_under_load_loses_no_request() {
    let mut ns = TestNamespace::new("drain").await.unwrap();
    ns.start_operator(&[]).unwrap();
    let yaml = format!(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: minilm}}
spec:
  model: {{name: all-MiniLM-L6-v2, task: embeddings, source: {{hostPath: {{path: "{}"}}}}}}
  variants: [{{name: f32, precision: f32}}]
  slo: {{p95LatencyMs: 500}}
  scaling: {{enabled: false}}
  replicas: 3
  worker: {{image: "{}", imagePullPolicy: IfNotPresent}}
"#,
        model_dir().unwrap(),
        worker_image()
    );
    ns.apply_yaml(&yaml).await.unwrap();
    ns.wait_md("minilm", "Ready 3/3", Duration::from_secs(240), |md| {
        condition(md, "Ready").is_some_and(|c| c.status == "True")
            && md.status.as_ref().is_some_and(|s| s.ready_replicas == 3)
    })
    .await
    .unwrap();

    let url = ns.serving_url("minilm").await.unwrap();
    let client = tokio::spawn(async move {
        run(
            &url,
            &fixed_rate(30.0, Duration::from_secs(40)),
            64,
            "A monkey is playing drums.",
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;

    ns.kubectl(&[
        "scale",
        "-n",
        &ns.name,
        "modeldeployment/minilm",
        "--replicas=1",
    ])
    .await
    .unwrap();
    let deployments: Api<Deployment> = ns.api();
    wait_for(
        "the Deployment to shrink to 1 ready replica",
        Duration::from_secs(120),
        || async {
            let s = deployments
                .get("minilm-f32")
                .await?
                .status
                .unwrap_or_default();
            Ok(s.replicas == Some(1) && s.ready_replicas == Some(1))
        },
    )
    .await
    .unwrap();

    let report = client.await.unwrap();
    println!(
        "client while scaling 3 → 1: sent {} ok {} 429 {} failed {} p95 {:.0} ms",
        report.sent,
        report.ok,
        report.rejected,
        report.failed,
        report.quantile_ms(0.95)
    );
    assert!(
        report.sent >= 1100,
        "the client ran throughout ({} requests)",
        report.sent
    );
    assert_eq!(
        report.failed, 0,
        "requests lost while pods terminated: {:?}",
        report.failures
    );
}
