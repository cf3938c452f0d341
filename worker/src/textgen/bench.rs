//! `kestrel-worker bench-generation`: the worker's text generation through HTTP (SSE
//! streams) at several concurrency levels per variant, beside transformers (PyTorch
//! CPU) generating from the same GGUF, in one run on one machine.
//!
//! Closed loop: each client sends its next streaming completion when the last one
//! ends. Generated tokens/s counts the token events all clients received over the
//! measured seconds; TTFT is admission → first token event as the client sees it;
//! inter-token latency is the gap between a stream's consecutive token events.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::bench::{WorkerProcess, process_rss};

/// Prompts cycled by the clients (short ones: the benchmark measures decoding).
pub const PROMPTS: &[&str] = &[
    "Write a short story about a kestrel hovering over a field.",
    "Explain how a Kubernetes operator reconciles a custom resource.",
    "The history of the bicycle begins in",
    "List three reasons to batch requests when serving a language model:",
];

#[derive(Debug, Clone)]
pub struct GenBenchConfig {
    pub model_dir: PathBuf,
    pub variants: Vec<String>,
    pub concurrency: Vec<usize>,
    pub seconds: f64,
    pub max_tokens: usize,
    /// Python with transformers, torch and gguf; None skips the baseline.
    pub python: Option<PathBuf>,
    pub threads: usize,
}

/// One measured point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenPoint {
    pub engine: String,
    pub variant: String,
    pub concurrency: usize,
    pub requests: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p95_ms: f64,
    pub rss_bytes: u64,
}

#[derive(Default)]
struct Samples {
    requests: usize,
    tokens: usize,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One streaming completion on a fresh connection; returns (ttft, gaps, tokens).
fn one_stream(
    addr: &str,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                      "stream": true})
    .to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    s.write_all(req.as_bytes())?;
    let mut buf = vec![0u8; 16384];
    let mut pending = String::new();
    let mut times: Vec<f64> = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let now = started.elapsed().as_secs_f64();
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Token events carry "finish_reason":null; the last one names the reason.
        while let Some(i) = pending.find("\n\n") {
            let event: String = pending.drain(..i + 2).collect();
            if event.contains("\"finish_reason\":null") {
                times.push(now);
            }
        }
        if pending.contains("[DONE]") {
            break;
        }
    }
    if times.is_empty() {
        anyhow::bail!("no token events (is the worker serving text generation?)");
    }
    let gaps = times.windows(2).map(|w| w[1] - w[0]).collect();
    Ok((times[0], gaps, times.len()))
}

/// Closed-loop streaming clients for `seconds` (after a short warm-up).
async fn closed_loop(
    addr: &str,
    concurrency: usize,
    seconds: f64,
    max_tokens: usize,
) -> (Samples, f64) {
    let stop_at = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|c| {
            let addr = addr.to_string();
            tokio::task::spawn_blocking(move || {
                let mut s = Samples::default();
                let mut i = c;
                while Instant::now() < stop_at {
                    let prompt = PROMPTS[i % PROMPTS.len()];
                    i += 1;
                    if let Ok((ttft, gaps, tokens)) = one_stream(&addr, prompt, max_tokens) {
                        s.requests += 1;
                        s.tokens += tokens;
                        s.ttft.push(ttft);
                        s.itl.extend(gaps);
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Samples::default();
    for h in handles {
        if let Ok(s) = h.await {
            all.requests += s.requests;
            all.tokens += s.tokens;
            all.ttft.extend(s.ttft);
            all.itl.extend(s.itl);
        }
    }
    (all, started.elapsed().as_secs_f64())
}

fn point(
    engine: &str,
    variant: &str,
    concurrency: usize,
    mut s: Samples,
    seconds: f64,
    rss: u64,
) -> GenPoint {
    GenPoint {
        engine: engine.into(),
        variant: variant.into(),
        concurrency,
        requests: s.requests,
        tokens: s.tokens,
        seconds,
        tokens_per_second: s.tokens as f64 / seconds,
        ttft_p50_ms: percentile(&mut s.ttft, 50.0) * 1e3,
        ttft_p95_ms: percentile(&mut s.ttft, 95.0) * 1e3,
        itl_p50_ms: percentile(&mut s.itl, 50.0) * 1e3,
        itl_p95_ms: percentile(&mut s.itl, 95.0) * 1e3,
        rss_bytes: rss,
    }
}

/// Runs the worker's points, then the baseline's, and returns them all.
pub async fn run(config: &GenBenchConfig, exe: &Path) -> anyhow::Result<Vec<GenPoint>> {
    let max_running = config.concurrency.iter().copied().max().unwrap_or(1);
    let mut points = Vec::new();
    for variant in &config.variants {
        let args: Vec<String> = vec![
            "--model".into(),
            config.model_dir.display().to_string(),
            "--variant".into(),
            variant.clone(),
            "--max-batch".into(),
            max_running.to_string(),
            "--max-queue".into(),
            "256".into(),
        ];
        let w = WorkerProcess::start(exe, &args)
            .await
            .with_context(|| format!("failed to start the worker for {variant}"))?;
        let addr = w.base_url.trim_start_matches("http://").to_string();
        closed_loop(&addr, 1, 2.0, 8).await; // warm-up
        for &c in &config.concurrency {
            let (s, secs) = closed_loop(&addr, c, config.seconds, config.max_tokens).await;
            let p = point("kestrel-worker", variant, c, s, secs, process_rss(w.pid()));
            eprintln!("{}", serde_json::to_string(&p)?);
            points.push(p);
        }
        w.terminate()?;
    }
    if let Some(python) = &config.python {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_generation_transformers.py");
        let list = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let out = std::process::Command::new(python)
            .arg(&script)
            .arg(&config.model_dir)
            .args(["--concurrency", &list(&config.concurrency)])
            .args(["--max-tokens", &config.max_tokens.to_string()])
            .args(["--seconds", &config.seconds.to_string()])
            .args(["--threads", &config.threads.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("failed to run {}", script.display()))?;
        if !out.status.success() {
            anyhow::bail!("the transformers baseline failed ({})", out.status);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            points.push(GenPoint {
                engine: "transformers".into(),
                variant: "q4_k_m (dequantized, f32)".into(),
                concurrency: f("concurrency") as usize,
                requests: f("requests") as usize,
                tokens: f("tokens") as usize,
                seconds: f("seconds"),
                tokens_per_second: f("tokens_per_second"),
                ttft_p50_ms: f("ttft_p50_ms"),
                ttft_p95_ms: f("ttft_p95_ms"),
                itl_p50_ms: f("itl_p50_ms"),
                itl_p95_ms: f("itl_p95_ms"),
                rss_bytes: f("rss_bytes") as u64,
            });
        }
    }
    Ok(points)
}

/// The table `bench-generation` prints (markdown).
pub fn table(points: &[GenPoint]) -> String {
    let mut out = String::from(
        "| engine | variant | concurrency | requests | tokens/s | vs c=1 | TTFT p50 ms | TTFT p95 ms | inter-token p50 ms | inter-token p95 ms | RSS MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        let base = points
            .iter()
            .find(|q| q.engine == p.engine && q.variant == p.variant && q.concurrency == 1)
            .map(|q| p.tokens_per_second / q.tokens_per_second)
            .unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.2}x | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |\n",
            p.engine,
            p.variant,
            p.concurrency,
            p.requests,
            p.tokens_per_second,
            base,
            p.ttft_p50_ms,
            p.ttft_p95_ms,
            p.itl_p50_ms,
            p.itl_p95_ms,
            p.rss_bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    out
}
