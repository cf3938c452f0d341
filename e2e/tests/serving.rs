//! The real worker, run by the operator: a ModelDeployment becomes Ready, its Service
//! answers with the right embedding, and `kubectl get` shows the columns filled.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kestrel_e2e::{TestNamespace, condition, cosine, model_dir, reference_embedding, worker_image};
use kube::Api;

#[tokio::test]
async fn a_model_deployment_of_the_real_worker_becomes_ready_and_answers_through_its_service() {
    let mut ns = TestNamespace::new("serve").await.unwrap();
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
  replicas: 1
  worker: {{image: "{}", imagePullPolicy: IfNotPresent, maxQueue: 64}}
"#,
        model_dir().unwrap(),
        worker_image()
    );
    ns.apply_yaml(&yaml).await.unwrap();
    let md = ns
        .wait_md("minilm", "Ready=True", Duration::from_secs(180), |md| {
            condition(md, "Ready").is_some_and(|c| c.status == "True")
        })
        .await
        .unwrap();
    assert_eq!(md.status.as_ref().unwrap().ready.as_deref(), Some("1/1"));

    // `kubectl get` shows the columns a platform engineer reads.
    let table = ns
        .kubectl(&["get", "modeldeployments", "-n", &ns.name])
        .await
        .unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "READY", "VARIANT", "P95(MS)", "QUEUE", "COST/H", "AGE", "REASON",
    ] {
        assert!(header.contains(column), "column {column} in {header}");
    }
    let row = table.lines().nth(1).unwrap();
    for value in ["minilm", "1/1", "f32", "0.10", "AllReplicasReady"] {
        assert!(row.contains(value), "{value} in {row}");
    }

    // A request through the Service's ClusterIP returns the reference embedding.
    let services: Api<Service> = ns.api();
    let svc = services.get("minilm").await.unwrap();
    let ip = svc.spec.unwrap().cluster_ip.unwrap();
    let (sentence, reference) = reference_embedding(0).unwrap();
    let body = serde_json::json!({"model": "all-MiniLM-L6-v2", "input": [sentence]});
    // Ready pods reach kube-proxy's rules a moment later: retry a refused connection briefly.
    let mut attempt = 0;
    let resp = loop {
        let sent = reqwest::Client::new()
            .post(format!("http://{ip}:8080/v1/embeddings"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match sent {
            Ok(resp) => break resp,
            Err(e) if e.is_connect() && attempt < 30 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("request through the Service failed: {e}"),
        }
    };
    assert_eq!(resp.status().as_u16(), 200);
    let doc: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let got: Vec<f32> = doc["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let cos = cosine(&got, &reference);
    assert!(
        cos >= 0.9999,
        "cosine {cos} against sentence-transformers for {sentence:?}"
    );
}
