//! The text-generation example, run by the operator on the local cluster: the
//! ModelDeployment of deploy/examples/cpu-text-generation.yaml (model source swapped for
//! the Gemma folder on the node, as deploy/examples/local-apply does) becomes Ready and
//! its Service completes through the worker's OpenAI route.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kestrel_e2e::{TestNamespace, condition, repo_root, worker_image};
use kube::Api;

#[tokio::test]
async fn the_text_generation_example_becomes_ready_and_completes_through_its_service() {
    let gemma = std::env::var("KESTREL_GEMMA_DIR")
        .expect("KESTREL_GEMMA_DIR is not set: run `make setup` and source .cache/worker.env");
    let mut ns = TestNamespace::new("textgen").await.unwrap();
    ns.start_operator(&[]).unwrap();
    let example =
        std::fs::read_to_string(repo_root().join("deploy/examples/cpu-text-generation.yaml"))
            .unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&example).unwrap();
    doc["spec"]["model"]["source"] =
        serde_yaml::from_str(&format!("{{hostPath: {{path: \"{gemma}\"}}}}")).unwrap();
    doc["spec"]["worker"]["image"] = worker_image().into();
    doc["spec"]["worker"]["imagePullPolicy"] = "IfNotPresent".into();
    // One replica is enough to prove serving; the example's requests fit the node.
    doc["spec"]["scaling"] = serde_yaml::from_str("{enabled: false}").unwrap();
    doc["spec"]["replicas"] = serde_yaml::from_str("1").unwrap();
    ns.apply_yaml(&serde_yaml::to_string(&doc).unwrap())
        .await
        .unwrap();
    ns.wait_md("gemma", "Ready=True", Duration::from_secs(300), |md| {
        condition(md, "Ready").is_some_and(|c| c.status == "True")
    })
    .await
    .unwrap();

    let services: Api<Service> = ns.api();
    let ip = services
        .get("gemma")
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    let body = serde_json::json!({"model": "gemma-3-270m", "prompt": "Q: What is the capital of France?\nA:",
                                  "max_tokens": 8, "temperature": 0});
    let mut attempt = 0;
    let resp = loop {
        let sent = reqwest::Client::new()
            .post(format!("http://{ip}:8080/v1/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(60))
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
    let text = doc["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{doc}");
}
