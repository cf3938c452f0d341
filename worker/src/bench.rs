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
    /// The child's log lines so far (stderr).
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
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
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("log lock").push(line.clone());
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
                return Ok(WorkerProcess {
                    child,
                    base_url,
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the worker never became ready")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit by itself (after a signal the caller sent).
    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
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

/// A worker left running by a test that failed, or that never terminated it, would
/// outlive the test (and hold whatever it inherited, such as a lock file's descriptor).
impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // After `terminate`'s wait the child is reaped and this does nothing.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

fn request_body(sentences: &[&str]) -> serde_json::Value {
    match sentences {
        [one] => json!({"input": one, "model": crate::engine::MODEL_NAME}),
        many => json!({"input": many, "model": crate::engine::MODEL_NAME}),
    }
}

async fn one_request(client: &HttpClient, url: &str, sentences: &[&str], into: &mut LoadResult) {
    let started = Instant::now();
    match client.post_json(url, &request_body(sentences)).await {
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
    closed_loop_inputs(base_url, concurrency, 1, seconds).await
}

/// Closed loop with `inputs` sentences per request (`ok` counts requests).
pub async fn closed_loop_inputs(
    base_url: &str,
    concurrency: usize,
    inputs: usize,
    seconds: f64,
) -> LoadResult {
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
                let batch: Vec<&str> = (0..inputs.max(1))
                    .map(|k| sentences[(i + k) % sentences.len()])
                    .collect();
                one_request(&client, &url, &batch, &mut result).await;
                i += batch.len();
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
            one_request(&client, &url, &[sentences[i % sentences.len()]], &mut r).await;
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
    /// Interleaved rounds; the table shows medians.
    pub rounds: usize,
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

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesized command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports clock ticks of 1/100 s (USER_HZ) on every mainstream architecture.
    (ticks(11) + ticks(12)) / 100.0
}

/// One measurement: wall-clock throughput and, where known, items per CPU-second.
#[derive(Debug, Clone, Default)]
struct Sample {
    items_per_second: f64,
    items_per_cpu_second: f64,
    p50_ms: f64,
    p95_ms: f64,
    rejected: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of each field over rounds.
fn summarize(samples: &[Sample]) -> Sample {
    let field = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    Sample {
        items_per_second: field(|s| s.items_per_second),
        items_per_cpu_second: field(|s| s.items_per_cpu_second),
        p50_ms: field(|s| s.p50_ms),
        p95_ms: field(|s| s.p95_ms),
        rejected: samples.iter().map(|s| s.rejected).sum(),
    }
}

/// Runs the whole benchmark and returns the printed report.
///
/// The machine is shared, so every engine is measured in each of `rounds` rounds,
/// interleaved (worker HTTP, worker engine alone, sentence-transformers, raw ONNX
/// Runtime), and the table shows medians; items per CPU-second (the measured
/// process's own CPU time) is printed beside wall-clock throughput because it does
/// not move with other load on the machine.
pub async fn run(config: &BenchConfig) -> anyhow::Result<String> {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
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
        workers.push((variant.clone(), worker));
    }
    let tokenizer = crate::engine::TextTokenizer::load(&config.model_dir)?;
    let ort_library = crate::engine::OrtLibrary(None);
    let load = crate::engine::LoadOptions {
        device: crate::engine::Device::Cpu,
        threads: config.threads,
        ort_library,
    };
    let mut engines = Vec::new();
    for name in &config.variants {
        let spec = crate::engine::VariantSpec::resolve(name, None, crate::engine::Device::Cpu)?;
        engines.push((
            name.clone(),
            crate::engine::load_backend(&config.model_dir, &spec, &load)?,
        ));
    }

    let mut http: BTreeMap<(String, usize), Vec<Sample>> = BTreeMap::new();
    let mut engine: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut base: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let own_pid = std::process::id();
    for round in 0..config.rounds {
        for (variant, worker) in &workers {
            for &c in &config.concurrency {
                let cpu = process_cpu_seconds(worker.pid());
                let r = closed_loop(&worker.base_url, c, config.seconds).await;
                let cpu = process_cpu_seconds(worker.pid()) - cpu;
                eprintln!(
                    "round {round}: worker {variant} c={c}: {:.1} items/s, {:.1} per worker CPU-s",
                    r.throughput(),
                    r.ok as f64 / cpu
                );
                http.entry((variant.clone(), c)).or_default().push(Sample {
                    items_per_second: r.throughput(),
                    items_per_cpu_second: r.ok as f64 / cpu.max(1e-9),
                    p50_ms: r.percentile(50.0),
                    p95_ms: r.percentile(95.0),
                    rejected: r.rejected,
                });
            }
        }
        for (name, backend) in engines.iter_mut() {
            let cpu = process_cpu_seconds(own_pid);
            let started = Instant::now();
            let points = crate::profile::measure_batches(
                backend.as_mut(),
                &tokenizer,
                &[config.max_batch],
                config.seconds,
            )?;
            let (cpu, wall) = (
                process_cpu_seconds(own_pid) - cpu,
                started.elapsed().as_secs_f64(),
            );
            // measure_batches runs one warm-up batch outside its timing: count it in CPU.
            let items = points[0].items_per_second * (wall - points[0].latency_ms / 1e3).max(1e-9);
            engine.entry(name.clone()).or_default().push(Sample {
                items_per_second: points[0].items_per_second,
                items_per_cpu_second: (items + config.max_batch as f64) / cpu.max(1e-9),
                ..Sample::default()
            });
        }
        if let Some(b) = baselines(config)? {
            for name in ["sentence-transformers", "onnxruntime-f32"] {
                if let (Some(w), Some(c)) = (
                    b[name]["items_per_second"].as_f64(),
                    b[name]["items_per_cpu_second"].as_f64(),
                ) {
                    base.entry(name.to_string()).or_default().push(Sample {
                        items_per_second: w,
                        items_per_cpu_second: c,
                        ..Sample::default()
                    });
                }
            }
        }
    }
    for (variant, worker) in workers {
        let status = worker.terminate()?;
        if !status.success() {
            bail!("the worker for {variant} exited with {status}");
        }
    }

    let top_c = *config.concurrency.iter().max().unwrap_or(&1);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "machine: {}; threads {}; batch {}; {} rounds × {} s per point, medians; sentences: \
         worker/data/sentences.txt (bench set, {} sentences, one per request)",
        crate::profile::machine(crate::engine::Device::Cpu, config.threads).description,
        config.threads,
        config.max_batch,
        config.rounds,
        config.seconds,
        corpus::bench_sentences().len()
    );
    let _ = writeln!(
        report,
        "\n| engine | concurrency | items/s | items per CPU-s | p50 ms | p95 ms | 429s |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---:|");
    let mut summary: BTreeMap<String, Sample> = BTreeMap::new();
    for ((variant, c), samples) in &http {
        let s = summarize(samples);
        let _ = writeln!(
            report,
            "| worker HTTP {variant} | {c} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            s.items_per_second, s.items_per_cpu_second, s.p50_ms, s.p95_ms, s.rejected
        );
        if *c == top_c {
            summary.insert(format!("http {variant}"), s);
        }
    }
    for (variant, samples) in &engine {
        let s = summarize(samples);
        let _ = writeln!(
            report,
            "| worker engine alone {variant} (batch {}) | - | {:.1} | {:.1} | - | - | - |",
            config.max_batch, s.items_per_second, s.items_per_cpu_second
        );
        summary.insert(format!("engine {variant}"), s);
    }
    for (name, samples) in &base {
        let s = summarize(samples);
        let _ = writeln!(
            report,
            "| {name} (batch {}) | - | {:.1} | {:.1} | - | - | - |",
            config.max_batch, s.items_per_second, s.items_per_cpu_second
        );
        summary.insert(name.clone(), s);
    }
    let ratio = |a: &str, b: &str| -> Option<(f64, f64)> {
        let (a, b) = (summary.get(a)?, summary.get(b)?);
        Some((
            a.items_per_second / b.items_per_second,
            a.items_per_cpu_second / b.items_per_cpu_second,
        ))
    };
    let _ = writeln!(
        report,
        "\nratios at concurrency {top_c} (wall clock; per CPU-second):"
    );
    let mut line = |label: &str, a: &str, b: &str, goal: &str| {
        if let Some((w, c)) = ratio(a, b) {
            let _ = writeln!(report, "- {label} = {w:.2}; {c:.2} (goal {goal})");
        }
    };
    line(
        "worker f32 / sentence-transformers",
        "http f32",
        "sentence-transformers",
        "≥ 1.5",
    );
    line(
        "worker f32 / raw ONNX Runtime f32",
        "http f32",
        "onnxruntime-f32",
        "≥ 1.0",
    );
    for v in config.variants.iter().filter(|v| *v != "f32") {
        line(
            &format!("worker {v} / worker f32"),
            &format!("http {v}"),
            "http f32",
            "≥ 1.5",
        );
    }
    if let (Some(e), Some(h)) = (summary.get("engine f32"), summary.get("http f32")) {
        let _ = writeln!(
            report,
            "- HTTP + batching overhead at saturation, f32 = {:.1} % of engine time by wall clock \
             (the load generator shares the 2 cores), {:.1} % by the worker's own CPU time (goal ≤ 5 %)",
            (e.items_per_second / h.items_per_second - 1.0) * 100.0,
            (e.items_per_cpu_second / h.items_per_cpu_second - 1.0) * 100.0
        );
    }
    if config.overload_seconds > 0.0 {
        let capacity = summary
            .get("http f32")
            .map(|s| s.items_per_second)
            .unwrap_or(50.0);
        report.push_str(&overload(config, capacity).await?);
    }
    Ok(report)
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
