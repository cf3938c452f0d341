//! Scale benchmark of the operator: N ModelDeployments (scaling disabled, 0 replicas) on
//! a real API server. Measures the operator's RSS once settled, reconcile latency
//! quantiles from its own histogram, and the write calls of an idle resync (which must
//! be zero); then restarts the operator over the existing objects and measures its RSS
//! and write calls again (also zero), and prints a table with each figure against its
//! target.
//!
//!   cargo run --release -p kestrel-e2e --bin scale-bench -- [COUNT] [OPERATOR_BIN]
//!
//! Needs KUBECONFIG (the local cluster: `source e2e/cluster/env`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kestrel_crds::ModelDeployment;
use kestrel_e2e::{TestNamespace, wait_for};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};

const IDLE_RESYNC_SECONDS: u64 = 30;
/// After a restart, long enough for the operator's periodic heap trim (30 s) to run.
const RESTART_SETTLE_SECONDS: u64 = 40;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let bin = args
        .next()
        .unwrap_or_else(|| "target/release/kestrel-operator".into());
    // SAFETY of intent: only this process reads the variable, before any thread starts.
    unsafe { std::env::set_var("KESTREL_OPERATOR_BIN", &bin) };

    let mut ns = TestNamespace::new("scale-bench").await?;
    eprintln!(
        "[1/6] applying {count} ModelDeployments to namespace {}",
        ns.name
    );
    let api: Api<ModelDeployment> = ns.api();
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let namespace = ns.name.clone();
            async move {
                let md: ModelDeployment = serde_yaml::from_str(&format!(
                    r#"
apiVersion: kestrel.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: md-{i:04}, namespace: {namespace}}}
spec:
  model: {{name: all-MiniLM-L6-v2, task: embeddings, source: {{hostPath: {{path: /tmp}}}}}}
  variants: [{{name: f32, precision: f32}}]
  slo: {{p95LatencyMs: 200}}
  scaling: {{enabled: false}}
  replicas: 0
  worker: {{image: "kestrel-worker:dev"}}
"#
                ))?;
                api.patch(
                    &format!("md-{i:04}"),
                    &PatchParams::apply("scale-bench"),
                    &Patch::Apply(&md),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    eprintln!("      applied in {:.1}s", started.elapsed().as_secs_f64());

    let port = free_port();
    eprintln!(
        "[2/6] starting {bin} (metrics on 127.0.0.1:{port}, idle resync {IDLE_RESYNC_SECONDS}s)"
    );
    start_operator(&mut ns, port)?;
    let started = Instant::now();
    wait_for(
        "every ModelDeployment to have a status",
        Duration::from_secs(600),
        || async {
            let list = api.list_metadata(&ListParams::default()).await?;
            let done = api
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|md| {
                    md.status
                        .as_ref()
                        .and_then(|s| s.observed_generation)
                        .is_some()
                })
                .count();
            eprint!("\r      {done}/{} reconciled", list.items.len());
            Ok(done == count)
        },
    )
    .await?;
    let first_pass = started.elapsed();
    eprintln!("\n      all reconciled in {:.1}s", first_pass.as_secs_f64());

    eprintln!("[3/6] letting the first pass settle (requeues of unsettled objects)");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = scrape(port).await?;
    eprintln!(
        "[4/6] idle: waiting {}s for one full idle resync",
        IDLE_RESYNC_SECONDS + 15
    );
    tokio::time::sleep(Duration::from_secs(IDLE_RESYNC_SECONDS + 15)).await;
    let after = scrape(port).await?;
    let settled_rss_kib = rss_kib(&ns)?;

    eprintln!(
        "[5/6] restart: a new operator process over the {count} existing ModelDeployments and their objects"
    );
    ns.stop_operator().await?;
    let restart_port = free_port();
    start_operator(&mut ns, restart_port)?;
    let restarted = Instant::now();
    wait_for(
        "the restarted operator to reconcile every ModelDeployment",
        Duration::from_secs(600),
        || async {
            let done = match scrape(restart_port).await {
                Ok(m) => m.get(r#"kestrel_operator_reconciles_total{result="ok"}"#),
                Err(_) => 0.0,
            };
            eprint!("\r      {done:.0}/{count} reconciled");
            Ok(done >= count as f64)
        },
    )
    .await?;
    let restart_pass = restarted.elapsed();
    eprintln!(
        "\n      all reconciled in {:.1}s; settling {RESTART_SETTLE_SECONDS}s",
        restart_pass.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(RESTART_SETTLE_SECONDS)).await;
    let restart = scrape(restart_port).await?;
    let restart_rss_mib = rss_kib(&ns)? as f64 / 1024.0;

    eprintln!("[6/6] results");
    let reconciles = |m: &Scrape| m.get(r#"kestrel_operator_reconciles_total{result="ok"}"#);
    let writes = |m: &Scrape| m.sum_prefix("kestrel_operator_write_calls_total");
    let idle_reconciles = reconciles(&after) - reconciles(&before);
    let idle_writes = writes(&after) - writes(&before);
    let (p50, p99) = (after.quantile(0.50), after.quantile(0.99));
    let idle = after.minus(&before);
    let (idle_p50, idle_p99) = (idle.quantile(0.50), idle.quantile(0.99));
    let rss_mib = settled_rss_kib as f64 / 1024.0;
    println!("\nscale-bench: {count} ModelDeployments, operator {bin}");
    println!("| figure | measured | target | measured/target |");
    println!("|---|---|---|---|");
    println!(
        "| operator RSS after settling | {rss_mib:.1} MiB | ≤ 30 MiB | {:.2} |",
        rss_mib / 30.0
    );
    println!(
        "| reconcile p50, idle resync | {:.1} ms | - | - |",
        idle_p50 * 1000.0
    );
    println!(
        "| reconcile p99, idle resync | {:.1} ms | ≤ 50 ms | {:.2} |",
        idle_p99 * 1000.0,
        idle_p99 * 1000.0 / 50.0
    );
    println!(
        "| reconcile p50, whole run incl. first pass | {:.1} ms | - | - |",
        p50 * 1000.0
    );
    println!(
        "| reconcile p99, whole run incl. first pass | {:.1} ms | - | - |",
        p99 * 1000.0
    );
    println!(
        "| reconciles during the idle window | {idle_reconciles:.0} | ≥ {count} | {:.2} |",
        idle_reconciles / count as f64
    );
    println!("| write calls during the idle window | {idle_writes:.0} | 0 | - |");
    println!(
        "| first pass (all {count} reconciled) | {:.1} s | - | - |",
        first_pass.as_secs_f64()
    );
    println!("| write calls in total | {:.0} | - | - |", writes(&after));
    println!(
        "| operator RSS after a restart over the existing objects | {restart_rss_mib:.1} MiB | ≤ 30 MiB | {:.2} |",
        restart_rss_mib / 30.0
    );
    println!(
        "| restart: all {count} reconciled | {:.1} s | - | - |",
        restart_pass.as_secs_f64()
    );
    println!(
        "| write calls of the restarted operator | {:.0} | 0 | - |",
        // + 0.0: an empty sum is -0.0, printed "-0".
        writes(&restart) + 0.0
    );
    if idle_reconciles < count as f64 {
        bail!("the idle window saw only {idle_reconciles} reconciles: lengthen it");
    }
    Ok(())
}

/// Starts the operator with its metrics on `port` and the bench's idle resync.
fn start_operator(ns: &mut TestNamespace, port: u16) -> Result<()> {
    ns.start_operator(&[
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--idle-resync-seconds",
        &IDLE_RESYNC_SECONDS.to_string(),
        "--log-level",
        "warn",
    ])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(ns: &TestNamespace) -> Result<u64> {
    let pid = ns.operator_pid().context("the operator is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

/// One scrape of the operator's /metrics.
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn sum_prefix(&self, prefix: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// This scrape's counters minus an earlier one's (e.g. one window's histogram).
    fn minus(&self, earlier: &Scrape) -> Scrape {
        Scrape(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - earlier.get(k)))
                .collect(),
        )
    }

    /// Quantile of the reconcile duration histogram (linear within a bucket).
    fn quantile(&self, q: f64) -> f64 {
        let mut buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix("kestrel_operator_reconcile_duration_seconds_bucket{le=\"")?
                    .strip_suffix("\"}")?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    },
                    *v,
                ))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last().map_or(0.0, |b| b.1);
        let rank = q * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for (le, n) in buckets {
            if n >= rank {
                if le.is_infinite() {
                    return lo;
                }
                return lo + (le - lo) * (rank - below) / (n - below).max(1.0);
            }
            (lo, below) = (le, n);
        }
        lo
    }
}

async fn scrape(port: u16) -> Result<Scrape> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(Scrape(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect(),
    ))
}
