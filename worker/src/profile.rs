//! `kestrel-worker profile`: capacity data for the operator's policy.
//!
//! For each variant, in a fresh child process so that memory figures are its own:
//! load time, peak RSS, quality against the sentence-transformers f32 reference,
//! throughput and latency against batch size (the engine alone) and p50/p95 latency
//! against concurrency (through the batcher, without HTTP).
//!
//! The JSON schema (`kestrel.dev/worker-profile/v1`) is parsed by kestrel-policy:
//! change it only together with that parser.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::batcher::{BatchLimits, Batcher};
use crate::corpus;
use crate::engine::{
    Device, EmbeddingBackend, LoadOptions, MODEL_NAME, TextTokenizer, TokenBatch, VariantSpec,
    cosine, embed_grouped, load_backend,
};
use crate::metrics::{Metrics, ModelInfo};

pub const SCHEMA: &str = "kestrel.dev/worker-profile/v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub schema: String,
    pub model: String,
    pub task: String,
    pub machine: Machine,
    pub variants: Vec<VariantProfile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub description: String,
    pub threads: usize,
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VariantProfile {
    pub variant: String,
    pub precision: String,
    pub device: String,
    pub load_seconds: f64,
    pub rss_bytes: u64,
    pub quality: Quality,
    pub batches: Vec<BatchPoint>,
    pub concurrency: Vec<ConcurrencyPoint>,
    /// Text generation only: prompt pass and first-token figures (`batches` are then
    /// decode steps: sequences per step, step latency, generated tokens per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationFigures>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationFigures {
    /// Tokens of the prompt pass per second (one 128-token prompt).
    pub prompt_tokens_per_second: f64,
    /// Generated tokens per second of one sequence alone (decode batch 1).
    pub generated_tokens_per_second: f64,
    /// Prompt pass and first token of a 32-token prompt, alone, in milliseconds.
    pub ttft_ms: f64,
    /// Bytes of the weights as loaded.
    pub weight_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quality {
    /// What the cosines compare against: the f32 model (sentence-transformers).
    pub reference: String,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    /// 1 − min_cosine.
    pub quality_loss: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchPoint {
    pub batch_size: usize,
    pub latency_ms: f64,
    pub items_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConcurrencyPoint {
    pub concurrency: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub items_per_second: f64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub model_dir: PathBuf,
    pub device: Device,
    pub load: LoadOptions,
    pub batch_sizes: Vec<usize>,
    pub concurrency: Vec<usize>,
    /// Time spent on each batch size and each concurrency level.
    pub seconds_per_point: f64,
    pub max_batch: usize,
}

/// Describes this machine: CPU model and core count, or the device.
pub fn machine(device: Device, threads: usize) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Machine {
        description: format!("{cpu}, {cores} cores available"),
        threads,
        device: device.to_string(),
    }
}

/// Resident set size now and at its peak, from /proc/self/status.
pub fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Cosines of the variant's embeddings of the sentence set against the reference.
pub fn measure_quality(
    backend: &mut dyn EmbeddingBackend,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<Quality> {
    let reference = corpus::reference_embeddings();
    let ids: Vec<Vec<u32>> = corpus::sentences()
        .iter()
        .map(|s| tokenizer.encode(s).map(|e| e.ids))
        .collect::<Result<_, _>>()?;
    let mut cosines = Vec::new();
    for (chunk, refs) in ids.chunks(16).zip(reference.chunks(16)) {
        let out = embed_grouped(backend, chunk, tokenizer.pad_id())?;
        cosines.extend(
            out.iter()
                .zip(refs)
                .map(|(a, b)| (cosine(a, b) as f64).clamp(-1.0, 1.0)),
        );
    }
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    Ok(Quality {
        reference: "f32".into(),
        min_cosine: min,
        mean_cosine: mean,
        quality_loss: 1.0 - min,
    })
}

/// Engine-only throughput and latency at each batch size, on the bench sentences.
pub fn measure_batches(
    backend: &mut dyn EmbeddingBackend,
    tokenizer: &TextTokenizer,
    sizes: &[usize],
    seconds: f64,
) -> anyhow::Result<Vec<BatchPoint>> {
    let ids = bench_ids(tokenizer)?;
    let mut points = Vec::new();
    for &size in sizes {
        let mut offset = 0;
        let mut next_batch = || {
            let seqs: Vec<&[u32]> = (0..size)
                .map(|i| ids[(offset + i) % ids.len()].as_slice())
                .collect();
            offset += size;
            seqs
        };
        embed_grouped(backend, &next_batch(), tokenizer.pad_id())?; // warm this shape
        let (started, mut runs) = (Instant::now(), 0usize);
        while runs < 3 || started.elapsed().as_secs_f64() < seconds {
            let batch = next_batch();
            embed_grouped(backend, &batch, tokenizer.pad_id())?;
            runs += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        points.push(BatchPoint {
            batch_size: size,
            latency_ms: elapsed * 1e3 / runs as f64,
            items_per_second: (size * runs) as f64 / elapsed,
        });
    }
    Ok(points)
}

/// Token ids of the bench sentences.
pub fn bench_ids(tokenizer: &TextTokenizer) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(corpus::bench_sentences()
        .iter()
        .map(|s| tokenizer.encode(s).map(|e| e.ids))
        .collect::<Result<_, _>>()?)
}

/// Closed-loop clients, one input per request, through the batcher.
pub async fn measure_concurrency(
    batcher: &Batcher,
    ids: Arc<Vec<Vec<u32>>>,
    levels: &[usize],
    seconds: f64,
) -> anyhow::Result<Vec<ConcurrencyPoint>> {
    let mut points = Vec::new();
    for &level in levels {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let clients = (0..level).map(|c| {
            let (batcher, ids) = (batcher.clone(), ids.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = c * 7;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let rx = batcher
                        .submit(vec![ids[i % ids.len()].clone()], Duration::from_secs(60))
                        .map_err(|e| anyhow::anyhow!("profile request refused: {e}"))?;
                    rx.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    i += 1;
                }
                anyhow::Ok(latencies)
            })
        });
        let mut all = Vec::new();
        for client in futures::future::join_all(clients).await {
            all.extend(client??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_by(f64::total_cmp);
        points.push(ConcurrencyPoint {
            concurrency: level,
            p50_ms: percentile(&all, 50.0),
            p95_ms: percentile(&all, 95.0),
            items_per_second: all.len() as f64 / elapsed,
        });
    }
    Ok(points)
}

/// Profiles one variant in this process.
pub async fn profile_variant(
    config: &ProfileConfig,
    variant: &VariantSpec,
) -> anyhow::Result<VariantProfile> {
    let started = Instant::now();
    let tokenizer = TextTokenizer::load(&config.model_dir)?;
    let mut backend = load_backend(&config.model_dir, variant, &config.load)
        .with_context(|| format!("failed to load variant {}", variant.name))?;
    let warm = tokenizer.encode("kestrel warm-up")?.ids;
    backend.embed(&TokenBatch::pad(&[&warm], tokenizer.pad_id()))?;
    let load_seconds = started.elapsed().as_secs_f64();
    let quality = measure_quality(backend.as_mut(), &tokenizer)?;
    let batches = measure_batches(
        backend.as_mut(),
        &tokenizer,
        &config.batch_sizes,
        config.seconds_per_point,
    )?;
    let (_, peak_rss) = rss_bytes();
    let metrics = Arc::new(Metrics::new(&ModelInfo {
        model: MODEL_NAME.into(),
        variant: variant.name.clone(),
        precision: variant.precision.as_str().into(),
        device: config.device.to_string(),
    }));
    let limits = BatchLimits {
        max_queue: 4096,
        max_batch: config.max_batch,
        max_batch_tokens: 16384,
        max_wait: Duration::from_millis(5),
    };
    let ids = Arc::new(bench_ids(&tokenizer)?);
    let (batcher, task) = Batcher::start(backend, tokenizer.pad_id(), limits, metrics);
    let concurrency =
        measure_concurrency(&batcher, ids, &config.concurrency, config.seconds_per_point).await?;
    drop(batcher);
    task.await?;
    Ok(VariantProfile {
        variant: variant.name.clone(),
        precision: variant.precision.as_str().into(),
        device: config.device.to_string(),
        load_seconds,
        rss_bytes: peak_rss,
        quality,
        batches,
        concurrency,
        generation: None,
    })
}

/// Assembles the document.
pub fn document(config: &ProfileConfig, variants: Vec<VariantProfile>) -> Profile {
    Profile {
        schema: SCHEMA.into(),
        model: MODEL_NAME.into(),
        task: "embeddings".into(),
        machine: machine(config.device, config.load.threads),
        variants,
    }
}

/// A human-readable table of a profile.
pub fn table(profile: &Profile) -> String {
    use std::fmt::Write;
    let mut out = format!("{} on {}\n", profile.model, profile.machine.description);
    for v in &profile.variants {
        if let Some(g) = &v.generation {
            let _ = writeln!(
                out,
                "\n{}: load {:.2} s, peak RSS {:.0} MiB, weights {:.0} MiB, min cosine {:.6} to {}\n  \
                 prompt {:.1} tokens/s, generated {:.1} tokens/s alone, TTFT (32-token prompt) {:.0} ms",
                v.variant,
                v.load_seconds,
                v.rss_bytes as f64 / 1048576.0,
                g.weight_bytes as f64 / 1048576.0,
                v.quality.min_cosine,
                v.quality.reference,
                g.prompt_tokens_per_second,
                g.generated_tokens_per_second,
                g.ttft_ms
            );
            let _ = writeln!(out, "  sequences/step  step_ms  tokens/s");
            for b in &v.batches {
                let _ = writeln!(
                    out,
                    "  {:>14}  {:>7.1}  {:>8.1}",
                    b.batch_size, b.latency_ms, b.items_per_second
                );
            }
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} ({}, {}): load {:.2} s, peak RSS {:.0} MiB, min cosine {:.6} (loss {:.6}), mean {:.6}",
            v.variant,
            v.precision,
            v.device,
            v.load_seconds,
            v.rss_bytes as f64 / 1048576.0,
            v.quality.min_cosine,
            v.quality.quality_loss,
            v.quality.mean_cosine
        );
        let _ = writeln!(out, "  batch  latency_ms  items/s");
        for b in &v.batches {
            let _ = writeln!(
                out,
                "  {:>5}  {:>10.2}  {:>7.1}",
                b.batch_size, b.latency_ms, b.items_per_second
            );
        }
        let _ = writeln!(out, "  concurrency  p50_ms  p95_ms  items/s");
        for c in &v.concurrency {
            let _ = writeln!(
                out,
                "  {:>11}  {:>6.1}  {:>6.1}  {:>7.1}",
                c.concurrency, c.p50_ms, c.p95_ms, c.items_per_second
            );
        }
    }
    out
}

/// Reads a profile written by `profile --json`.
pub fn read(path: &Path) -> anyhow::Result<Profile> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}
