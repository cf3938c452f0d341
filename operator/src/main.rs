//! The kestrel-operator binary: flags, logging, leader election, the metrics and health
//! server, and the controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, ValueEnum};
use kestrel_operator::autoscale::Profiles;
use kestrel_operator::config::PriceTable;
use kestrel_operator::controller::{self, Config, Shared};
use kestrel_operator::events::Publisher;
use kestrel_operator::leader::LeaderElector;
use kestrel_operator::metrics::Metrics;
use kestrel_operator::signals::{MetricsSource, NoMetrics};
use kestrel_policy::profile::WorkerProfile;
use kube::Client;
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// Kestrel: autoscaled model serving on Kubernetes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Worker image for ModelDeployments that do not set spec.worker.image.
    #[arg(long, env = "KESTREL_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Replica prices per hour: `cpu=0.10,nvidia=2.50,<gpu product>=<price per GPU>,…`.
    #[arg(long, env = "KESTREL_PRICES", default_value = "cpu=0.10,nvidia=2.50")]
    prices: String,
    /// Prometheus base URL (e.g. http://prometheus:9090). Without it, autoscaled
    /// ModelDeployments hold their replicas and report MetricsAvailable=False.
    #[arg(long, env = "KESTREL_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Seconds between evaluations of an autoscaled ModelDeployment.
    #[arg(
        long,
        env = "KESTREL_EVALUATION_INTERVAL_SECONDS",
        default_value_t = 10
    )]
    evaluation_interval_seconds: u64,
    /// Seconds between re-checks of a settled ModelDeployment with scaling disabled.
    #[arg(long, env = "KESTREL_IDLE_RESYNC_SECONDS", default_value_t = 300)]
    idle_resync_seconds: u64,
    /// Window of the rate and quantile queries, seconds.
    #[arg(long, env = "KESTREL_SIGNAL_WINDOW_SECONDS", default_value_t = 30)]
    signal_window_seconds: u32,
    /// Worker profile JSON files (`kestrel-worker profile --json`), comma-separated: the
    /// capacity data of each variant. Default: the profile bundled with the operator.
    #[arg(long, env = "KESTREL_PROFILES", value_delimiter = ',')]
    profiles: Vec<std::path::PathBuf>,
    /// Namespaces to watch, comma-separated; empty: all namespaces.
    #[arg(
        long,
        env = "KESTREL_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KESTREL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "KESTREL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "KESTREL_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Elect a leader through a Lease so only one replica writes.
    #[arg(long, env = "KESTREL_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "KESTREL_LEASE_NAME", default_value = "kestrel-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One malloc arena, set before any thread starts: the operator's threads mostly wait
    // on the network, and per-thread arenas each kept their own freed pages (about 3 MiB
    // of RSS per thread with 1,000 ModelDeployments).
    // SAFETY: mallopt only changes glibc's allocator settings; no other thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("failed to parse --log-level {:?}", args.log_level))?;
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let prices = PriceTable::parse(&args.prices)
        .map_err(|e| anyhow::anyhow!("failed to parse --prices: {e}"))?;
    let client = Client::try_default()
        .await
        .context("failed to build a Kubernetes client")?;
    let metrics = Metrics::default();
    tokio::spawn(return_freed_memory());
    let ready = Arc::new(AtomicBool::new(false));
    serve_health(args.metrics_addr, metrics.clone(), ready.clone()).await?;

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("kestrel-operator-{}", std::process::id()));
    let (lost_tx, lost_rx) = watch::channel(false);
    if args.leader_election {
        let elector = LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(15),
        );
        info!(identity, lease = %args.lease_name, "waiting to lead");
        ready.store(true, Ordering::SeqCst);
        loop {
            match elector.try_lead().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => error!(error = %e, "failed to read or take the leader lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown_signal() => return Ok(()),
            }
        }
        info!(identity, "leading");
        metrics.leader.set(1);
        tokio::spawn(async move {
            let mut misses = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                match elector.try_lead().await {
                    Ok(true) => misses = 0,
                    Ok(false) => {
                        error!("lost the leader lease to another replica; stopping");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    // Keep leading through a blip shorter than the lease.
                    Err(e) if misses < 1 => {
                        misses += 1;
                        error!(error = %e, "failed to renew the leader lease");
                    }
                    Err(e) => {
                        error!(error = %e, "failed to renew the leader lease twice; stopping");
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        });
    }
    ready.store(true, Ordering::SeqCst);

    let signals: Arc<dyn MetricsSource> = match &args.prometheus_url {
        Some(url) => Arc::new(kestrel_operator::signals::prometheus::PrometheusSource::new(url)?),
        None => Arc::new(NoMetrics),
    };
    let config = Config {
        default_image: args.worker_image.clone(),
        prices,
        evaluation_interval: Duration::from_secs(args.evaluation_interval_seconds),
        idle_resync: Duration::from_secs(args.idle_resync_seconds),
        signal_window_seconds: args.signal_window_seconds,
        profiles: load_profiles(&args.profiles)?,
    };
    let shared = Shared {
        client: client.clone(),
        events: Arc::new(Publisher::new(client, "kestrel-operator", &identity)),
        metrics,
        config,
        signals,
    };
    let namespaces: Vec<Option<String>> = {
        let listed: Vec<_> = args
            .watch_namespaces
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .map(Some)
            .collect();
        if listed.is_empty() {
            vec![None]
        } else {
            listed
        }
    };
    info!(namespaces = ?namespaces, prometheus = ?args.prometheus_url, "starting the ModelDeployment controller");
    let runs = namespaces.into_iter().map(|ns| {
        let mut lost = lost_rx.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown_signal() => info!("shutting down"),
                _ = lost.wait_for(|l| *l) => {}
            }
        };
        controller::run(shared.clone(), ns, stop)
    });
    futures::future::join_all(runs).await;
    if *lost_rx.borrow() {
        anyhow::bail!("stopped after losing the leader lease");
    }
    Ok(())
}

fn load_profiles(paths: &[std::path::PathBuf]) -> anyhow::Result<Profiles> {
    if paths.is_empty() {
        return Ok(Profiles::bundled());
    }
    let profiles = paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("failed to read profile {}", p.display()))?;
            WorkerProfile::from_json(&text)
                .with_context(|| format!("failed to parse profile {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Profiles(profiles))
}

/// Hands freed heap pages back to the system every 30 s. Watch events are parsed whole
/// (managed fields and all) and then slimmed for the caches, so the heap is full of
/// small holes; glibc returns only the top of each arena on its own, which left the
/// operator's RSS at twice its live heap (docs/benchmarks.md, operator scale).
async fn return_freed_memory() {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim only releases free pages of glibc's own arenas; it takes
        // the arenas' locks and touches no memory the program owns.
        unsafe { libc::malloc_trim(0) };
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn serve_health(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(Metrics, Arc<AtomicBool>)>| async move { m.encode() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((_, r)): State<(Metrics, Arc<AtomicBool>)>| async move {
                    if r.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                },
            ),
        )
        .with_state((metrics, ready));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind {addr}"))?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "health server stopped");
        }
    });
    Ok(())
}
