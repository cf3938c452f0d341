//! `kestrel-worker profile` on a GGUF folder: per variant, load time, peak RSS,
//! quality against the reference (the shipped Q4_K_M weights in f32, transformers),
//! the prompt pass's speed, time to first token, and decode steps against the number
//! of sequences decoded together, in the worker-profile schema.

use std::path::Path;
use std::time::Instant;

use super::model::{Gemma3, argmax, to_vec, with_values};
use super::quality::logits_cosines;
use super::{MODEL_NAME, load_model};
use crate::profile::{
    BatchPoint, GenerationFigures, Machine, Profile, Quality, SCHEMA, VariantProfile,
};

/// What the quality figures compare against.
pub const REFERENCE: &str = "q4_k_m: the shipped Q4_K_M weights computed in f32 by transformers (worker/data/gemma-reference.json)";

fn prompt_of(tokens: usize) -> Vec<u32> {
    // <bos> then ordinary word tokens; the content does not matter for speed.
    let mut ids = vec![2u32];
    ids.extend((0..tokens - 1).map(|i| 1000 + (i as u32 * 7919) % 50_000));
    ids
}

/// Median seconds of `f` over `runs` runs.
fn median_secs(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Decode-step latency with `n` sequences of about 64 positions each.
fn decode_point(model: &Gemma3, n: usize, steps: usize) -> anyhow::Result<BatchPoint> {
    let prompt = prompt_of(64);
    let mut seqs: Vec<_> = (0..n).map(|_| model.new_sequence()).collect();
    let mut next = Vec::with_capacity(n);
    for s in seqs.iter_mut() {
        next.push(argmax(&to_vec(&model.prefill(s, &prompt)?)?));
    }
    let started = Instant::now();
    for _ in 0..steps {
        let mut refs: Vec<&mut _> = seqs.iter_mut().collect();
        let logits = model.decode(&mut refs, &next)?;
        with_values(&logits, |flat| {
            let vocab = flat.len() / n;
            for (i, t) in next.iter_mut().enumerate() {
                *t = argmax(&flat[i * vocab..(i + 1) * vocab]);
            }
        })?;
    }
    let step = started.elapsed().as_secs_f64() / steps as f64;
    Ok(BatchPoint {
        batch_size: n,
        latency_ms: step * 1e3,
        items_per_second: n as f64 / step,
    })
}

pub fn profile_variant(
    dir: &Path,
    variant: &str,
    batch_sizes: &[usize],
    steps: usize,
) -> anyhow::Result<VariantProfile> {
    let started = Instant::now();
    let (model, tok) = load_model(dir, variant, 2048)?;
    let warm = prompt_of(8);
    model.prefill(&mut model.new_sequence(), &warm)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let cos = logits_cosines(&model, &tok)?;
    let min_cosine = cos.iter().copied().fold(1.0, f64::min);
    let mean_cosine = cos.iter().sum::<f64>() / cos.len() as f64;
    let p128 = prompt_of(128);
    let prefill = median_secs(3, || {
        model.prefill(&mut model.new_sequence(), &p128)?;
        Ok(())
    })?;
    let p32 = prompt_of(32);
    let ttft = median_secs(3, || {
        let l = to_vec(&model.prefill(&mut model.new_sequence(), &p32)?)?;
        argmax(&l);
        Ok(())
    })?;
    let batches = batch_sizes
        .iter()
        .map(|&n| decode_point(&model, n, steps))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let alone = batches
        .iter()
        .find(|b| b.batch_size == 1)
        .map(|b| b.items_per_second)
        .unwrap_or(f64::NAN);
    let (_, peak) = crate::profile::rss_bytes();
    Ok(VariantProfile {
        variant: variant.into(),
        precision: variant.into(),
        device: "cpu".into(),
        load_seconds,
        rss_bytes: peak,
        quality: Quality {
            reference: REFERENCE.into(),
            min_cosine,
            mean_cosine,
            quality_loss: 1.0 - min_cosine,
        },
        batches,
        concurrency: Vec::new(),
        generation: Some(GenerationFigures {
            prompt_tokens_per_second: 128.0 / prefill,
            generated_tokens_per_second: alone,
            ttft_ms: ttft * 1e3,
            weight_bytes: model.weight_bytes as u64,
        }),
    })
}

pub fn document(machine: Machine, variants: Vec<VariantProfile>) -> Profile {
    Profile {
        schema: SCHEMA.into(),
        model: MODEL_NAME.into(),
        task: "text-generation".into(),
        machine,
        variants,
    }
}
