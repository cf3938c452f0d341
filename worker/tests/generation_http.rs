//! The text-generation HTTP surface, against the real binary on 127.0.0.1 with
//! Gemma-3-270M (q8_0, the fastest variant here).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kestrel_crds::contract::metrics as names;
use kestrel_worker::bench::WorkerProcess;
use kestrel_worker::client::HttpClient;
use serde_json::{Value, json};
use std::io::{Read, Write};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kestrel-worker"))
}

async fn start(extra: &[&str]) -> WorkerProcess {
    let mut args: Vec<String> = vec![
        "--model".into(),
        common::gemma_dir().display().to_string(),
        "--variant".into(),
        "q8_0".into(),
        "--max-context".into(),
        "256".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    WorkerProcess::start(exe(), &args)
        .await
        .expect("the worker starts and becomes ready")
}

async fn post(c: &HttpClient, w: &WorkerProcess, path: &str, body: Value) -> (u16, Value, String) {
    let r = c
        .post_json(&format!("{}{path}", w.base_url), &body)
        .await
        .expect("request completes");
    let text = String::from_utf8_lossy(&r.body).to_string();
    (
        r.status.as_u16(),
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

async fn metric(c: &HttpClient, w: &WorkerProcess, series: &str) -> f64 {
    let r = c.get(&format!("{}/metrics", w.base_url)).await.unwrap();
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

/// Waits until `series` reads `want`. The gauges follow each engine step, so an event
/// can reach its client a moment before the step that sent it updates them.
async fn metric_reaches(c: &HttpClient, w: &WorkerProcess, series: &str, want: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(c, w, series).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {series}is {now} after 10 s, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_chat_streaming_and_refusals_follow_openai() {
    let w = start(&[]).await;
    let c = HttpClient::new();

    let (status, v, _) = post(
        &c,
        &w,
        "/v1/completions",
        json!({"prompt": "Q: What is the capital of France?\nA:", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let greedy = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(greedy.contains("Paris"), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Streaming: one event per generated token, the same text as without streaming.
    let (status, _, body) = post(
        &c,
        &w,
        "/v1/completions",
        json!({"prompt": "Q: What is the capital of France?\nA:", "max_tokens": 8, "temperature": 0,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let tokens: Vec<&Value> = chunks
        .iter()
        .filter(|c| {
            c["choices"].as_array().is_some_and(|a| !a.is_empty())
                && c["choices"][0]["finish_reason"].is_null()
        })
        .collect();
    assert_eq!(tokens.len(), 8, "one event per token: {body}");
    let streamed: String = tokens
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, greedy);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);

    // stop: the text ends before the stop string.
    let (status, v, _) = post(
        &c,
        &w,
        "/v1/completions",
        json!({"prompt": "Q: What is the capital of France?\nA:", "max_tokens": 8, "temperature": 0, "stop": "Paris"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["text"],
        greedy.split("Paris").next().unwrap()
    );

    // Seeded sampling repeats.
    let sampled = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 42});
    let (_, a, _) = post(&c, &w, "/v1/completions", sampled.clone()).await;
    let (_, b, _) = post(&c, &w, "/v1/completions", sampled).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    // Chat: the Gemma template, an assistant message.
    let (status, v, _) = post(
        &c,
        &w,
        "/v1/chat/completions",
        json!({"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"}],
               "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{v}");

    // Context: 400 with the numbers.
    let (status, v, _) = post(
        &c,
        &w,
        "/v1/completions",
        json!({"prompt": "Hello there", "max_tokens": 300}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("256") && msg.contains("300") && msg.contains("3 tokens"),
        "{msg}"
    );
    let long = "word ".repeat(400);
    let (status, v, _) = post(&c, &w, "/v1/completions", json!({"prompt": long})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt");
    for (body, param) in [
        (json!({"prompt": "x", "temperature": 3}), "temperature"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (json!({"prompt": "x", "n": 2}), "n"),
        (json!({"prompt": ""}), "prompt"),
    ] {
        let (status, v, _) = post(&c, &w, "/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{body} -> {v}");
    }
    let (status, v, _) = post(&c, &w, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages")),
        "{v}"
    );
    let (status, v, _) = post(
        &c,
        &w,
        "/v1/completions",
        json!({"prompt": "x", "best_of": 2}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("best_of"));

    assert!(metric(&c, &w, &format!("{}_count", names::TIME_TO_FIRST_TOKEN)).await >= 6.0);
    assert!(metric(&c, &w, &format!("{}_count", names::INTER_TOKEN_LATENCY)).await >= 30.0);
    assert!(metric(&c, &w, &format!("{} ", names::GENERATED_TOKENS_TOTAL)).await >= 40.0);
    assert!(w.terminate().unwrap().success());
}

/// Sends a streaming request on a raw socket, reads until `events` token events
/// arrived, and returns the socket (dropping it disconnects).
async fn stream_some(w: &WorkerProcess, max_tokens: usize, events: usize) -> std::net::TcpStream {
    let addr = w.base_url.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = json!({"prompt": "Write a long story about a kestrel.", "max_tokens": max_tokens,
                          "temperature": 0, "stream": true})
        .to_string();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while got.matches("data: {").count() < events {
            let n = s.read(&mut buf).expect("events arrive");
            assert!(n > 0, "the stream ended early: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        s
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_batch_continuously_disconnects_cancel_and_the_queue_is_bounded() {
    let w = start(&["--max-batch", "2", "--max-queue", "1"]).await;
    let c = HttpClient::new();
    let running = format!("{} ", names::RUNNING_SEQUENCES);

    // Two long streams fill both slots; they run together (one decode batch).
    let a = stream_some(&w, 200, 2).await;
    let b = stream_some(&w, 200, 2).await;
    metric_reaches(&c, &w, &running, 2.0, "both streams decode together").await;
    // A third waits (the queue holds one); a fourth is refused at once.
    let waiter = {
        let c = c.clone();
        let url = format!("{}/v1/completions", w.base_url);
        tokio::spawn(async move {
            c.post_json(
                &url,
                &json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0}),
            )
            .await
            .unwrap()
        })
    };
    let waiting = format!("{} ", names::WAITING_SEQUENCES);
    metric_reaches(&c, &w, &waiting, 1.0, "the third request waits").await;
    let r = c
        .post_json(
            &format!("{}/v1/completions", w.base_url),
            &json!({"prompt": "Hi", "max_tokens": 3}),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 429);
    assert_eq!(r.retry_after.as_deref(), Some("1"));

    // A client that leaves frees its slot at once: the waiting request joins and ends
    // while the other long stream is still running.
    drop(a);
    let answered = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiting request runs once a slot frees")
        .unwrap();
    assert_eq!(answered.status.as_u16(), 200);
    metric_reaches(&c, &w, &running, 1.0, "the other stream still runs, alone").await;
    let cancelled = format!("{}{{outcome=\"cancelled\"}} ", names::REQUESTS_TOTAL);
    assert_eq!(metric(&c, &w, &cancelled).await, 1.0);
    drop(b);
    metric_reaches(&c, &w, &running, 0.0, "the second stream is cancelled").await;
    assert_eq!(metric(&c, &w, &cancelled).await, 2.0);
    assert_eq!(
        metric(&c, &w, &format!("{} ", names::KV_CACHE_USAGE)).await,
        0.0
    );
    assert!(w.terminate().unwrap().success());
}
