//! Table-driven tests of every rule of `decide`, through the public API only.

use std::collections::BTreeMap;

use kestrel_policy::{
    Budget, BudgetPolicy, Decision, DecisionInput, DecisionReason, Fleet, PolicyMemory,
    Recommendation, ScalingLimits, Signals, Targets, Timestamp, Tuning, VariantCapacity,
    VariantReplicas, VariantSpec, decide,
};

// ---------- fixture builders ----------

/// A variant with a flat curve (`ips` inputs/s at any batch up to 32, 10 ms at batch 1
/// for 100/s), priced per replica-hour.
fn variant(name: &str, price: f64, ips: f64) -> VariantSpec {
    VariantSpec {
        name: name.to_string(),
        price_per_replica_hour: price,
        quality_loss: 0.0,
        capacity: VariantCapacity::flat(ips, 32),
        allowed: true,
    }
}

/// One variant `f32` (100/s per replica, 1.00/h), 3 of 3 ready, p95 target 200 ms,
/// 8 per replica, replicas 1..=20, scale-down delay 300 s, at most halve per step.
fn base() -> DecisionInput {
    DecisionInput {
        targets: Targets {
            p95_latency_ms: 200.0,
            queue_depth_per_replica: 8.0,
        },
        scaling: ScalingLimits {
            min_replicas: 1,
            max_replicas: 20,
            scale_down_delay_s: 300.0,
            max_scale_down_fraction: 0.5,
        },
        budget: Budget::default(),
        tuning: Tuning::default(),
        variants: vec![variant("f32", 1.0, 100.0)],
        fleet: fleet(&[("f32", 3, 3)]),
        signals: Some(calm(3.0)),
    }
}

fn fleet(v: &[(&str, u32, u32)]) -> Fleet {
    Fleet {
        variants: v
            .iter()
            .map(|(n, replicas, ready)| {
                (
                    n.to_string(),
                    VariantReplicas {
                        replicas: *replicas,
                        ready: *ready,
                    },
                )
            })
            .collect(),
        pending_unschedulable: None,
        startup_s: None,
    }
}

/// Signals of a quiet fleet: `in_flight` requests in the system, 10/s, p95 50 ms, fresh.
fn calm(in_flight: f64) -> Signals {
    Signals {
        queue_depth: 0.0,
        in_flight,
        arrival_rate: 10.0,
        arrival_rate_short: Some(10.0),
        p95_ms: Some(50.0),
        observed_throughput: Some(10.0),
        age_seconds: 5.0,
    }
}

fn with_signals(mut i: DecisionInput, f: impl FnOnce(&mut Signals)) -> DecisionInput {
    let mut s = i.signals.unwrap_or(calm(0.0));
    f(&mut s);
    i.signals = Some(s);
    i
}

fn reps(d: &Decision, v: &str) -> u32 {
    d.replicas.get(v).copied().unwrap_or(0)
}

/// Memory that remembers `variant` as the target.
/// Memory that remembers `variant` as the target, fresh signals and a fully Ready
/// fleet for the last 1000 s.
fn mem_target(variant: &str) -> PolicyMemory {
    PolicyMemory {
        target_variant: Some(variant.to_string()),
        observed_since: Some(Timestamp(T0.0 - 1000.0)),
        settled_since: Some(Timestamp(T0.0 - 1000.0)),
        ..PolicyMemory::default()
    }
}

const T0: Timestamp = Timestamp(1_000_000.0);

/// `mem_target("f32")` with `samples` demand readings of `in_system`, 10 s apart before
/// `T0`: the stable window's history that burst detection compares against.
fn mem_with_demand(samples: u32, in_system: f64) -> PolicyMemory {
    let mut mem = mem_target("f32");
    for k in 1..=samples {
        mem.demand.push(kestrel_policy::DemandSample {
            at: Timestamp(T0.0 - 10.0 * k as f64),
            in_system,
        });
    }
    mem
}

// ---------- signals: missing, stale, NaN ----------

#[test]
fn missing_stale_or_nan_signals_hold_the_fleet() {
    let stale = with_signals(base(), |s| s.age_seconds = 31.0);
    let nan_queue = with_signals(base(), |s| s.in_flight = f64::NAN);
    let nan_rate = with_signals(base(), |s| s.arrival_rate = f64::NAN);
    let neg = with_signals(base(), |s| s.queue_depth = -1.0);
    let inf_age = with_signals(base(), |s| s.age_seconds = f64::INFINITY);
    let mut none = base();
    none.signals = None;
    // Remembered recommendations are all low: a decision with signals would scale down.
    let mut mem = mem_target("f32");
    mem.recommendations.push(Recommendation {
        at: Timestamp(T0.0 - 400.0),
        replicas: 1,
        variant: "f32".into(),
    });
    for (name, input) in [
        ("none", none),
        ("stale", stale),
        ("nan queue", nan_queue),
        ("nan rate", nan_rate),
        ("negative", neg),
        ("infinite age", inf_age),
    ] {
        let d = decide(&input, &mem, T0);
        assert_eq!(reps(&d, "f32"), 3, "{name}");
        assert_eq!(d.reason, DecisionReason::MetricsUnavailable, "{name}");
        assert!(!d.conditions.metrics_available, "{name}");
        assert!(
            d.message.contains("holding 3 replicas of f32"),
            "{name}: {}",
            d.message
        );
    }
}

#[test]
fn missing_signals_still_respect_min_and_max() {
    let table = [
        // (fleet replicas, min, max, expected)
        (0, 2, 20, 2),
        (3, 1, 20, 3),
        (30, 1, 20, 20),
    ];
    for (have, min, max, want) in table {
        let mut i = base();
        i.fleet = fleet(&[("f32", have, have)]);
        i.scaling.min_replicas = min;
        i.scaling.max_replicas = max;
        i.signals = None;
        let d = decide(&i, &PolicyMemory::default(), T0);
        assert_eq!(reps(&d, "f32"), want, "have {have} min {min} max {max}");
    }
}

#[test]
fn missing_signals_finish_a_surge_rollout_only_once_the_target_is_ready() {
    // (int8 replicas, int8 ready, min) → f32 replicas kept
    let table = [(3, 3, 1, 0), (3, 1, 1, 4), (0, 0, 0, 4)];
    for (r, ready, min, want_f32) in table {
        let mut i = base();
        i.variants.push(variant("int8", 0.6, 250.0));
        i.fleet = fleet(&[("f32", 4, 4), ("int8", r, ready)]);
        i.scaling.min_replicas = min;
        i.signals = None;
        let d = decide(&i, &mem_target("int8"), T0);
        assert_eq!(
            reps(&d, "f32"),
            want_f32,
            "int8 {ready}/{r} min {min}: {}",
            d.message
        );
        assert_eq!(d.target_variant, "int8");
    }
}

#[test]
fn a_nan_p95_alone_is_no_latency_signal_not_missing_metrics() {
    let i = with_signals(base(), |s| {
        s.p95_ms = Some(f64::NAN);
        s.in_flight = 40.0;
    });
    let d = decide(&i, &mem_target("f32"), T0);
    assert!(d.conditions.metrics_available);
    assert_eq!(reps(&d, "f32"), 5);
    assert_eq!(d.recommendations.latency, 0);
}

// ---------- recommendations: queue, rate, p95; the maximum wins ----------

#[test]
fn recommendations_take_the_maximum_and_scale_up_at_once() {
    struct Case {
        name: &'static str,
        in_flight: f64,
        rate: f64,
        p95: f64,
        want: u32,
        reason: DecisionReason,
    }
    let table = [
        Case {
            name: "queue depth 42 / 8 per replica",
            in_flight: 42.0,
            rate: 10.0,
            p95: 50.0,
            want: 6,
            reason: DecisionReason::ScaleUpQueueDepth,
        },
        Case {
            name: "arrival rate 700/s at 80/s usable per replica",
            in_flight: 3.0,
            rate: 700.0,
            p95: 50.0,
            want: 9,
            reason: DecisionReason::ScaleUpArrivalRate,
        },
        Case {
            name: "p95 300 over 200: 3 ready × 1.5",
            in_flight: 3.0,
            rate: 10.0,
            p95: 300.0,
            want: 5,
            reason: DecisionReason::ScaleUpLatency,
        },
        Case {
            name: "p95 2000 over 200: bounded at 2× per step",
            in_flight: 3.0,
            rate: 10.0,
            p95: 2000.0,
            want: 6,
            reason: DecisionReason::ScaleUpLatency,
        },
        Case {
            name: "all three: queue 80 → 10 wins over rate and p95",
            in_flight: 80.0,
            rate: 500.0,
            p95: 300.0,
            want: 10,
            reason: DecisionReason::ScaleUpQueueDepth,
        },
    ];
    for c in table {
        let i = with_signals(base(), |s| {
            s.in_flight = c.in_flight;
            s.arrival_rate = c.rate;
            s.arrival_rate_short = Some(c.rate);
            s.p95_ms = Some(c.p95);
        });
        // A stable history at the same level: no burst.
        let mem = mem_with_demand(5, c.in_flight);
        let d = decide(&i, &mem, T0);
        assert_eq!(reps(&d, "f32"), c.want, "{}: {}", c.name, d.message);
        assert_eq!(d.reason, c.reason, "{}: {}", c.name, d.message);
        assert!(
            d.message.contains(&format!("3→{}", c.want)),
            "{}",
            d.message
        );
    }
}

#[test]
fn queue_message_names_depth_ready_replicas_and_target() {
    let i = with_signals(base(), |s| s.in_flight = 42.0);
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(
        d.message,
        "queue depth 42 over 3 ready replicas (target 8/replica): scaling f32 3→6"
    );
}

#[test]
fn the_p95_drives_scale_up_only_for_a_fleet_ready_for_a_whole_window() {
    // (replicas, ready, seconds fully Ready, expected latency recommendation)
    let table = [
        (3, 3, 1000.0, 6), // settled: 3 ready × min(400/200, 2)
        (3, 3, 30.0, 0),   // the 60 s p95 window still holds the old fleet's requests
        (6, 2, 1000.0, 0), // 4 replicas on the way: the p95 describes the 2 Ready only
    ];
    for (replicas, ready, settled_for, want) in table {
        let mut i = with_signals(base(), |s| s.p95_ms = Some(400.0));
        i.fleet = fleet(&[("f32", replicas, ready)]);
        let mut mem = mem_target("f32");
        mem.settled_since = Some(Timestamp(T0.0 - settled_for));
        let d = decide(&i, &mem, T0);
        assert_eq!(
            d.recommendations.latency, want,
            "{replicas}/{ready} for {settled_for}s"
        );
    }
}

#[test]
fn settling_is_remembered_from_the_first_fully_ready_decision() {
    // 24 in the system hold 3 replicas (8 each): only the p95 can add.
    let i = with_signals(base(), |s| {
        s.p95_ms = Some(400.0);
        s.in_flight = 24.0;
    });
    let mut mem = mem_target("f32");
    mem.settled_since = None;
    let d = decide(&i, &mem, T0);
    assert_eq!(d.memory.settled_since, Some(T0));
    assert_eq!(d.recommendations.latency, 0);
    let d = decide(&i, &d.memory, T0.plus(60.0));
    assert_eq!(d.recommendations.latency, 6, "{}", d.message);
    assert_eq!(reps(&d, "f32"), 6);
    // The scale-up restarts the clock: 6 Ready replicas 10 s later do not compound it.
    let mut i = i;
    i.fleet = fleet(&[("f32", 6, 6)]);
    let d = decide(&i, &d.memory, T0.plus(70.0));
    assert_eq!(d.recommendations.latency, 0, "{}", d.message);
    assert_eq!(reps(&d, "f32"), 6);
}

#[test]
fn a_backlog_seen_in_burst_mode_is_not_held_for_the_scale_down_delay() {
    let mem = mem_with_demand(5, 4.0);
    let burst = with_signals(base(), |s| {
        s.in_flight = 80.0;
        s.p95_ms = Some(400.0);
    });
    let d = decide(&burst, &mem, T0);
    // 80 in the system at 10/s: the 3 replicas clear it in a second, so the queue
    // rule asks for what clears it within 30 s (1 replica); the p95 still doubles.
    assert_eq!(d.recommendations.queue_depth, 1, "{}", d.message);
    assert_eq!(d.recommendations.latency, 6);
    assert_eq!(reps(&d, "f32"), 6, "{}", d.message);
    // Only the rate's need (10/s: 1 replica) is remembered for the scale-down delay.
    assert_eq!(d.memory.recommendations.last().unwrap().replicas, 1);
    // 70 s later burst mode is over; the 300 s delay holds only the rate's need (1).
    let mut calm_input = with_signals(base(), |s| s.in_flight = 1.0);
    calm_input.fleet = fleet(&[("f32", 6, 6)]);
    let d2 = decide(&calm_input, &d.memory, T0.plus(70.0));
    assert_eq!(d2.reason, DecisionReason::ScaleDown, "{}", d2.message);
    assert_eq!(reps(&d2, "f32"), 3);
}

#[test]
fn burst_mode_sizes_a_backlog_by_the_rate_that_clears_it() {
    // 100/s per replica at 80 % = 80/s usable; 3 Ready; backlog cleared within 30 s.
    let table = [
        // (stable rate, short rate, in the system, queue recommendation, replicas)
        (100.0, 400.0, 64.0, 6, 6),   // (400 + 64/30)/80 → 6, not 64/8 = 8
        (100.0, 100.0, 3000.0, 3, 3), // (100 + 100)/80 → 3, not 375: 3 clear it in 15 s
        (100.0, 100.0, 30000.0, 14, 14), // (100 + 1000)/80 → 14
    ];
    for (stable, short, in_system, queue, want) in table {
        let mem = mem_with_demand(5, 4.0);
        let i = with_signals(base(), |s| {
            s.arrival_rate = stable;
            s.arrival_rate_short = Some(short);
            s.in_flight = in_system;
        });
        let d = decide(&i, &mem, T0);
        assert!(d.recommendations.burst, "{in_system}: {}", d.message);
        assert_eq!(
            d.recommendations.queue_depth, queue,
            "{in_system}: {}",
            d.message
        );
        assert_eq!(reps(&d, "f32"), want, "{in_system}: {}", d.message);
        if want > 3 {
            assert_eq!(d.reason, DecisionReason::ScaleUpBurst, "{}", d.message);
            assert!(
                d.message
                    .ends_with("(the backlog sized to clear within 30s, the default drain time, not at 8/replica)"),
                "{}",
                d.message
            );
        }
    }
    // After the onset, burst mode sizes a backlog so only while the Ready fleet clears
    // it within 30 s: at 300/s the 3 replicas (300/s) do not, so 64 waiting are demand
    // (clients that send as fast as they are answered look like this).
    let table = [
        // (rate, queue recommendation, replicas)
        (100.0, 2, 3), // 200/s of headroom clears 64 in 0.3 s: (100 + 64/30)/80 → 2; held at 3
        (300.0, 8, 8), // no headroom: 64/8
    ];
    for (rate, queue, want) in table {
        let mut mem = mem_with_demand(5, 40.0);
        mem.burst_until = Some(T0.plus(30.0));
        let i = with_signals(base(), |s| {
            s.arrival_rate = rate;
            s.arrival_rate_short = Some(rate);
            s.in_flight = 64.0;
        });
        let d = decide(&i, &mem, T0);
        assert!(d.recommendations.burst, "{rate}: {}", d.message);
        assert_eq!(
            d.recommendations.queue_depth, queue,
            "{rate}: {}",
            d.message
        );
        assert_eq!(reps(&d, "f32"), want, "{rate}: {}", d.message);
    }
    // Once a new replica's startup has been observed (10 s here), it is the horizon:
    // at the onset 3000 waiting are sized to clear within 10 s, (100 + 300)/80 → 5;
    // after it, a fleet that needs 15 s to clear them is not clearing them before new
    // replicas would serve, so the plain rule sizes them (3000/8 = 375).
    let startup = |mut i: DecisionInput| {
        i.fleet.startup_s = Some(10.0);
        with_signals(i, |s| {
            s.arrival_rate = 100.0;
            s.arrival_rate_short = Some(100.0);
            s.in_flight = 3000.0;
        })
    };
    let d = decide(&startup(base()), &mem_with_demand(5, 40.0), T0);
    assert_eq!(d.recommendations.queue_depth, 5, "{}", d.message);
    assert_eq!(reps(&d, "f32"), 5, "{}", d.message);
    assert!(
        d.message.ends_with(
            "(the backlog sized to clear within 10s, a new replica's startup, not at 8/replica)"
        ),
        "{}",
        d.message
    );
    let mut mem = mem_with_demand(5, 3000.0);
    mem.burst_until = Some(T0.plus(30.0));
    let d = decide(&startup(base()), &mem, T0);
    assert!(d.recommendations.burst, "{}", d.message);
    assert_eq!(d.recommendations.queue_depth, 375, "{}", d.message);

    // Outside burst mode the queue rule is the plain one: 64 in the system, 8 each.
    let steady = with_signals(base(), |s| s.in_flight = 64.0);
    let d = decide(&steady, &mem_target("f32"), T0);
    assert!(!d.recommendations.burst, "{}", d.message);
    assert_eq!(d.recommendations.queue_depth, 8);
    assert_eq!(reps(&d, "f32"), 8);
}

// ---------- burst mode ----------

#[test]
fn burst_mode_scales_up_and_holds_scale_down_for_a_stable_window() {
    let mem = mem_with_demand(5, 4.0);
    let mut i = with_signals(base(), |s| {
        s.in_flight = 64.0;
        s.arrival_rate = 100.0;
        s.arrival_rate_short = Some(400.0);
    });
    i.scaling.scale_down_delay_s = 0.0; // only burst mode can hold the scale-down
    let d = decide(&i, &mem, T0);
    assert_eq!(d.reason, DecisionReason::ScaleUpBurst, "{}", d.message);
    assert_eq!(reps(&d, "f32"), 6);
    assert!(d.recommendations.burst);

    // Demand gone 30 s later: burst mode holds the 6 replicas …
    let mut calm_input = with_signals(base(), |s| s.in_flight = 1.0);
    calm_input.fleet = fleet(&[("f32", 6, 6)]);
    calm_input.scaling.scale_down_delay_s = 0.0;
    let d2 = decide(&calm_input, &d.memory, T0.plus(30.0));
    assert_eq!(reps(&d2, "f32"), 6, "{}", d2.message);
    assert_eq!(d2.reason, DecisionReason::ScaleDownDeferred);
    assert!(d2.message.contains("burst mode"), "{}", d2.message);
    // … until a stable window (60 s) after the last burst, then scale-down resumes.
    let d3 = decide(&calm_input, &d2.memory, T0.plus(61.0));
    assert_eq!(d3.reason, DecisionReason::ScaleDown, "{}", d3.message);
    assert_eq!(reps(&d3, "f32"), 3);
}

#[test]
fn a_short_window_rate_jump_is_a_burst_and_is_planned_for() {
    let i = with_signals(base(), |s| {
        s.arrival_rate = 100.0;
        s.arrival_rate_short = Some(600.0);
    });
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(d.reason, DecisionReason::ScaleUpBurst, "{}", d.message);
    assert_eq!(reps(&d, "f32"), 8); // 600/s at 80/s usable
}

#[test]
fn no_burst_when_the_fleet_already_covers_the_jump() {
    // 1 → 8 requests in the system is a jump, but 3 replicas (8 each) hold it.
    let mem = mem_with_demand(3, 1.0);
    let i = with_signals(base(), |s| s.in_flight = 8.0);
    let d = decide(&i, &mem, T0);
    assert!(!d.recommendations.burst, "{}", d.message);
    assert_ne!(d.reason, DecisionReason::ScaleUpBurst);
    assert!(reps(&d, "f32") <= 3);
}

// ---------- slow scale-down ----------

#[test]
fn scale_down_follows_the_highest_recommendation_over_the_delay_and_the_step_limit() {
    // t=0: 80 in the system at 800/s → 10 replicas.
    let high = with_signals(base(), |s| {
        s.in_flight = 80.0;
        s.arrival_rate = 800.0;
        s.arrival_rate_short = Some(800.0);
    });
    let d0 = decide(&high, &mem_target("f32"), T0);
    assert_eq!(reps(&d0, "f32"), 10);
    let mut mem = d0.memory;
    let mut have = 10;
    let mut seen = Vec::new();
    // Then calm (1 in the system → min 1) every 10 s for 400 s.
    for step in 1..=40 {
        let mut i = with_signals(base(), |s| s.in_flight = 1.0);
        i.fleet = fleet(&[("f32", have, have)]);
        let now = T0.plus(10.0 * step as f64);
        let d = decide(&i, &mem, now);
        have = reps(&d, "f32");
        seen.push((step * 10, have));
        mem = d.memory;
    }
    // Held at 10 for the whole 300 s delay, then down as the remembered demand of the
    // stable window (the 80 in the system averaged with the calm readings after it)
    // leaves the delay: 6, 4, 3, 3, 2, 2, 1 — never more than half at once.
    let at = |t: u32| seen.iter().find(|(s, _)| *s == t).unwrap().1;
    assert_eq!(at(290), 10, "{seen:?}");
    assert_eq!(at(300), 10, "{seen:?}");
    assert_eq!(at(310), 6, "{seen:?}");
    assert_eq!(at(320), 4, "{seen:?}");
    assert_eq!(at(330), 3, "{seen:?}");
    assert_eq!(at(370), 1, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[1].1 * 2 >= w[0].1), "{seen:?}");
    assert_eq!(at(400), 1, "{seen:?}");
}

#[test]
fn the_delay_holds_the_stable_windows_demand_not_the_short_windows_noise() {
    // 2 replicas at 160/s; one 10 s reading of 300/s (under the 2× burst threshold)
    // scales up at once …
    let mut i = with_signals(base(), |s| {
        s.arrival_rate = 160.0;
        s.arrival_rate_short = Some(300.0);
        s.in_flight = 8.0;
    });
    i.fleet = fleet(&[("f32", 2, 2)]);
    let d = decide(&i, &mem_target("f32"), T0);
    assert!(!d.recommendations.burst, "{}", d.message);
    assert_eq!(
        d.reason,
        DecisionReason::ScaleUpArrivalRate,
        "{}",
        d.message
    );
    assert_eq!(reps(&d, "f32"), 4);
    // … but the delay remembers what the stable window needs (160/s: 2), so the next
    // calm reading returns the replicas instead of holding them for 300 s.
    assert_eq!(d.memory.recommendations.last().unwrap().replicas, 2);
    let mut calm_input = with_signals(i.clone(), |s| s.arrival_rate_short = Some(160.0));
    calm_input.fleet = fleet(&[("f32", 4, 4)]);
    let d2 = decide(&calm_input, &d.memory, T0.plus(10.0));
    assert_eq!(d2.reason, DecisionReason::ScaleDown, "{}", d2.message);
    assert_eq!(reps(&d2, "f32"), 2);
    // A sustained 300/s (the stable window's) is held for the delay.
    let mut sustained = with_signals(i, |s| s.arrival_rate = 300.0);
    sustained.fleet = fleet(&[("f32", 4, 4)]);
    let d3 = decide(&sustained, &d2.memory, T0.plus(20.0));
    assert_eq!(d3.memory.recommendations.last().unwrap().replicas, 4);
    let d4 = decide(&calm_input, &d3.memory, T0.plus(30.0));
    assert_eq!(
        d4.reason,
        DecisionReason::ScaleDownDeferred,
        "{}",
        d4.message
    );
    assert_eq!(reps(&d4, "f32"), 4);
}

#[test]
fn scale_down_step_limit_table() {
    // (have, fraction, expected after the delay has passed with demand at min)
    let table = [
        (10, 0.5, 5),
        (10, 1.0, 1),
        (10, 0.1, 9),
        (3, 0.5, 2),
        (2, 0.0, 2),
    ];
    for (have, fraction, want) in table {
        let mut i = with_signals(base(), |s| s.in_flight = 0.0);
        i.fleet = fleet(&[("f32", have, have)]);
        i.scaling.max_scale_down_fraction = fraction;
        let d = decide(&i, &mem_target("f32"), T0);
        assert_eq!(reps(&d, "f32"), want, "have {have} fraction {fraction}");
        if want > 1 {
            assert!(d.message.contains("step limit"), "{}", d.message);
        }
    }
}

// ---------- Pending unschedulable; min and max ----------

#[test]
fn pending_unschedulable_stops_adding_replicas_but_not_removing() {
    let reason = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.";
    let table = [
        // (in flight, fleet replicas, expected)
        (80.0, 3, 3), // wants 10: held at 3
        (0.0, 6, 3),  // wants 1: may still go down (halving)
    ];
    for (in_flight, have, want) in table {
        let mut i = with_signals(base(), |s| s.in_flight = in_flight);
        i.fleet = fleet(&[("f32", have, 2)]);
        i.fleet.pending_unschedulable = Some(reason.to_string());
        let d = decide(&i, &mem_target("f32"), T0);
        assert_eq!(reps(&d, "f32"), want, "{}", d.message);
        if want == have {
            assert_eq!(d.reason, DecisionReason::PendingUnschedulable);
            let limited = d.conditions.scaling_limited.as_deref().unwrap();
            assert!(limited.contains(reason), "{limited}");
        }
    }
}

#[test]
fn min_and_max_replicas_table() {
    let table = [
        // (in flight, min, max, expected, reason)
        (0.0, 4, 20, 4, DecisionReason::Steady),
        (400.0, 1, 20, 20, DecisionReason::MaxReplicas),
        (80.0, 1, 10, 10, DecisionReason::ScaleUpQueueDepth),
        (80.0, 1, 5, 5, DecisionReason::MaxReplicas),
    ];
    for (in_flight, min, max, want, reason) in table {
        let mut i = with_signals(base(), |s| s.in_flight = in_flight);
        i.fleet = fleet(&[("f32", min.max(3), min.max(3))]);
        i.scaling.min_replicas = min;
        i.scaling.max_replicas = max;
        let d = decide(&i, &mem_target("f32"), T0);
        assert_eq!(reps(&d, "f32"), want, "{}", d.message);
        assert_eq!(d.reason, reason, "{}", d.message);
        if reason == DecisionReason::MaxReplicas {
            assert!(
                d.conditions
                    .scaling_limited
                    .unwrap()
                    .contains("maxReplicas")
            );
        }
    }
}

// ---------- variant choice ----------

/// f32: 100/s for 1.00/h; int8: 250/s for 0.60/h, loss 0.0005; q4: 400/s for 0.50/h, loss 0.05.
fn three_variants() -> DecisionInput {
    let mut i = base();
    let mut int8 = variant("int8", 0.6, 250.0);
    int8.quality_loss = 0.0005;
    let mut q4 = variant("q4", 0.5, 400.0);
    q4.quality_loss = 0.05;
    i.variants = vec![variant("f32", 1.0, 100.0), int8, q4];
    i.fleet = fleet(&[]);
    i
}

#[test]
fn the_cheapest_feasible_variant_is_chosen() {
    // (case, max quality loss, disallowed variants, max replicas, expected variant)
    type Case = (
        &'static str,
        Option<f64>,
        &'static [&'static str],
        u32,
        &'static str,
    );
    let table: [Case; 5] = [
        // (case, max quality loss, disallowed, max replicas, expected)
        ("no limits: q4 is cheapest", None, &[], 20, "q4"),
        (
            "quality limit 0.001 excludes q4",
            Some(0.001),
            &[],
            20,
            "int8",
        ),
        ("int8 disallowed", Some(0.001), &["int8"], 20, "f32"),
        ("lossless only", Some(0.0), &[], 20, "f32"),
        (
            "q4 alone needs fewer replicas than max",
            None,
            &["int8"],
            20,
            "q4",
        ),
    ];
    for (case, loss, disallowed, max, want) in table {
        let mut i = with_signals(three_variants(), |s| {
            s.arrival_rate = 400.0;
            s.arrival_rate_short = Some(400.0);
        });
        i.budget.max_quality_loss = loss;
        i.scaling.max_replicas = max;
        for v in &mut i.variants {
            v.allowed = !disallowed.contains(&v.name.as_str());
        }
        let d = decide(&i, &PolicyMemory::default(), T0);
        assert_eq!(d.target_variant, want, "{case}: {}", d.message);
    }
}

#[test]
fn a_variant_needing_more_than_max_is_infeasible() {
    // 1000/s: f32 needs 13 (over max 10) though it would be cheaper per hour here.
    let mut i = three_variants();
    i.variants[0].price_per_replica_hour = 0.1;
    i.variants.truncate(2);
    i.scaling.max_replicas = 10;
    let i = with_signals(i, |s| {
        s.arrival_rate = 1000.0;
        s.arrival_rate_short = Some(1000.0);
    });
    let d = decide(&i, &PolicyMemory::default(), T0);
    assert_eq!(d.target_variant, "int8", "{}", d.message);
}

#[test]
fn no_qualifying_variant_holds_and_says_so() {
    let mut i = base();
    i.budget.max_quality_loss = Some(0.0);
    i.variants[0].quality_loss = 0.01;
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(d.reason, DecisionReason::NoFeasibleVariant);
    assert_eq!(reps(&d, "f32"), 3);
    assert!(d.conditions.scaling_limited.is_some());
}

// ---------- switch hysteresis and surge rollout ----------

/// f32 running 8 replicas for 500/s; int8 (250/s, 0.6/h) is the cheaper choice.
fn switch_input(int8_price: f64) -> DecisionInput {
    let mut i = base();
    i.variants = vec![
        variant("f32", 1.0, 100.0),
        variant("int8", int8_price, 250.0),
    ];
    i.fleet = fleet(&[("f32", 7, 7)]);
    with_signals(i, |s| {
        s.arrival_rate = 500.0;
        s.arrival_rate_short = Some(500.0);
        s.in_flight = 20.0;
    })
}

#[test]
fn a_switch_needs_ten_percent_saving_sustained_over_the_window() {
    // f32 needs 7 × 1.00 = 7.00/h; int8 needs 3 × price.
    let table = [
        // (int8 price, seconds sustained, expected target)
        (2.2, 400.0, "f32"),  // 6.60/h: 5.7 % saving, never
        (2.0, 100.0, "f32"),  // 6.00/h: 14 %, not yet sustained
        (2.0, 299.0, "f32"),  // still not
        (2.0, 300.0, "int8"), // sustained: switch
        (0.6, 300.0, "int8"),
    ];
    for (price, sustained, want) in table {
        let i = switch_input(price);
        let mut mem = mem_target("f32");
        let mut now = T0;
        let mut d = decide(&i, &mem, now);
        let mut t: f64 = 0.0;
        while t < sustained {
            t = (t + 10.0).min(sustained);
            now = T0.plus(t);
            mem = d.memory.clone();
            d = decide(&i, &mem, now);
        }
        assert_eq!(
            d.target_variant, want,
            "price {price} after {sustained}s: {}",
            d.message
        );
    }
}

#[test]
fn a_saving_that_dips_restarts_the_hysteresis_window() {
    let mut mem = mem_target("f32");
    let cheap = switch_input(0.6);
    let dear = switch_input(2.5);
    for (t, input) in [
        (0.0, &cheap),
        (200.0, &dear),
        (250.0, &cheap),
        (500.0, &cheap),
    ] {
        let d = decide(input, &mem, T0.plus(t));
        assert_eq!(d.target_variant, "f32", "at {t}: {}", d.message);
        mem = d.memory;
    }
    let d = decide(&cheap, &mem, T0.plus(550.0));
    assert_eq!(d.target_variant, "int8", "{}", d.message);
    assert_eq!(d.reason, DecisionReason::VariantSwitch);
}

#[test]
fn a_switch_is_a_surge_rollout() {
    let mut mem = mem_target("f32");
    mem.switch_candidate = Some(kestrel_policy::SwitchCandidate {
        variant: "int8".into(),
        since: Timestamp(T0.0 - 400.0),
        saving: 0.5,
    });
    let i = switch_input(0.6);
    let d = decide(&i, &mem, T0);
    assert_eq!(d.reason, DecisionReason::VariantSwitch, "{}", d.message);
    assert_eq!(
        d.replicas,
        BTreeMap::from([("f32".to_string(), 7), ("int8".to_string(), 3)])
    );
    assert!(d.message.starts_with("switching f32→int8"), "{}", d.message);
    // The steps of the rollout: (int8 replicas, int8 ready) → expected f32 replicas.
    let table = [((3, 0), 7), ((3, 2), 7), ((3, 3), 0)];
    let mut mem = d.memory;
    for ((r, ready), want_f32) in table {
        let mut i = switch_input(0.6);
        i.fleet = fleet(&[("f32", 7, 7), ("int8", r, ready)]);
        let d = decide(&i, &mem, T0.plus(10.0));
        assert_eq!(d.target_variant, "int8");
        assert_eq!(reps(&d, "f32"), want_f32, "int8 {ready}/{r}: {}", d.message);
        assert_eq!(reps(&d, "int8"), 3);
        if want_f32 > 0 {
            assert_eq!(d.reason, DecisionReason::RolloutInProgress);
        }
        mem = d.memory;
    }
}

#[test]
fn a_variant_that_stops_qualifying_is_left_at_once() {
    let mut i = switch_input(2.5); // int8 dearer: no saving
    i.variants[0].allowed = false;
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(d.target_variant, "int8");
    assert_eq!(d.reason, DecisionReason::VariantSwitch);
    assert_eq!(reps(&d, "f32"), 7, "old replicas stay until int8 is Ready");
}

#[test]
fn a_variant_over_the_budget_is_left_at_once_for_a_cheaper_one_that_fits() {
    // f32 needs 7 × 1.00 = 7.00/h; int8 3 × 0.60 = 1.80/h.
    let table = [
        // (budget per hour, expected target at the first decision)
        (None, "f32"),       // no budget: the savings wait out the hysteresis
        (Some(10.0), "f32"), // f32 fits the budget: hysteresis too
        (Some(5.0), "int8"), // f32 breaches it, int8 fits: at once
    ];
    for (budget, want) in table {
        let mut i = switch_input(0.6);
        i.budget.max_cost_per_hour = budget;
        let d = decide(&i, &mem_target("f32"), T0);
        assert_eq!(d.target_variant, want, "budget {budget:?}: {}", d.message);
        if want == "int8" {
            assert_eq!(d.reason, DecisionReason::VariantSwitch);
            assert!(
                d.message.contains("over the 5.00/h budget"),
                "{}",
                d.message
            );
            assert_eq!(reps(&d, "f32"), 7, "a surge: f32 stays until int8 is Ready");
        }
    }
}

// ---------- budget conflicts ----------

#[test]
fn budget_conflict_hold_budget_caps_replicas_and_reports_the_predicted_p95() {
    let mut i = with_signals(base(), |s| {
        s.arrival_rate = 800.0;
        s.arrival_rate_short = Some(800.0);
    });
    i.budget = Budget {
        max_cost_per_hour: Some(6.0),
        max_quality_loss: None,
        policy: BudgetPolicy::HoldBudget,
    };
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(reps(&d, "f32"), 6, "{}", d.message);
    assert_eq!(d.reason, DecisionReason::BudgetCapped);
    let msg = d.conditions.budget_constrained.unwrap();
    assert!(msg.contains("caps f32 at 6 replicas (needs 10)"), "{msg}");
    assert!(msg.contains("predicted p95 unbounded"), "{msg}");
    assert!(d.projected_cost_per_hour <= 6.0);
}

#[test]
fn budget_conflict_hold_budget_takes_the_variant_the_budget_buys_best() {
    // 170/s: one "big" replica (250/s, 2.30/h) is cheapest at need, but the 2.00/h
    // budget buys no big replica, and two small ones (100/s, 1.00/h) hold the load.
    let mut i = with_signals(base(), |s| {
        s.arrival_rate = 170.0;
        s.arrival_rate_short = Some(170.0);
    });
    i.variants.push(variant("big", 2.3, 250.0));
    i.fleet = fleet(&[("big", 1, 1)]);
    i.budget = Budget {
        max_cost_per_hour: Some(2.0),
        max_quality_loss: None,
        policy: BudgetPolicy::HoldBudget,
    };
    let d = decide(&i, &mem_target("big"), T0);
    assert_eq!(d.target_variant, "f32", "{}", d.message);
    assert_eq!(reps(&d, "f32"), 2);
    assert_eq!(reps(&d, "big"), 1, "surge: big stays until f32 is Ready");
    assert!(d.predicted_p95_ms.is_some());
    let msg = d.conditions.budget_constrained.unwrap();
    assert!(msg.contains("within the 200 ms target"), "{msg}");
}

#[test]
fn a_switch_blocked_by_pending_pods_never_empties_the_fleet() {
    // f32 stops qualifying while pods are Pending and minReplicas is 0: int8 cannot be
    // added, and f32 must not go before an int8 replica is Ready.
    let mut i = switch_input(0.6);
    i.variants[0].allowed = false;
    i.scaling.min_replicas = 0;
    i.fleet.pending_unschedulable = Some("0/1 nodes are available".into());
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(reps(&d, "f32"), 7, "{}", d.message);
    assert_eq!(reps(&d, "int8"), 0);
}

#[test]
fn budget_conflict_hold_slo_exceeds_the_budget_and_says_by_how_much() {
    let mut i = with_signals(base(), |s| {
        s.arrival_rate = 800.0;
        s.arrival_rate_short = Some(800.0);
    });
    i.budget = Budget {
        max_cost_per_hour: Some(6.0),
        max_quality_loss: None,
        policy: BudgetPolicy::HoldSlo,
    };
    let d = decide(&i, &mem_target("f32"), T0);
    assert_eq!(reps(&d, "f32"), 10, "{}", d.message);
    let msg = d.conditions.budget_constrained.unwrap();
    assert!(msg.contains("4.00/h over the 6.00/h budget"), "{msg}");
    assert!((d.projected_cost_per_hour - 10.0).abs() < 1e-9);
}

#[test]
fn no_budget_condition_within_budget() {
    let mut i = base();
    i.budget.max_cost_per_hour = Some(100.0);
    let d = decide(&i, &mem_target("f32"), T0);
    assert!(d.conditions.budget_constrained.is_none());
}

// ---------- memory, correction, validation ----------

#[test]
fn memory_stays_bounded_and_round_trips_through_json() {
    let mut mem = PolicyMemory::default();
    let mut i = base();
    for k in 0..2000 {
        let level = if k % 7 == 0 { 90.0 } else { 2.0 };
        i = with_signals(i, |s| s.in_flight = level);
        let d = decide(&i, &mem, T0.plus(k as f64 * 0.5));
        i.fleet = fleet(&[("f32", reps(&d, "f32"), reps(&d, "f32"))]);
        mem = d.memory;
        assert!(mem.recommendations.len() <= kestrel_policy::MAX_REMEMBERED);
        assert!(mem.demand.len() <= kestrel_policy::MAX_REMEMBERED);
    }
    let json = serde_json::to_string(&mem).unwrap();
    assert!(json.len() < 8 * 1024, "{} bytes", json.len());
    let back: PolicyMemory = serde_json::from_str(&json).unwrap();
    assert_eq!(back, mem);
    // An empty object (a fresh status) is a valid memory.
    let fresh: PolicyMemory = serde_json::from_str("{}").unwrap();
    assert_eq!(fresh, PolicyMemory::default());
}

#[test]
fn a_saturated_fleet_corrects_the_profiled_capacity() {
    // 2 replicas, full batches queued for a whole minute, serving 100/s instead of 200/s.
    let mut i = with_signals(base(), |s| {
        s.queue_depth = 100.0;
        s.in_flight = 110.0;
        s.arrival_rate = 100.0;
        s.arrival_rate_short = Some(100.0);
        s.observed_throughput = Some(100.0);
    });
    i.fleet = fleet(&[("f32", 2, 2)]);
    let mut mem = mem_target("f32");
    for k in 0..8 {
        let d = decide(&i, &mem, T0.plus(10.0 * k as f64));
        mem = d.memory;
    }
    assert!(mem.capacity_speed < 0.8, "{}", mem.capacity_speed);
    // Not saturated: no correction downwards.
    let quiet = with_signals(base(), |s| s.observed_throughput = Some(10.0));
    let d = decide(&quiet, &PolicyMemory::default(), T0);
    assert_eq!(d.memory.capacity_speed, 1.0);
}

#[test]
fn validate_names_the_bad_field() {
    let mut i = base();
    assert!(i.validate().is_ok());
    i.scaling.min_replicas = 30;
    let e = i.validate().unwrap_err().to_string();
    assert!(e.contains("scaling.minReplicas"), "{e}");
    let mut i = base();
    i.targets.p95_latency_ms = 0.0;
    assert!(
        i.validate()
            .unwrap_err()
            .to_string()
            .contains("p95LatencyMs")
    );
    let mut i = base();
    i.variants.clear();
    assert!(i.validate().is_err());
}

#[test]
fn changes_says_when_an_event_is_due() {
    let steady = with_signals(base(), |s| s.in_flight = 24.0);
    let d = decide(&steady, &mem_target("f32"), T0);
    assert!(!d.changes(&steady.fleet), "{}", d.message);
    let busy = with_signals(base(), |s| s.in_flight = 42.0);
    let d = decide(&busy, &mem_target("f32"), T0);
    assert!(d.changes(&busy.fleet));
}

#[test]
fn decide_is_deterministic() {
    let i = with_signals(base(), |s| s.in_flight = 42.0);
    let a = decide(&i, &mem_target("f32"), T0);
    let b = decide(&i, &mem_target("f32"), T0);
    assert_eq!(a, b);
}
