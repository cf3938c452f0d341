//! kestrel-sim: replays a request trace through a model of serving replicas under
//! Kestrel's policy and the anchors' (HPA, Knative KPA, Ray Serve, static peak), and
//! reports SLO attainment, p95, replica-hours, cost, scale events and rejections.
//!
//! `cargo run --release -p kestrel-policy --bin kestrel-sim -- --trace FILE [--json] [--plot FILE.png]`

mod model;
mod plot;
mod policies;
mod rng;
mod trace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kestrel_policy::profile::WorkerProfile;
use kestrel_policy::{Budget, BudgetPolicy, PolicyMemory, ScalingLimits, Targets, Tuning};
use serde::Serialize;

use model::{Autoscaler, ModelConfig, RunResult, SimVariant};
use policies::{Hpa, Kestrel, Kpa, Limits, RayServe, StaticPeak, variant_specs};
use rng::Rng;

/// The profile used when `--profile` is not given.
const DEFAULT_PROFILE: &str = include_str!("../../../../../worker/profiles/cpu-2core-xeon.json");

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kestrel-sim",
    about = "Replay a request trace against Kestrel's and the anchors' autoscaling policies"
)]
struct Args {
    /// Trace in the Azure LLM CSV schema (TIMESTAMP,ContextTokens,GeneratedTokens).
    #[arg(long, required_unless_present = "synthetic")]
    trace: Option<PathBuf>,
    /// Generate a seeded synthetic trace instead of reading one.
    #[arg(long, value_enum, conflicts_with = "trace")]
    synthetic: Option<trace::Shape>,
    /// Synthetic trace: duration in seconds.
    #[arg(long, default_value_t = 3600.0)]
    synthetic_duration_s: f64,
    /// Synthetic trace: base rate (requests/s).
    #[arg(long, default_value_t = 100.0)]
    synthetic_base: f64,
    /// Synthetic trace: peak rate (requests/s).
    #[arg(long, default_value_t = 1000.0)]
    synthetic_peak: f64,
    /// Compress time by this factor (2 = the trace plays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Multiply the request rate by this factor (each request copied, jittered).
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Copies made by --rate-scale are shifted uniformly within ± this many seconds.
    /// The default (±5 s) keeps the trace's shape at the 10 s scale its burstiness is
    /// measured at, without turning each request into a clump of copies within a second.
    #[arg(long, default_value_t = 5.0)]
    jitter_s: f64,
    /// Only the first this-many seconds of the (compressed) trace.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Seed for every random choice (trace scaling, routing, service-time jitter).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker profile JSON (default: the worker's measured worker/profiles/cpu-2core-xeon.json).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Variants Kestrel may choose from, comma-separated (default: all in the profile).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// The one variant the anchors run (default: the first of --variants).
    #[arg(long)]
    anchor_variant: Option<String>,
    /// Prices per replica-hour, e.g. `f32=1.0,int8=0.6` (default 1.0 each).
    #[arg(long, value_delimiter = ',')]
    price: Vec<String>,
    /// The p95 latency target, ms.
    #[arg(long, default_value_t = 200.0)]
    p95_target_ms: f64,
    /// Requests in the system per replica to aim for (every policy's concurrency target).
    #[arg(long, default_value_t = 8.0)]
    target_queue: f64,
    #[arg(long, default_value_t = 1)]
    min_replicas: u32,
    #[arg(long, default_value_t = 50)]
    max_replicas: u32,
    /// Replicas every autoscaled policy starts with (Ready at time 0).
    #[arg(long, default_value_t = 2)]
    initial_replicas: u32,
    #[arg(long, default_value_t = 300.0)]
    scale_down_delay_s: f64,
    #[arg(long, default_value_t = 0.5)]
    max_scale_down_fraction: f64,
    /// Budget per hour for Kestrel (none by default).
    #[arg(long)]
    budget: Option<f64>,
    /// What gives way when the budget and the SLO conflict.
    #[arg(long, value_enum, default_value = "hold-budget")]
    budget_policy: BudgetChoice,
    /// Most quality loss (1 − min cosine) a variant may have.
    #[arg(long)]
    max_quality_loss: Option<f64>,
    /// Seconds from a replica's creation to Ready (scheduling, start, model load, warm-up).
    #[arg(long, default_value_t = 20.0)]
    cold_start_s: f64,
    /// Waiting requests a replica admits before answering 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest batch a replica runs (default: the profile's largest).
    #[arg(long)]
    max_batch: Option<u32>,
    /// Service times vary uniformly within ± this fraction.
    #[arg(long, default_value_t = 0.1)]
    service_jitter: f64,
    /// At most this many replicas fit on the nodes; more stay Pending as Unschedulable.
    #[arg(long)]
    max_scheduled: Option<u32>,
    /// Prometheus scrape interval, s.
    #[arg(long, default_value_t = 5.0)]
    scrape_s: f64,
    /// Extra delay before a scrape is visible to queries (rule evaluation, query), s.
    #[arg(long, default_value_t = 2.0)]
    metric_lag_s: f64,
    /// Policies to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kestrel,hpa,kpa,ray-serve,static-peak"
    )]
    policies: Vec<String>,
    /// Print `{"policies":[…]}` instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw replicas and p95 over time for each policy into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// TrueType font for the plot's text (default: DejaVuSans if installed; else no text).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Print each Kestrel decision that changed the fleet (time, reason, message) to stderr.
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BudgetChoice {
    HoldBudget,
    HoldSlo,
}

/// One row of `--json` output: exactly these fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct PolicyReport {
    name: String,
    slo_attainment: f64,
    p95_ms: f64,
    replica_hours: f64,
    cost: f64,
    scale_events: u64,
    rejected: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    policies: Vec<PolicyReport>,
}

/// Everything a run needs besides the arrivals.
struct Setup {
    model: ModelConfig,
    allowed: Vec<bool>,
    anchor: usize,
    limits: Limits,
    args: Args,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kestrel-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<(), String> {
    let arrivals = load_arrivals(&args)?;
    let setup = setup(args)?;
    let mut results = Vec::new();
    for name in setup.args.policies.clone() {
        let (result, extra) = run_policy(&name, &arrivals, &setup)?;
        if setup.args.explain {
            for line in &extra {
                eprintln!("{name}: {line}");
            }
        }
        results.push((name, result));
    }
    let reports: Vec<PolicyReport> = results.iter().map(|(n, r)| report(n, r)).collect();
    if setup.args.json {
        let text = serde_json::to_string(&Report { policies: reports })
            .map_err(|e| format!("failed to write JSON: {e}"))?;
        println!("{text}");
    } else {
        print_table(&setup, &arrivals, &results, &reports);
    }
    if let Some(path) = &setup.args.plot {
        plot::draw(
            path,
            setup.args.font.as_deref(),
            &results,
            setup.args.p95_target_ms,
        )
        .map_err(|e| format!("failed to draw {}: {e}", path.display()))?;
    }
    Ok(())
}

fn load_arrivals(args: &Args) -> Result<Vec<f64>, String> {
    let mut rng = Rng::new(args.seed);
    let raw = match (&args.trace, args.synthetic) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("failed to read trace {}: {e}", path.display()))?;
            trace::parse_azure_csv(&text)
                .map_err(|e| format!("failed to parse {}: {e}", path.display()))?
        }
        (None, Some(shape)) => trace::synthetic(
            shape,
            args.synthetic_duration_s,
            args.synthetic_base,
            args.synthetic_peak,
            &mut rng,
        ),
        (None, None) => return Err("give --trace FILE or --synthetic SHAPE".to_string()),
    };
    if !(args.time_scale > 0.0 && args.rate_scale > 0.0) {
        return Err("--time-scale and --rate-scale must be positive".to_string());
    }
    Ok(trace::transform(
        &raw,
        args.time_scale,
        args.rate_scale,
        args.jitter_s,
        args.duration_s,
        &mut rng,
    ))
}

fn setup(args: Args) -> Result<Setup, String> {
    let profile_text = match &args.profile {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("failed to read profile {}: {e}", p.display()))?,
        None => DEFAULT_PROFILE.to_string(),
    };
    let profile = WorkerProfile::from_json(&profile_text).map_err(|e| e.to_string())?;
    let mut prices: BTreeMap<String, f64> = BTreeMap::new();
    for p in &args.price {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--price {p:?}: expected VARIANT=PRICE"))?;
        let v: f64 = v
            .parse()
            .map_err(|_| format!("--price {p:?}: not a number"))?;
        prices.insert(k.to_string(), v);
    }
    let variants: Vec<SimVariant> = profile
        .variants
        .iter()
        .map(|v| SimVariant {
            name: v.variant.clone(),
            price_per_hour: prices.get(&v.variant).copied().unwrap_or(1.0),
            quality_loss: v.quality.quality_loss,
            capacity: v.capacity(),
        })
        .collect();
    let chosen: Vec<String> = if args.variants.is_empty() {
        variants.iter().map(|v| v.name.clone()).collect()
    } else {
        args.variants.clone()
    };
    for c in &chosen {
        if !variants.iter().any(|v| &v.name == c) {
            return Err(format!("--variants: {c:?} is not in the profile"));
        }
    }
    let allowed: Vec<bool> = variants.iter().map(|v| chosen.contains(&v.name)).collect();
    let anchor_name = args
        .anchor_variant
        .clone()
        .unwrap_or_else(|| chosen[0].clone());
    let anchor = variants
        .iter()
        .position(|v| v.name == anchor_name)
        .ok_or_else(|| format!("--anchor-variant {anchor_name:?} is not in the profile"))?;
    let max_batch = args.max_batch.unwrap_or_else(|| {
        variants
            .iter()
            .map(|v| v.capacity.max_batch())
            .max()
            .unwrap_or(1)
    });
    let model = ModelConfig {
        variants,
        p95_target_ms: args.p95_target_ms,
        cold_start_s: args.cold_start_s,
        max_queue: args.max_queue,
        max_batch,
        service_jitter: args.service_jitter,
        scrape_s: args.scrape_s,
        seed: args.seed,
        max_scheduled: args.max_scheduled,
    };
    let limits = Limits {
        min: args.min_replicas,
        max: args.max_replicas,
        initial: args.initial_replicas,
    };
    Ok(Setup {
        model,
        allowed,
        anchor,
        limits,
        args,
    })
}

/// Runs one policy by name; the second value is Kestrel's decision log (else empty).
fn run_policy(name: &str, arrivals: &[f64], s: &Setup) -> Result<(RunResult, Vec<String>), String> {
    let a = &s.args;
    let lag = a.metric_lag_s;
    let mut policy: Box<dyn Autoscaler> = match name {
        "kestrel" => Box::new(Kestrel {
            variant_specs: variant_specs(&s.model.variants, &s.allowed),
            targets: Targets {
                p95_latency_ms: a.p95_target_ms,
                queue_depth_per_replica: a.target_queue,
            },
            scaling: ScalingLimits {
                min_replicas: a.min_replicas,
                max_replicas: a.max_replicas,
                scale_down_delay_s: a.scale_down_delay_s,
                max_scale_down_fraction: a.max_scale_down_fraction,
            },
            budget: Budget {
                max_cost_per_hour: a.budget,
                max_quality_loss: a.max_quality_loss,
                policy: match a.budget_policy {
                    BudgetChoice::HoldBudget => BudgetPolicy::HoldBudget,
                    BudgetChoice::HoldSlo => BudgetPolicy::HoldSlo,
                },
            },
            tuning: Tuning::default(),
            lag_s: lag,
            start_variant: s.anchor,
            limits: s.limits,
            memory: PolicyMemory::default(),
            reasons: BTreeMap::new(),
            log: Vec::new(),
        }),
        "hpa" => Box::new(Hpa {
            variant: s.anchor,
            target: a.target_queue,
            lag_s: lag,
            limits: s.limits,
            current: 0,
            recommendations: Vec::new(),
        }),
        "kpa" => Box::new(Kpa {
            variant: s.anchor,
            target: a.target_queue,
            limits: s.limits,
            current: 0,
            panic_until: f64::NEG_INFINITY,
        }),
        "ray-serve" => Box::new(RayServe {
            variant: s.anchor,
            target: a.target_queue,
            limits: s.limits,
            current: 0,
            up_since: None,
            down_since: None,
        }),
        "static-peak" => {
            let peak = trace::peak_rate(arrivals, 10.0);
            let n = s.model.variants[s.anchor].capacity.replicas_needed(
                peak,
                1.0,
                a.p95_target_ms,
                Tuning::default().target_utilization,
            );
            Box::new(StaticPeak {
                variant: s.anchor,
                replicas: n.clamp(a.min_replicas.max(1), a.max_replicas),
            })
        }
        other => {
            return Err(format!(
                "unknown policy {other:?} (kestrel, hpa, kpa, ray-serve, static-peak)"
            ));
        }
    };
    let result = model::run(arrivals, &s.model, policy.as_mut());
    let log = policy.explain();
    Ok((result, log))
}

fn report(name: &str, r: &RunResult) -> PolicyReport {
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    PolicyReport {
        name: name.to_string(),
        slo_attainment: round(r.slo_attainment(), 5),
        p95_ms: round(r.p95_ms, 1),
        replica_hours: round(r.replica_hours, 3),
        cost: round(r.cost, 3),
        scale_events: r.scale_events,
        rejected: r.rejected,
    }
}

fn print_table(
    s: &Setup,
    arrivals: &[f64],
    results: &[(String, RunResult)],
    rows: &[PolicyReport],
) {
    let span = arrivals.last().copied().unwrap_or(0.0);
    println!(
        "{} requests over {:.0} s (mean {:.1}/s, peak 10 s {:.1}/s); p95 target {} ms; anchors run {}",
        arrivals.len(),
        span,
        arrivals.len() as f64 / span.max(1.0),
        trace::peak_rate(arrivals, 10.0),
        s.args.p95_target_ms,
        s.model.variants[s.anchor].name
    );
    println!(
        "{:<12} {:>9} {:>9} {:>13} {:>9} {:>7} {:>9}  replica-hours by variant",
        "policy", "within", "p95 ms", "replica-hours", "cost", "events", "rejected"
    );
    for (row, (_, r)) in rows.iter().zip(results) {
        let by_variant: Vec<String> = s
            .model
            .variants
            .iter()
            .zip(&r.variant_hours)
            .filter(|(_, h)| **h > 0.0)
            .map(|(v, h)| format!("{}={h:.2}", v.name))
            .collect();
        println!(
            "{:<12} {:>8.2}% {:>9.1} {:>13.2} {:>9.2} {:>7} {:>9}  {}",
            row.name,
            row.slo_attainment * 100.0,
            row.p95_ms,
            row.replica_hours,
            row.cost,
            row.scale_events,
            row.rejected,
            by_variant.join(" ")
        );
    }
}

#[cfg(test)]
mod tests;
