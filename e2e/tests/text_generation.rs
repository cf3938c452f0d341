//! Text generation on the local cluster. The example: the ModelDeployment of
//! deploy/examples/cpu-text-generation.yaml (model source swapped for the Gemma folder
//! on the node, as deploy/examples/local-apply does) becomes Ready and its Service
//! completes through the worker's OpenAI route. Autoscaled: a load of concurrent
//! completions makes the operator add a replica from the real worker's text-generation
//! signals in a real Prometheus, without a failed request, and remove it after the
//! scale-down delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kestrel_e2e::{TestNamespace, condition, prometheus_url, repo_root, wait_for, worker_image};
use kube::Api;

fn gemma_dir() -> String {
    std::env::var("KESTREL_GEMMA_DIR")
        .expect("KESTREL_GEMMA_DIR is not set: run `make setup` and source .cache/worker.env")
}

#[tokio::test]
async fn the_text_generation_example_becomes_ready_and_completes_through_its_service() {
    let gemma = gemma_dir();
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

    let url = ns.completions_url("gemma").await.unwrap();
    let body = serde_json::json!({"model": "gemma-3-270m", "prompt": "Q: What is the capital of France?\nA:",
                                  "max_tokens": 8, "temperature": 0});
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let doc: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let text = doc["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{doc}");
}

/// Closed-loop clients sending completions until `deadline`: (answered, 429, failed
/// with what).
async fn chat_load(url: String, clients: usize, deadline: Instant) -> (usize, usize, Vec<String>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let rejected = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            let (ok, rejected, failures) = (ok.clone(), rejected.clone(), failures.clone());
            tokio::spawn(async move {
                let body = serde_json::json!({"model": "gemma-3-270m", "max_tokens": 24,
                    "temperature": 0, "prompt": format!("Write a short note number {i} about Kubernetes:")});
                while Instant::now() < deadline {
                    let sent = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await;
                    match sent.map(|r| r.status().as_u16()) {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(429) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            rejected.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(status) => {
                            failures.lock().unwrap().push(format!("HTTP {status}"));
                            0
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(e.to_string());
                            0
                        }
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    (
        ok.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed),
        failures,
    )
}

#[tokio::test]
async fn an_autoscaled_text_generation_fleet_scales_on_its_load_and_back() {
    let mut ns = TestNamespace::new("textgen-scale").await.unwrap();
    ns.start_operator(&[
        "--prometheus-url",
        &prometheus_url(),
        "--signal-window-seconds",
        "20",
    ])
    .unwrap();
    let yaml = format!(
        r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: gemma}}
spec:
  model: {{name: gemma-3-270m, task: text-generation, source: {{hostPath: {{path: "{}"}}}}}}
  variants: [{{name: q8-0, precision: q8_0}}]
  slo: {{latencyMetric: timeToFirstToken, p95LatencyMs: 1500, targetQueueDepthPerReplica: 4}}
  scaling: {{minReplicas: 1, maxReplicas: 2, scaleDownDelaySeconds: 30}}
  worker:
    image: "{}"
    imagePullPolicy: IfNotPresent
    maxBatchSize: 4
    maxQueue: 64
    # Half a core each, so that a second replica adds capacity on this 2-core node.
    resources: {{requests: {{cpu: 250m, memory: 1Gi}}, limits: {{cpu: 500m, memory: 3Gi}}}}
"#,
        gemma_dir(),
        worker_image()
    );
    ns.apply_yaml(&yaml).await.unwrap();
    ns.wait_ready_with_metrics("gemma", Duration::from_secs(300))
        .await
        .unwrap();
    let url = ns.completions_url("gemma").await.unwrap();
    let deployments: Api<Deployment> = ns.api();
    let replicas = || async {
        deployments
            .get("gemma-q8-0")
            .await
            .ok()
            .and_then(|d| d.spec)
            .and_then(|s| s.replicas)
            .unwrap_or(0)
    };

    // Twelve clients against one replica that decodes four sequences at a time: eight
    // wait, twice the target queue per replica, and their first tokens wait with them.
    let step = Instant::now();
    let load = tokio::spawn(chat_load(url, 12, step + Duration::from_secs(75)));
    wait_for("a second replica", Duration::from_secs(75), || async {
        Ok(replicas().await > 1)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", kestrel_e2e::tail(&ns.operator_log(), 30)));
    println!(
        "chat load → second replica after {:.1} s",
        step.elapsed().as_secs_f64()
    );
    let status = ns
        .wait_scale_up("gemma", Duration::from_secs(30))
        .await
        .unwrap();
    let decision = status.last_decision.clone().unwrap();
    println!(
        "decision: {} — {} (predicted p95 {:?} ms)",
        decision.reason, decision.message, decision.predicted_p95_ms
    );
    let observed = status.signals.expect("observed signals in status");
    println!(
        "observed: p95 time to first token {:?} ms, queue {:?}, {:?} requests/s",
        observed.p95_latency_ms, observed.queue_depth, observed.request_rate
    );
    assert!(
        observed.request_rate.is_some_and(|r| r > 0.0),
        "the request rate is read from the workers: {observed:?}"
    );

    let (ok, rejected, failures) = load.await.unwrap();
    println!(
        "chat load: {ok} answered, {rejected} refused with 429, {} failed",
        failures.len()
    );
    assert!(ok > 20, "only {ok} completions answered");
    assert!(failures.is_empty(), "no request failed: {failures:?}");

    // Load gone: back to one replica after the 30 s scale-down delay, never before it.
    let stopped = Instant::now();
    wait_for("scale-down to 1", Duration::from_secs(180), || async {
        Ok(replicas().await == 1)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", kestrel_e2e::tail(&ns.operator_log(), 30)));
    let down = stopped.elapsed();
    println!(
        "load stopped → back to 1 replica after {:.1} s",
        down.as_secs_f64()
    );
    assert!(
        down >= Duration::from_secs(25),
        "scaled down after only {:.1} s",
        down.as_secs_f64()
    );
}
