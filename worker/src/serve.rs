//! `kestrel-worker serve`: load, warm, serve, and drain on SIGTERM.
//!
//! Drain order: `/ready` turns false at once; requests are still served for the drain
//! delay (while endpoint removal propagates), each answer with `Connection: close` so
//! that keep-alive clients reconnect through the Service to a pod that stays; then the
//! listener closes, idle connections close, every request already read is answered,
//! and the process exits 0. A request that reached the worker is never refused for
//! draining: behind kube-proxy, a pooled connection keeps reaching a terminating pod
//! after its endpoint is gone, and a 503 there is a failed request for the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::info;

use crate::api::{AppState, router};
use crate::batcher::{BatchLimits, Batcher};
use crate::engine::{
    Device, LoadOptions, LongInput, MODEL_NAME, TextTokenizer, VariantSpec, load_backend,
};
use crate::metrics::{Metrics, ModelInfo};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    pub variant: VariantSpec,
    pub device: Device,
    pub load: LoadOptions,
    pub addr: SocketAddr,
    pub limits: BatchLimits,
    pub drain_delay: Duration,
    pub request_timeout: Duration,
    pub max_inputs: usize,
    pub long_input: LongInput,
}

/// A loaded, warmed model behind a running batcher.
pub struct Loaded {
    pub state: AppState,
    pub batcher_task: tokio::task::JoinHandle<()>,
    pub load_seconds: f64,
}

/// Loads the tokenizer and variant, warms it with one batch and starts the batcher.
pub async fn load(config: &ServeConfig) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let tokenizer = Arc::new(TextTokenizer::load(&config.model_dir)?);
    let (dir, variant, options) = (
        config.model_dir.clone(),
        config.variant.clone(),
        config.load.clone(),
    );
    let tok = tokenizer.clone();
    let (backend, dimension) = tokio::task::spawn_blocking(move || {
        let mut backend = load_backend(&dir, &variant, &options)?;
        // Warm-up: the first run allocates and plans; readiness waits for it.
        let warm: Vec<Vec<u32>> = [
            "kestrel warm-up",
            "a second, slightly longer warm-up sentence",
        ]
        .iter()
        .map(|s| tok.encode(s).map(|e| e.ids))
        .collect::<Result<_, _>>()?;
        let seqs: Vec<&[u32]> = warm.iter().map(Vec::as_slice).collect();
        backend.embed(&crate::engine::TokenBatch::pad(&seqs, tok.pad_id()))?;
        let dim = backend.dimension();
        anyhow::Ok((backend, dim))
    })
    .await
    .context("the loading thread panicked")?
    .with_context(|| {
        format!(
            "failed to load variant {} from {}",
            config.variant.name,
            config.model_dir.display()
        )
    })?;
    let load_seconds = started.elapsed().as_secs_f64();
    let metrics = Arc::new(Metrics::new(&ModelInfo {
        model: MODEL_NAME.to_string(),
        variant: config.variant.name.clone(),
        precision: config.variant.precision.as_str().to_string(),
        device: config.device.to_string(),
    }));
    let (batcher, batcher_task) = Batcher::start(
        backend,
        tokenizer.pad_id(),
        config.limits.clone(),
        metrics.clone(),
    );
    info!(
        variant = %config.variant.name,
        backend = config.variant.backend.as_str(),
        device = %config.device,
        dimension,
        load_seconds,
        "model loaded and warmed"
    );
    let state = AppState {
        batcher,
        tokenizer,
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
        model_name: MODEL_NAME.to_string(),
        dimension,
        max_inputs: config.max_inputs,
        long_input: config.long_input,
        request_timeout: config.request_timeout,
    };
    Ok(Loaded {
        state,
        batcher_task,
        load_seconds,
    })
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let Loaded {
        state,
        batcher_task,
        ..
    } = load(&config).await?;
    let admission = state.batcher.admission().clone();
    let ready = state.ready.clone();
    serve_until_drained(
        config.addr,
        router(state),
        ready,
        config.drain_delay,
        admission.clone(),
    )
    .await?;
    // The router (and its batcher handles) is gone: the batcher ends once its queue is empty.
    let admitted = admission.admitted_total();
    batcher_task.await.context("the batcher task panicked")?;
    // Every admitted request has been answered (or its client left): tests read this.
    info!(admitted, "drained; exiting");
    Ok(())
}

/// Serves `app` on `addr` until SIGTERM or SIGINT, then drains in the order the module
/// doc gives: `ready` turns false, requests are served (and their connections closed)
/// for `drain_delay`, then the server stops reading new requests and returns once every
/// open one is answered. `admission` gives the drain log its counts. Shared by both
/// tasks.
pub(crate) async fn serve_until_drained(
    addr: SocketAddr,
    app: axum::Router,
    ready: Arc<AtomicBool>,
    drain_delay: Duration,
    admission: crate::admission::Admission,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {addr}"))?;
    let addr = listener.local_addr()?;
    info!(%addr, "listening");

    let closing = ready.clone();
    let app = app.layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let draining = !closing.load(Ordering::SeqCst);
            async move {
                if draining {
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        },
    ));
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = tokio::spawn(async move {
        wait_for_termination().await;
        ready.store(false, Ordering::SeqCst);
        info!(
            delay_seconds = drain_delay.as_secs_f64(),
            "termination requested: not ready, draining"
        );
        tokio::time::sleep(drain_delay).await;
        info!(
            waiting = admission.waiting(),
            "closing the listener; answering the requests already read"
        );
        let _ = shutdown_tx.send(());
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = shutdown_rx.await;
        })
        .await
        .context("the HTTP server failed");
    drain.abort();
    served
}

async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("failed to install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
