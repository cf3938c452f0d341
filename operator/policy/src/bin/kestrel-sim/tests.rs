//! Simulator invariants: every request is accounted for, runs are deterministic
//! under a seed, and the JSON report has exactly the agreed fields.

use super::*;

/// 30 s spikes of 1800/s over 240/s for 15 minutes, on the default (measured) profile,
/// where an f32 replica serves about 400/s: from one replica to several.
fn args(extra: &[&str]) -> Args {
    let mut v = vec![
        "kestrel-sim",
        "--synthetic",
        "spike",
        "--synthetic-duration-s",
        "900",
        "--synthetic-base",
        "240",
        "--synthetic-peak",
        "1800",
    ];
    v.extend_from_slice(extra);
    if !extra.contains(&"--seed") {
        v.extend_from_slice(&["--seed", "3"]);
    }
    Args::parse_from(v)
}

fn run_all(a: Args) -> Vec<(String, RunResult)> {
    let arrivals = load_arrivals(&a).unwrap();
    let s = setup(a).unwrap();
    s.args
        .policies
        .iter()
        .map(|p| (p.clone(), run_policy(p, &arrivals, &s).unwrap().0))
        .collect()
}

#[test]
fn every_request_is_answered_or_rejected_under_every_policy() {
    // A small queue limit and a slow cold start force rejections too.
    for extra in [
        &[][..],
        &["--max-queue", "4", "--cold-start-s", "60"][..],
        &["--max-scheduled", "3"][..],
    ] {
        let a = args(extra);
        let n = load_arrivals(&a).unwrap().len() as u64;
        for (name, r) in run_all(a) {
            assert_eq!(r.arrivals, n, "{name}");
            assert_eq!(r.completed + r.rejected, r.arrivals, "{name}: {extra:?}");
            assert!(r.within_target <= r.completed, "{name}");
            assert!(r.replica_hours > 0.0 && r.cost > 0.0, "{name}");
            let slo = r.slo_attainment();
            assert!((0.0..=1.0).contains(&slo), "{name}");
        }
    }
}

#[test]
fn runs_are_deterministic_under_a_seed() {
    let a = run_all(args(&[]));
    let b = run_all(args(&[]));
    assert_eq!(a, b);
    let c = run_all(args(&["--seed", "4"]));
    assert_ne!(a, c, "a different seed gives a different trace");
}

#[test]
fn the_json_report_has_exactly_the_agreed_fields() {
    let runs = run_all(args(&["--policies", "kestrel,static-peak"]));
    let rows: Vec<PolicyReport> = runs.iter().map(|(n, r)| report(n, r)).collect();
    let v = serde_json::to_value(Report { policies: rows }).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["policies"]);
    for p in v["policies"].as_array().unwrap() {
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "cost",
                "name",
                "p95_ms",
                "rejected",
                "replica_hours",
                "scale_events",
                "slo_attainment"
            ]
        );
    }
    assert_eq!(v["policies"][1]["name"], "static-peak");
    assert_eq!(v["policies"][1]["scale_events"], 0);
}

#[test]
fn kestrel_in_the_simulator_is_the_operators_decide() {
    let a = args(&["--policies", "kestrel"]);
    let arrivals = load_arrivals(&a).unwrap();
    let s = setup(a).unwrap();
    let (r, log) = run_policy("kestrel", &arrivals, &s).unwrap();
    assert!(r.scale_events > 0);
    // The log lines carry decide()'s reasons and messages.
    assert!(log.iter().any(|l| l.contains("ScaleUp")), "{log:?}");
    assert!(log.last().unwrap().starts_with("decisions by reason:"));
}

#[test]
fn prices_and_variants_drive_cost_and_choice() {
    // int8 is faster and cheaper: Kestrel moves to it; the f32-only run costs more.
    let both = run_all(args(&[
        "--policies",
        "kestrel",
        "--variants",
        "f32,int8",
        "--price",
        "f32=2.0,int8=1.0",
    ]));
    let f32_only = run_all(args(&[
        "--policies",
        "kestrel",
        "--variants",
        "f32",
        "--price",
        "f32=2.0",
    ]));
    let (b, f) = (&both[0].1, &f32_only[0].1);
    assert!(b.variant_hours[1] > 0.0, "{:?}", b.variant_hours);
    assert!(b.cost < f.cost, "{} vs {}", b.cost, f.cost);
}

#[test]
fn pods_beyond_the_nodes_stay_pending_and_kestrel_says_so() {
    let a = args(&["--policies", "kestrel", "--max-scheduled", "3"]);
    let arrivals = load_arrivals(&a).unwrap();
    let s = setup(a).unwrap();
    let (limited, log) = run_policy("kestrel", &arrivals, &s).unwrap();
    assert!(
        log.iter().any(|l| l.contains("PendingUnschedulable")),
        "{log:?}"
    );
    // Never more than 3 replicas running at any point of the timeline.
    assert!(
        limited.timeline.iter().all(|p| p.1 <= 3),
        "{:?}",
        limited.timeline
    );
}
