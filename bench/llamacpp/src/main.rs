//! llama.cpp generating from the same Gemma-3-270M GGUF files as the worker: the second
//! baseline of `kestrel-worker bench-generation` (docs/benchmarks.md).
//!
//! Measured like the transformers baseline: batches of `c` prompts (the bench's four,
//! in turn) decoded together, `--max-tokens` new tokens each, greedy; one llama.cpp
//! context holds the `c` sequences (continuous batching's best case: they start and end
//! together). tokens/s counts generated tokens over the wall time of whole batches,
//! prompt passes included; TTFT is a batch's prompt pass; inter-token latency is a
//! decode step. Prints the bench's markdown rows. Loopback-free: no network at all.
//!
//! ```sh
//! cargo run --release --manifest-path bench/llamacpp/Cargo.toml -- \
//!     .cache/models/gemma-3-270m/gemma-3-270m-q8_0.gguf --concurrency 1,4,16 \
//!     --seconds 15 --max-tokens 32 --threads 2
//! ```

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

/// The worker bench's prompts (`worker/src/textgen/bench.rs`, `PROMPTS`).
const PROMPTS: &[&str] = &[
    "Write a short story about a kestrel hovering over a field.",
    "Explain how a Kubernetes operator reconciles a custom resource.",
    "The history of the bicycle begins in",
    "List three reasons to batch requests when serving a language model:",
];

struct Args {
    gguf: PathBuf,
    concurrency: Vec<usize>,
    seconds: f64,
    max_tokens: usize,
    threads: i32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        gguf: PathBuf::new(),
        concurrency: vec![1, 4, 16],
        seconds: 15.0,
        max_tokens: 32,
        threads: 2,
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--concurrency" => {
                parsed.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|c| c.parse().context("--concurrency: a list of integers"))
                    .collect::<anyhow::Result<_>>()?
            }
            "--seconds" => parsed.seconds = value("--seconds")?.parse()?,
            "--max-tokens" => parsed.max_tokens = value("--max-tokens")?.parse()?,
            "--threads" => parsed.threads = value("--threads")?.parse()?,
            flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
            path => parsed.gguf = PathBuf::from(path),
        }
    }
    if parsed.gguf.as_os_str().is_empty() {
        bail!(
            "usage: kestrel-llamacpp-bench GGUF [--concurrency 1,4,16] [--seconds 15] [--max-tokens 32] [--threads 2]"
        );
    }
    Ok(parsed)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as i32
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args.gguf, &LlamaModelParams::default())
        .with_context(|| format!("llama.cpp cannot load {}", args.gguf.display()))?;
    let vocab = model.vocab();
    let prompts: Vec<Vec<LlamaToken>> = PROMPTS
        .iter()
        .map(|p| vocab.tokenize(p.as_bytes(), true, false))
        .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let variant = args
        .gguf
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("?")
        .rsplit('-')
        .next()
        .unwrap_or("?")
        .to_string();
    let mut first_rate = None;
    for &c in &args.concurrency {
        let n_ctx = (c * (longest + args.max_tokens + 8)).max(256) as u32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx.min(512))
            .with_n_seq_max(c as u32)
            .with_n_threads(args.threads)
            .with_n_threads_batch(args.threads);
        let mut ctx = model.new_context(&backend, params)?;
        let mut batch = LlamaBatch::new(n_ctx as usize, c as i32);
        let (mut ttft, mut itl) = (Vec::new(), Vec::new());
        let mut generated = 0usize;
        let mut turn = 0usize;
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(args.seconds);
        while Instant::now() < deadline {
            ctx.clear_kv_cache();
            batch.clear();
            let batch_start = Instant::now();
            let mut positions = Vec::with_capacity(c);
            let mut logit_at = Vec::with_capacity(c);
            for s in 0..c {
                let prompt = &prompts[(turn + s) % prompts.len()];
                for (p, &t) in prompt.iter().enumerate() {
                    batch.add(t, p as i32, &[s as i32], p + 1 == prompt.len())?;
                }
                positions.push(prompt.len() as i32);
                logit_at.push(batch.n_tokens() - 1);
            }
            turn += c;
            ctx.decode(&mut batch)?;
            let mut next: Vec<i32> = logit_at
                .iter()
                .map(|&i| argmax(ctx.get_logits_ith(i)))
                .collect();
            ttft.push(batch_start.elapsed().as_secs_f64() * 1e3);
            generated += c;
            for _ in 1..args.max_tokens {
                let step = Instant::now();
                batch.clear();
                for s in 0..c {
                    batch.add(LlamaToken(next[s]), positions[s], &[s as i32], true)?;
                    positions[s] += 1;
                }
                ctx.decode(&mut batch)?;
                for (s, t) in next.iter_mut().enumerate() {
                    *t = argmax(ctx.get_logits_ith(s as i32));
                }
                itl.push(step.elapsed().as_secs_f64() * 1e3);
                generated += c;
            }
        }
        let rate = generated as f64 / started.elapsed().as_secs_f64();
        let base = *first_rate.get_or_insert(rate);
        println!(
            "| llama.cpp | {variant} | {c} | {} | {rate:.1} | {:.2}x | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
            ttft.len() * c,
            rate / base,
            percentile(&mut ttft, 0.5),
            percentile(&mut ttft, 0.95),
            percentile(&mut itl, 0.5),
            percentile(&mut itl, 0.95),
            rss_mib()
        );
    }
    Ok(())
}
