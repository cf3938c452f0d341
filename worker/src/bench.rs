//! `kestrel-worker bench`: the worker's HTTP path beside sentence-transformers and raw
//! ONNX Runtime, same machine, same sentences, same run; and an overload run.
//!
//! Each variant is served by a child `kestrel-worker serve` on 127.0.0.1 (an ephemeral
//! port); closed-loop clients send one sentence per request. Loopback only, bounded in
//! time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kestrel_crds::contract;
use serde_json::json;

use crate::api::EMBEDDINGS_PATH;
use crate::client::HttpClient;
use crate::corpus;

/// A running `kestrel-worker serve` child.
pub struct WorkerProcess {
    pub child: Child,
    pub base_url: String,
}

impl WorkerProcess {
    /// Starts `serve` with `args` (besides --host/--port) and waits until it is ready.
    pub async fn start(exe: &std::path::Path, args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", exe.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(addr) = line.split("addr=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_string());
                    sent = true;
                }
                if std::env::var_os("KESTREL_BENCH_VERBOSE").is_some() {
                    eprintln!("worker: {line}");
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(120)))
            .await?
            .context(
                "the worker did not report its address (see its log with KESTREL_BENCH_VERBOSE=1)",
            )?;
        let base_url = format!("http://{addr}");
        let client = HttpClient::new();
        let ready = format!("{base_url}{}", contract::READY_PATH);
        for _ in 0..600 {
            if let Ok(r) = client.get(&ready).await
                && r.status.is_success()
            {
                return Ok(WorkerProcess { child, base_url });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the worker never became ready")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(self.child.wait()?)
    }
}

/// Resident set size of a process, from /proc.
pub fn process_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub ok: usize,
    pub rejected: usize,
    pub errors: usize,
    /// Latencies of successful requests, sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
    pub seconds: f64,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.latencies_ms.len() - 1) as f64).round() as usize;
        self.latencies_ms[rank]
    }
    fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.errors += other.errors;
        self.latencies_ms.extend(other.latencies_ms);
    }
}

fn request_body(sentence: &str) -> serde_json::Value {
    json!({"input": sentence, "model": crate::engine::MODEL_NAME})
}

async fn one_request(client: &HttpClient, url: &str, sentence: &str, into: &mut LoadResult) {
    let started = Instant::now();
    match client.post_json(url, &request_body(sentence)).await {
        Ok(r) if r.status.is_success() => {
            into.ok += 1;
            into.latencies_ms
                .push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(r) if r.status.as_u16() == 429 => into.rejected += 1,
        _ => into.errors += 1,
    }
}

/// Closed loop: `concurrency` clients, each sending its next request when answered.
pub async fn closed_loop(base_url: &str, concurrency: usize, seconds: f64) -> LoadResult {
    let url = format!("{base_url}{EMBEDDINGS_PATH}");
    let sentences = Arc::new(corpus::bench_sentences());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks = (0..concurrency).map(|c| {
        let (url, sentences) = (url.clone(), sentences.clone());
        tokio::spawn(async move {
            let client = HttpClient::new();
            let mut result = LoadResult::default();
            let mut i = c * 7;
            while Instant::now() < deadline {
                one_request(&client, &url, sentences[i % sentences.len()], &mut result).await;
                i += 1;
            }
            result
        })
    });
    let mut total = LoadResult::default();
    for r in futures::future::join_all(tasks).await.into_iter().flatten() {
        total.merge(r);
    }
    total.seconds = started.elapsed().as_secs_f64();
    total.latencies_ms.sort_by(f64::total_cmp);
    total
}

/// Open loop: requests arrive at `rate` per second regardless of answers (at most
/// `max_outstanding` at once, so the client itself stays bounded).
pub async fn open_loop(
    base_url: &str,
    rate: f64,
    seconds: f64,
    max_outstanding: usize,
) -> LoadResult {
    let url = Arc::new(format!("{base_url}{EMBEDDINGS_PATH}"));
    let sentences = Arc::new(corpus::bench_sentences());
    let client = HttpClient::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(max_outstanding));
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let mut dropped = 0usize;
    let mut i = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        ticker.tick().await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        let (client, url, sentences) = (client.clone(), url.clone(), sentences.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            one_request(&client, &url, sentences[i % sentences.len()], &mut r).await;
            drop(permit);
            r
        }));
        i += 1;
    }
    let mut total = LoadResult::default();
    for r in futures::future::join_all(tasks).await.into_iter().flatten() {
        total.merge(r);
    }
    total.errors += dropped;
    total.seconds = started.elapsed().as_secs_f64();
    total.latencies_ms.sort_by(f64::total_cmp);
    total
}

/// Options of `kestrel-worker bench`.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model_dir: PathBuf,
    pub variants: Vec<String>,
    pub concurrency: Vec<usize>,
    pub seconds: f64,
    pub threads: usize,
    pub max_batch: usize,
    pub python: Option<PathBuf>,
    pub serve_args: Vec<String>,
    pub overload_seconds: f64,
}

/// Runs the Python baselines; `None` when no interpreter was given.
fn baselines(config: &BenchConfig) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(python) = &config.python else {
        return Ok(None);
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_baselines.py");
    let sentences = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sentences.txt");
    let output = Command::new(python)
        .arg(&script)
        .arg(&config.model_dir)
        .arg(&sentences)
        .args(["--seconds", &config.seconds.to_string()])
        .args(["--batch-size", &config.max_batch.to_string()])
        .args(["--threads", &config.threads.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to run {}", python.display()))?;
    if !output.status.success() {
        bail!("{} failed", script.display());
    }
    Ok(Some(serde_json::from_slice(&output.stdout)?))
}

/// Runs the whole benchmark and returns the printed report.
pub async fn run(config: &BenchConfig) -> anyhow::Result<String> {
    use std::fmt::Write;
    let exe = std::env::current_exe()?;
    let mut report = String::new();
    let mut rows: Vec<(String, usize, LoadResult)> = Vec::new();
    let mut f32_c32 = None;
    for variant in &config.variants {
        let mut args = vec![
            "--model".into(),
            config.model_dir.display().to_string(),
            "--variant".into(),
            variant.clone(),
            "--max-batch".into(),
            config.max_batch.to_string(),
            "--max-queue".into(),
            "1024".into(),
            "--drain-delay-seconds".into(),
            "0".into(),
            "--threads".into(),
            config.threads.to_string(),
        ];
        args.extend(config.serve_args.iter().cloned());
        let worker = WorkerProcess::start(&exe, &args).await?;
        // Warm the HTTP path and the batch shapes.
        closed_loop(&worker.base_url, config.max_batch, 1.0).await;
        for &c in &config.concurrency {
            let r = closed_loop(&worker.base_url, c, config.seconds).await;
            eprintln!(
                "worker {variant} c={c}: {:.1} items/s p50 {:.1} ms p95 {:.1} ms",
                r.throughput(),
                r.percentile(50.0),
                r.percentile(95.0)
            );
            if variant == "f32" && c == *config.concurrency.iter().max().unwrap_or(&c) {
                f32_c32 = Some(r.throughput());
            }
            rows.push((variant.clone(), c, r));
        }
        let status = worker.terminate()?;
        if !status.success() {
            bail!("the worker for {variant} exited with {status}");
        }
    }
    let engine = engine_throughput(config)?;
    let base = baselines(config)?;

    let top_c = *config.concurrency.iter().max().unwrap_or(&1);
    let _ = writeln!(
        report,
        "machine: {}; threads {}; batch {}; {} s per point; sentences: worker/data/sentences.txt (bench set, {} sentences)",
        crate::profile::machine(crate::engine::Device::Cpu, config.threads).description,
        config.threads,
        config.max_batch,
        config.seconds,
        corpus::bench_sentences().len()
    );
    let _ = writeln!(
        report,
        "\n| engine | concurrency | items/s | p50 ms | p95 ms | 429s |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|");
    for (variant, c, r) in &rows {
        let _ = writeln!(
            report,
            "| worker HTTP {variant} | {c} | {:.1} | {:.1} | {:.1} | {} |",
            r.throughput(),
            r.percentile(50.0),
            r.percentile(95.0),
            r.rejected
        );
    }
    for (variant, items) in &engine {
        let _ = writeln!(
            report,
            "| worker engine only {variant} (batch {}) | - | {items:.1} | - | - | - |",
            config.max_batch
        );
    }
    let mut st = None;
    let mut ort = None;
    if let Some(base) = &base {
        for (name, slot) in [
            ("sentence-transformers", &mut st),
            ("onnxruntime-f32", &mut ort),
        ] {
            if let Some(v) = base[name]["items_per_second"].as_f64() {
                *slot = Some(v);
                let _ = writeln!(
                    report,
                    "| {name} (batch {}) | - | {v:.1} | - | - | - |",
                    config.max_batch
                );
            }
        }
    }
    let _ = writeln!(report, "\nratios at concurrency {top_c}:");
    let best_quant = rows
        .iter()
        .filter(|(v, c, _)| v != "f32" && *c == top_c)
        .map(|(v, _, r)| (v.clone(), r.throughput()))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some(w) = f32_c32 {
        if let Some(st) = st {
            let _ = writeln!(
                report,
                "- worker f32 / sentence-transformers = {:.2} (goal ≥ 1.5)",
                w / st
            );
        }
        if let Some(ort) = ort {
            let _ = writeln!(
                report,
                "- worker f32 / raw ONNX Runtime f32 = {:.2} (goal ≥ 1.0)",
                w / ort
            );
        }
        if let Some((v, q)) = &best_quant {
            let _ = writeln!(
                report,
                "- worker {v} / worker f32 = {:.2} (goal ≥ 1.5)",
                q / w
            );
        }
        if let Some((_, e)) = engine.iter().find(|(v, _)| v == "f32") {
            let _ = writeln!(
                report,
                "- HTTP + batching overhead at saturation = {:.1} % of engine time (goal ≤ 5 %)",
                (e / w - 1.0) * 100.0
            );
        }
    }
    if config.overload_seconds > 0.0 {
        report.push_str(&overload(config, f32_c32.unwrap_or(50.0)).await?);
    }
    Ok(report)
}

/// Engine-only throughput at the bench batch size, per variant, in this process.
fn engine_throughput(config: &BenchConfig) -> anyhow::Result<Vec<(String, f64)>> {
    let tokenizer = crate::engine::TextTokenizer::load(&config.model_dir)?;
    let ort_library =
        crate::engine::OrtLibrary(std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
    let load = crate::engine::LoadOptions {
        device: crate::engine::Device::Cpu,
        threads: config.threads,
        ort_library,
    };
    let mut out = Vec::new();
    for name in &config.variants {
        let spec = crate::engine::VariantSpec::resolve(name, None, crate::engine::Device::Cpu)?;
        let mut backend = crate::engine::load_backend(&config.model_dir, &spec, &load)?;
        let points = crate::profile::measure_batches(
            backend.as_mut(),
            &tokenizer,
            &[config.max_batch],
            config.seconds,
        )?;
        out.push((name.clone(), points[0].items_per_second));
    }
    Ok(out)
}

/// Offers 3× the measured capacity for `overload_seconds` to an f32 worker with a
/// small queue; reports 429s, the p99 of admitted requests and the worker's RSS.
async fn overload(config: &BenchConfig, capacity: f64) -> anyhow::Result<String> {
    let max_queue = 64;
    let mut args = vec![
        "--model".into(),
        config.model_dir.display().to_string(),
        "--variant".into(),
        "f32".into(),
        "--max-batch".into(),
        config.max_batch.to_string(),
        "--max-queue".into(),
        max_queue.to_string(),
        "--drain-delay-seconds".into(),
        "0".into(),
        "--threads".into(),
        config.threads.to_string(),
    ];
    args.extend(config.serve_args.iter().cloned());
    let worker = WorkerProcess::start(&std::env::current_exe()?, &args).await?;
    let pid = worker.pid();
    let rss_before = process_rss(pid);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(process_rss(pid));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let rate = 3.0 * capacity;
    let r = open_loop(&worker.base_url, rate, config.overload_seconds, 2048).await;
    done.store(true, Ordering::SeqCst);
    let peak = sampler.await?;
    let alive = HttpClient::new()
        .get(&format!("{}{}", worker.base_url, contract::HEALTH_PATH))
        .await?;
    let status = worker.terminate()?;
    Ok(format!(
        "\noverload: {:.0} requests/s offered (3 × {:.1}) for {:.0} s to f32 with --max-queue {max_queue}\n\
         - answered 200: {} ({:.1}/s), 429: {}, other errors: {}\n\
         - admitted latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
         - worker RSS {:.0} MiB before, {:.0} MiB peak; /health after: {}; exit on SIGTERM: {}\n",
        rate,
        capacity,
        r.seconds,
        r.ok,
        r.throughput(),
        r.rejected,
        r.errors,
        r.percentile(50.0),
        r.percentile(99.0),
        r.latencies_ms.last().copied().unwrap_or(0.0),
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        alive.status,
        status
    ))
}
