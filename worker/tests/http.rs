//! The worker's HTTP behaviour, against the real binary on 127.0.0.1 with the real model.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kestrel_crds::contract::{self, metrics as names};
use kestrel_worker::bench::WorkerProcess;
use kestrel_worker::client::HttpClient;
use serde_json::{Value, json};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kestrel-worker"))
}

async fn start(extra: &[&str]) -> WorkerProcess {
    let env = common::env();
    let mut args: Vec<String> = vec![
        "--model".into(),
        env.model_dir.display().to_string(),
        "--ort-library".into(),
        env.ort_library.display().to_string(),
        "--threads".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    WorkerProcess::start(exe(), &args)
        .await
        .expect("the worker starts and becomes ready")
}

fn url(w: &WorkerProcess) -> String {
    format!("{}/v1/embeddings", w.base_url)
}

async fn post(client: &HttpClient, w: &WorkerProcess, body: Value) -> (u16, Value) {
    let r = client
        .post_json(&url(w), &body)
        .await
        .expect("request completes");
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status.as_u16(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_follow_the_openai_shape_and_refuse_bad_requests() {
    let w = start(&["--max-inputs", "4", "--long-input", "refuse"]).await;
    let c = HttpClient::new();

    let (status, v) = post(
        &c,
        &w,
        json!({"input": "hello world", "model": "all-MiniLM-L6-v2"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "embedding");
    let e: Vec<f64> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(e.len(), 384);
    assert!(
        (e.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4,
        "normalized"
    );
    assert_eq!(v["usage"]["prompt_tokens"], 4);

    let (status, v) = post(
        &c,
        &w,
        json!({"input": ["a", "b c"], "encoding_format": "base64", "dimensions": 8}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][1]["index"], 1);
    let b64 = v["data"][0]["embedding"].as_str().expect("base64 string");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(bytes.len(), 8 * 4, "8 little-endian f32");

    let bad: &[(Value, Option<&str>, &str)] = &[
        (json!({"input": ""}), Some("input"), "empty"),
        (json!({"input": []}), Some("input"), "empty array"),
        (json!({"input": [1, 2]}), Some("input"), "must be a string"),
        (json!({"input": 42}), Some("input"), "string or an array"),
        (json!({}), Some("input"), "required"),
        (
            json!({"input": ["a", "b", "c", "d", "e"]}),
            Some("input"),
            "too many inputs",
        ),
        (
            json!({"input": "x", "colour": "red"}),
            None,
            "unknown field \"colour\"",
        ),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            Some("encoding_format"),
            "float",
        ),
        (
            json!({"input": "x", "dimensions": 0}),
            Some("dimensions"),
            "1 to 384",
        ),
        (
            json!({"input": "x", "dimensions": 385}),
            Some("dimensions"),
            "1 to 384",
        ),
        (
            json!({"input": "word ".repeat(300)}),
            Some("input"),
            "more than the model's maximum of 256",
        ),
    ];
    for (body, param, reason) in bad {
        let (status, v) = post(&c, &w, body.clone()).await;
        assert_eq!(status, 400, "{body} → {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"].as_str(), *param, "{body} → {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(reason),
            "{body}: {msg:?} should contain {reason:?}"
        );
    }
    let r = c
        .request(hyper::Method::POST, &url(&w), Some(b"{not json".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 400);

    // /metrics shows exactly the contract's series (Prometheus text format by default).
    let m = c
        .get(&format!("{}{}", w.base_url, contract::METRICS_PATH))
        .await
        .unwrap();
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    let mut families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    families.sort();
    let mut expected = vec![
        names::QUEUE_DEPTH,
        names::IN_FLIGHT,
        names::REQUEST_DURATION,
        names::QUEUE_WAIT,
        names::BATCH_SIZE,
        names::REQUESTS_TOTAL,
        names::TOKENS_TOTAL,
        names::MODEL_INFO,
    ];
    expected.sort();
    assert_eq!(families, expected);
    assert!(
        text.contains(&format!("{}{{outcome=\"ok\"}} 2", names::REQUESTS_TOTAL)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}{{outcome=\"error\"}} 12",
            names::REQUESTS_TOTAL
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "{}{{model=\"all-MiniLM-L6-v2\",variant=\"f32\",precision=\"f32\",device=\"cpu\"}} 1",
        names::MODEL_INFO
    )));
    assert!(w.terminate().unwrap().success());
}

/// A large request is tokenized on several threads: its embeddings still come back in
/// input order, and a bad input deep inside it is named by its own index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_keeps_input_order_and_names_its_bad_input() {
    let w = start(&["--max-inputs", "512", "--long-input", "refuse"]).await;
    let c = HttpClient::new();
    let inputs: Vec<String> = (0..150)
        .map(|i| format!("sentence {i} about {}", ["cats", "rain", "trains"][i % 3]))
        .collect();
    let (status, v) = post(&c, &w, json!({"input": inputs})).await;
    assert_eq!(status, 200, "{v}");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len());
    for i in [0, 37, 38, 75, 112, 149] {
        assert_eq!(data[i]["index"], i, "{}", data[i]);
        let (status, one) = post(&c, &w, json!({"input": inputs[i]})).await;
        assert_eq!(status, 200, "{one}");
        let a: Vec<f64> = serde_json::from_value(data[i]["embedding"].clone()).unwrap();
        let b: Vec<f64> = serde_json::from_value(one["data"][0]["embedding"].clone()).unwrap();
        let cosine: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(
            cosine > 0.9999,
            "input {i}: cosine {cosine} to its own request"
        );
    }

    let mut bad = inputs.clone();
    bad[121] = "word ".repeat(300);
    bad[140] = "word ".repeat(300);
    let (status, v) = post(&c, &w, json!({"input": bad})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "input", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("input[121] has"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_429_with_retry_after() {
    let w = start(&[
        "--max-queue",
        "2",
        "--max-batch",
        "1",
        "--max-batch-wait-ms",
        "0",
    ])
    .await;
    let c = HttpClient::new();
    let long = "kestrels hover over open fields scanning for prey ".repeat(20);
    let requests = (0..40).map(|_| {
        let (c, u, long) = (c.clone(), url(&w), long.clone());
        tokio::spawn(async move { c.post_json(&u, &json!({"input": long})).await.unwrap() })
    });
    let replies: Vec<_> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let rejected: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + rejected.len(), 40, "only 200s and 429s");
    assert!(
        !rejected.is_empty() && ok >= 2,
        "ok {ok}, rejected {}",
        rejected.len()
    );
    assert!(
        rejected
            .iter()
            .all(|r| r.retry_after.as_deref() == Some("1"))
    );
    let v: Value = serde_json::from_slice(&rejected[0].body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(w.terminate().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_queued_work() {
    let w = start(&[
        "--max-queue",
        "64",
        "--max-batch",
        "1",
        "--max-batch-wait-ms",
        "0",
    ])
    .await;
    let c = HttpClient::new();
    let long = "kestrels hover over open fields scanning for prey ".repeat(20);
    // 30 requests that give up after 50 ms: most are still queued when they leave.
    let requests = (0..30).map(|_| {
        let (c, u, long) = (c.clone(), url(&w), long.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_millis(50),
                c.post_json(&u, &json!({"input": long})),
            )
            .await;
        })
    });
    futures::future::join_all(requests).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = c
        .get(&format!("{}{}", w.base_url, contract::METRICS_PATH))
        .await
        .unwrap();
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    let cancelled: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "{}{{outcome=\"cancelled\"}} ",
                names::REQUESTS_TOTAL
            ))
        })
        .unwrap()
        .parse()
        .unwrap();
    let batches: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}_count ", names::BATCH_SIZE)))
        .unwrap()
        .parse()
        .unwrap();
    assert!(cancelled >= 10.0, "cancelled {cancelled}\n{text}");
    // Most never ran: the batcher dropped them unread (warm-up is not counted).
    assert!(batches <= 20.0, "batches {batches}, cancelled {cancelled}");
    assert!(w.terminate().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_admitted_request() {
    let w = start(&[
        "--max-queue",
        "256",
        "--max-batch",
        "8",
        "--drain-delay-seconds",
        "1",
    ])
    .await;
    let base = w.base_url.clone();
    let stop_at = Instant::now() + Duration::from_secs(4);
    let clients = (0..16).map(|i| {
        let u = format!("{base}/v1/embeddings");
        tokio::spawn(async move {
            let c = HttpClient::new();
            let (mut ok, mut refused, mut lost) = (0, 0, Vec::new());
            let mut told_to_reconnect = false;
            while Instant::now() < stop_at {
                match c
                    .post_json(
                        &u,
                        &json!({"input": format!("sentence number {i} about kestrels")}),
                    )
                    .await
                {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        told_to_reconnect |= r.closes_connection;
                    }
                    // A draining worker never refuses a request it read: behind a
                    // Service, that 503 is a failed request for the client.
                    Ok(r) => lost.push(format!("status {}", r.status)),
                    Err(e) => {
                        // After the listener closes, new connections are refused: not admitted.
                        let text = format!("{e:?}");
                        if text.contains("ConnectError") || text.contains("Connection refused") {
                            refused += 1;
                            break;
                        } else {
                            lost.push(text);
                        }
                    }
                }
            }
            (ok, refused, lost, told_to_reconnect)
        })
    });
    let clients: Vec<_> = clients.collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = w.pid();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Readiness turns false at once while requests are still served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = HttpClient::new()
        .get(&format!("{base}{}", contract::READY_PATH))
        .await
        .unwrap();
    assert_eq!(ready.status.as_u16(), 503);
    assert!(
        ready.closes_connection,
        "a draining worker closes each connection after its answer"
    );
    let log = w.log.clone();
    let status = tokio::task::spawn_blocking(move || w.wait())
        .await
        .unwrap()
        .unwrap();
    // The stderr reader may lag the exit by a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ok, mut refused, mut lost, mut reconnecting) = (0, 0, Vec::new(), 0);
    for c in futures::future::join_all(clients).await {
        let (o, r, l, told) = c.unwrap();
        ok += o;
        refused += r;
        lost.extend(l);
        reconnecting += usize::from(told);
    }
    let admitted: usize = log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("drained; exiting"))
        .and_then(|l| l.split("admitted=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the worker logs how many requests it admitted");
    eprintln!(
        "drain: admitted {admitted}, ok {ok}, refused {refused}, other errors {}",
        lost.len()
    );
    assert!(status.success(), "exit status {status}");
    assert!(ok > 16, "requests were served during the drain delay: {ok}");
    assert_eq!(
        reconnecting, 16,
        "every keep-alive client was told to reconnect during the drain delay"
    );
    assert!(
        !lost.iter().any(|l| l.starts_with("status")),
        "a draining worker answered a request with an error: {lost:?}"
    );
    // Every admitted request reached its client as a 200. Other failures can only be
    // requests written to a keep-alive connection as the server closed it: never admitted.
    assert_eq!(
        ok, admitted,
        "admitted requests lost; client errors: {lost:?}"
    );
}

#[test]
fn cuda_without_a_driver_is_a_clear_error_not_a_panic() {
    let env = common::env();
    let out = std::process::Command::new(exe())
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cuda:0",
            "--backend",
            "candle",
        ])
        .arg("--model")
        .arg(&env.model_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cuda:0") && stderr.contains("unavailable"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
