//! The text-generation task: Gemma 3 from a GGUF folder (see `worker/scripts/fetch-gemma`).
//!
//! `model` runs Gemma 3 with per-sequence KV caches and batched decode steps,
//! `scheduler` owns the sequences (continuous batching, bounded admission), `api` is
//! the OpenAI-compatible surface, `variants` names and makes the GGUF variants.

pub mod api;
pub mod bench;
pub mod model;
pub mod profile;
pub mod quality;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
pub mod variants;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::info;

use crate::metrics::{Metrics, ModelInfo};
pub use model::Gemma3;
pub use scheduler::{GenLimits, Generator};
pub use tokenizer::GemmaTokenizer;
pub use variants::{SHIPPED_VARIANT, VARIANTS, is_gguf_folder, variant_file};

/// Name of the model this task serves.
pub const MODEL_NAME: &str = "gemma-3-270m";

#[derive(Debug, Clone)]
pub struct TextServeConfig {
    pub model_dir: PathBuf,
    pub variant: String,
    pub addr: SocketAddr,
    pub limits: GenLimits,
    /// Prompt + generated tokens per sequence, at most.
    pub max_context: usize,
    pub drain_delay: Duration,
}

/// Loads a variant: its GGUF and the folder's tokenizer.
pub fn load_model(
    dir: &Path,
    variant: &str,
    max_context: usize,
) -> anyhow::Result<(Gemma3, GemmaTokenizer)> {
    let file = variant_file(dir, variant).map_err(anyhow::Error::msg)?;
    let tokenizer = GemmaTokenizer::load(dir).map_err(anyhow::Error::msg)?;
    let model = Gemma3::load(&file, max_context)
        .with_context(|| format!("failed to load {}", file.display()))?;
    Ok((model, tokenizer))
}

/// A loaded, warmed model behind a running engine.
pub struct LoadedText {
    pub state: api::TextState,
    pub engine: std::thread::JoinHandle<()>,
    pub load_seconds: f64,
}

pub async fn load(config: &TextServeConfig) -> anyhow::Result<LoadedText> {
    let started = Instant::now();
    let (dir, variant, ctx) = (
        config.model_dir.clone(),
        config.variant.clone(),
        config.max_context,
    );
    let (model, tokenizer) = tokio::task::spawn_blocking(move || {
        let (model, tok) = load_model(&dir, &variant, ctx)?;
        // Warm-up: one prompt pass and one decode step; readiness waits for it.
        let mut seq = model.new_sequence();
        let ids = tok.encode("kestrel warm-up").map_err(anyhow::Error::msg)?;
        model.prefill(&mut seq, &ids)?;
        model.decode(&mut [&mut seq], &[ids[ids.len() - 1]])?;
        anyhow::Ok((model, tok))
    })
    .await
    .context("the loading thread panicked")?
    .with_context(|| {
        format!(
            "failed to load variant {} from {}",
            config.variant,
            config.model_dir.display()
        )
    })?;
    let max_context = model.max_positions();
    let load_seconds = started.elapsed().as_secs_f64();
    info!(
        variant = %config.variant,
        weight_bytes = model.weight_bytes,
        max_context,
        load_seconds,
        "model loaded and warmed"
    );
    let metrics = Arc::new(Metrics::new_generation(&ModelInfo {
        model: MODEL_NAME.to_string(),
        variant: config.variant.clone(),
        precision: config.variant.clone(),
        device: "cpu".to_string(),
    }));
    let tokenizer = Arc::new(tokenizer);
    let (generator, engine) = Generator::start(
        model,
        tokenizer.clone(),
        config.limits.clone(),
        metrics.clone(),
    );
    let state = api::TextState {
        generator,
        tokenizer,
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
        model_name: MODEL_NAME.to_string(),
        max_context,
        next_id: Arc::new(AtomicU64::new(1)),
    };
    Ok(LoadedText {
        state,
        engine,
        load_seconds,
    })
}

/// Serves until SIGTERM, then drains as the embeddings task does (see `serve`).
pub async fn serve(config: TextServeConfig) -> anyhow::Result<()> {
    let LoadedText { state, engine, .. } = load(&config).await?;
    let admission = state.generator.admission().clone();
    let ready = state.ready.clone();
    crate::serve::serve_until_drained(
        config.addr,
        api::router(state),
        ready,
        config.drain_delay,
        admission.clone(),
    )
    .await?;
    let admitted = admission.admitted_total();
    tokio::task::spawn_blocking(move || engine.join())
        .await
        .context("failed to wait for the engine")?
        .map_err(|_| anyhow::anyhow!("the generation engine panicked"))?;
    info!(admitted, "drained; exiting");
    Ok(())
}
