//! Bounded load against a ModelDeployment's embeddings route, replaying an Azure trace
//! (time-compressed) or a fixed rate, while sampling the ModelDeployment's status; ends
//! with a summary table. Used by `make demo`.
//!
//!   kestrel-load --url http://IP:8080/v1/embeddings --namespace search --name minilm \
//!       [--trace FILE --speedup 20 | --rate 50] [--seconds 90] [--max-in-flight 256]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kestrel_crds::ModelDeployment;
use kestrel_e2e::load::{azure_trace, fixed_rate, run};
use kube::{Api, Client};

struct Args {
    url: String,
    namespace: String,
    name: String,
    trace: Option<String>,
    speedup: f64,
    rate: f64,
    seconds: u64,
    max_in_flight: usize,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        url: String::new(),
        namespace: "default".into(),
        name: String::new(),
        trace: None,
        speedup: 20.0,
        rate: 50.0,
        seconds: 90,
        max_in_flight: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value()?,
            "--namespace" => a.namespace = value()?,
            "--name" => a.name = value()?,
            "--trace" => a.trace = Some(value()?),
            "--speedup" => a.speedup = value()?.parse().context("--speedup")?,
            "--rate" => a.rate = value()?.parse().context("--rate")?,
            "--seconds" => a.seconds = value()?.parse().context("--seconds")?,
            "--max-in-flight" => a.max_in_flight = value()?.parse().context("--max-in-flight")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.url.is_empty() || a.name.is_empty() {
        bail!("--url and --name are required");
    }
    // Bounded in count and time: a run never exceeds 10 minutes.
    a.seconds = a.seconds.min(600);
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse()?;
    let limit = Duration::from_secs(args.seconds);
    let schedule = match &args.trace {
        Some(path) => {
            let csv =
                std::fs::read_to_string(path).with_context(|| format!("failed to read {path}"))?;
            azure_trace(&csv, args.speedup, limit)?
        }
        None => fixed_rate(args.rate, limit),
    };
    println!(
        "load: {} requests over {} s ({}), at most {} in flight, to {}",
        schedule.len(),
        args.seconds,
        args.trace
            .as_deref()
            .map_or(format!("{} req/s", args.rate), |t| format!(
                "{t} at {}x",
                args.speedup
            )),
        args.max_in_flight,
        args.url
    );

    let client = Client::try_default()
        .await
        .context("failed to build a Kubernetes client")?;
    let mds: Api<ModelDeployment> = Api::namespaced(client, &args.namespace);
    let sampler = {
        let (mds, name) = (mds.clone(), args.name.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut rows = Vec::new();
            loop {
                if let Ok(md) = mds.get(&name).await {
                    let s = md.status.unwrap_or_default();
                    let sig = s.signals.unwrap_or_default();
                    let row = format!(
                        "| {:>5.0} | {:>7} | {:>7} | {:>7} | {:>6} | {:>7} | {} |",
                        start.elapsed().as_secs_f64(),
                        s.ready.unwrap_or_default(),
                        s.active_variant.unwrap_or_default(),
                        sig.p95_latency_ms.map_or("-".into(), |p| p.to_string()),
                        sig.queue_depth.map_or("-".into(), |q| format!("{q:.1}")),
                        s.cost_per_hour.unwrap_or_default(),
                        s.last_decision.map(|d| d.reason).unwrap_or_default()
                    );
                    println!("{row}");
                    rows.push(row);
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    println!("| t (s) | ready   | variant | p95(ms) | queue  | cost/h  | last decision |");
    let report = run(
        &args.url,
        &schedule,
        args.max_in_flight,
        "A man is eating food.",
    )
    .await;
    sampler.abort();

    println!("\nsummary");
    println!(
        "| requests scheduled | sent | ok | 429 | failed | skipped (client cap) | p50 ms | p95 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
        schedule.len(),
        report.sent,
        report.ok,
        report.rejected,
        report.failed,
        report.skipped,
        report.quantile_ms(0.5),
        report.quantile_ms(0.95),
        report.quantile_ms(0.99)
    );
    Ok(())
}
