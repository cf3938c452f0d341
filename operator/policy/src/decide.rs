//! The decision: replicas per variant from signals, capacity, price and memory.
//!
//! Pure: a function of its arguments only (the clock is `now`). It never panics on
//! odd input; [`DecisionInput::validate`] says whether an input is meaningful.

use std::collections::BTreeMap;

use crate::decision::{Decision, DecisionConditions, DecisionReason, Recommendations};
use crate::input::{BudgetPolicy, DecisionInput, Signals, Timestamp, VariantSpec};
use crate::memory::{DemandSample, PolicyMemory, Recommendation, SwitchCandidate};

/// Decides the replicas of each variant for this step.
///
/// Rules, in the order they apply (details in `docs/autoscaling.md`):
/// 1. Signals missing, older than `tuning.max_signal_age_s`, or NaN/negative: hold
///    the fleet (only raised to `min_replicas`), `metrics_available = false`.
/// 2. Recommendations for the target variant: requests in the system ÷ target per
///    replica; forecast arrival rate ÷ capacity (profile × online correction, under
///    `target_utilization`, and the p95 model); p95 over target → ready replicas ×
///    min(p95/target, `max_latency_step`), once the fleet has been fully Ready for
///    `latency_window_s`. The maximum wins, never below min.
/// 3. Burst mode when requests in the system reach `burst_threshold` × their
///    stable-window mean (or the short-window rate that multiple of the stable rate)
///    and need more than the ready replicas: scale-down is held for a stable window.
///    At its onset, and while the Ready fleet clears it before a new replica would be
///    Ready (its observed startup; `backlog_drain_s` until one has been seen), the
///    backlog is sized by the rate that clears it in that time.
/// 4. Up at once; down only to the highest recommendation over
///    `scale_down_delay_s`, removing at most `max_scale_down_fraction` per step.
///    What is remembered is the stable window's demand (its rate and its mean of
///    requests in the system) and the p95's; in burst mode only the burst's rate.
/// 5. No replicas added while pods are Pending as Unschedulable; max respected.
/// 6. Variant: the cheapest allowed variant within the quality limit whose need fits
///    under max; a switch needs a `switch_min_saving` saving sustained for
///    `switch_window_s` (at once if the current variant no longer qualifies, or costs
///    more than `max_cost_per_hour` while the cheaper one fits it), and runs
///    as a surge: old replicas stay until the new variant's are Ready.
/// 7. Budget: when even the cheapest costs more than `max_cost_per_hour`,
///    `HoldBudget` caps replicas (choosing the variant with the best predicted p95
///    under the cap) and `HoldSlo` exceeds it; either way `budget_constrained` says so.
pub fn decide(input: &DecisionInput, memory: &PolicyMemory, now: Timestamp) -> Decision {
    let tuning = &input.tuning;
    let mut mem = memory.clone();
    mem.prune(
        now,
        input.scaling.scale_down_delay_s.max(0.0),
        tuning.stable_window_s,
    );
    let min = input.scaling.min_replicas;
    let max = input.scaling.max_replicas.max(min);

    let eligible: Vec<&VariantSpec> = input
        .variants
        .iter()
        .filter(|v| qualifies(v, input))
        .collect();
    let current = current_variant(input, &mem);
    let signals = usable_signals(input.signals, tuning.max_signal_age_s);

    if eligible.is_empty() {
        let why = match input.budget.max_quality_loss {
            Some(q) => format!("no allowed variant has a quality loss within {q}"),
            None => "no variant is allowed".to_string(),
        };
        return hold(
            input,
            mem,
            current,
            DecisionReason::NoFeasibleVariant,
            why,
            signals.is_ok(),
        );
    }
    let s = match signals {
        Ok(s) => s,
        Err(why) => {
            let target = current.or_else(|| cheapest_at(&eligible, min));
            mem.observed_since = None;
            return hold(
                input,
                mem,
                target,
                DecisionReason::MetricsUnavailable,
                format!("metrics unavailable ({why})"),
                false,
            );
        }
    };

    let observed_since = *mem.observed_since.get_or_insert(now);
    let target_q = input.targets.queue_depth_per_replica;
    let p95_target = input.targets.p95_latency_ms;
    let in_system = s.in_flight.max(s.queue_depth);

    if tuning.correct_capacity {
        correct_capacity(&mut mem, input, &s, now);
    }
    let speed = mem.capacity_speed;

    // Burst detection (KPA's panic mode): short window against the stable window.
    mem.remember_demand(DemandSample { at: now, in_system }, tuning.stable_window_s);
    let stable_mean =
        mem.demand.iter().map(|d| d.in_system).sum::<f64>() / mem.demand.len().max(1) as f64;
    let rate_short = s.arrival_rate_short.unwrap_or(s.arrival_rate);
    let forecast_rate = s.arrival_rate.max(rate_short);
    let queue_rec = ceil_u32(in_system / target_q);
    let ready_all = input.fleet.ready_total();
    let concurrency_jump = stable_mean > 0.0 && in_system >= tuning.burst_threshold * stable_mean;
    let rate_jump = s.arrival_rate > 0.0 && rate_short >= tuning.burst_threshold * s.arrival_rate;
    let burst_ratio = if concurrency_jump {
        in_system / stable_mean
    } else if rate_jump {
        rate_short / s.arrival_rate
    } else {
        0.0
    };
    let demand = Demand {
        queue_rec,
        in_system,
        stable_rate: s.arrival_rate,
        forecast_rate,
        speed,
        drain_horizon_s: input
            .fleet
            .startup_s
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(tuning.backlog_drain_s),
    };
    let plans_for = |mem: &PolicyMemory, bursting: bool| -> Vec<Plan> {
        eligible
            .iter()
            .map(|v| plan(v, input, mem, &demand, bursting))
            .collect()
    };
    let plain_plans = plans_for(&mem, false);
    // Burst only when the jump needs more than the Ready replicas of the variant serving.
    let serving = current
        .and_then(|c| plain_plans.iter().find(|p| p.v.name == c.name))
        .unwrap_or_else(|| cheapest_plan(&plain_plans, max));
    let burst_now = (concurrency_jump || rate_jump) && serving.now > ready_all;
    if burst_now {
        mem.burst_until = Some(now.plus(tuning.stable_window_s));
    }
    let in_burst = mem.burst_until.is_some_and(|t| t > now);
    // At a burst's onset, and for the rest of burst mode while the Ready fleet clears
    // it within `backlog_drain_s`, the backlog is sized by the rate that clears it in
    // that time, not at `queue_depth_per_replica` each: replicas started for a backlog
    // the fleet drains before they are Ready only cost. A backlog that grows or
    // shrinks slowly (a saturated fleet, clients that send as fast as they are
    // answered) is demand, and the plain queue rule sizes it.
    let ready_capacity: f64 = input
        .fleet
        .variants
        .iter()
        .filter_map(|(name, r)| {
            let v = input.variants.iter().find(|v| &v.name == name)?;
            Some(r.ready as f64 * v.capacity.items_per_second * speed)
        })
        .sum();
    let headroom = ready_capacity - forecast_rate;
    let drains = headroom > 0.0 && in_system / headroom <= demand.drain_horizon_s;
    let plans = if burst_now || (in_burst && drains) {
        plans_for(&mem, true)
    } else {
        plain_plans
    };

    // Variant choice.
    let best = cheapest_plan(&plans, max);
    let mut conditions = DecisionConditions {
        metrics_available: true,
        scaling_limited: None,
        budget_constrained: None,
    };
    let mut budget_cap: Option<u32> = None;
    let mut forced: Option<&Plan> = None;
    if let Some(limit) = input.budget.max_cost_per_hour
        && best.cost(max) > limit + 1e-9
    {
        match input.budget.policy {
            BudgetPolicy::HoldSlo => {
                let cost = best.cost(max);
                conditions.budget_constrained = Some(format!(
                    "holding the p95 target needs {} replicas of {} at {:.2}/h, {:.2}/h over the {:.2}/h budget",
                    best.need.min(max),
                    best.v.name,
                    cost,
                    cost - limit,
                    limit
                ));
            }
            BudgetPolicy::HoldBudget => {
                let (p, cap, p95) =
                    best_under_budget(&plans, limit, min, max, forecast_rate, speed, p95_target);
                budget_cap = Some(cap);
                forced = Some(p);
                let against = if p95.is_some_and(|x| x <= p95_target) {
                    "within"
                } else {
                    "over"
                };
                conditions.budget_constrained = Some(format!(
                    "the {:.2}/h budget caps {} at {} replicas (needs {}): predicted p95 {} {against} the {:.0} ms target",
                    limit,
                    p.v.name,
                    cap,
                    p.need,
                    fmt_ms(p95),
                    p95_target
                ));
            }
        }
    }

    let current_plan = current.and_then(|c| plans.iter().find(|p| p.v.name == c.name));
    let mut switch_note: Option<String> = None;
    let target: &Plan = if let Some(p) = forced {
        mem.switch_candidate = None;
        p
    } else {
        match current_plan {
            None => {
                if let Some(c) = current {
                    switch_note = Some(format!("{} no longer qualifies", c.name));
                }
                mem.switch_candidate = None;
                best
            }
            Some(cur) if cur.v.name == best.v.name => {
                mem.switch_candidate = None;
                cur
            }
            Some(cur) if cur.need > max && best.need <= max => {
                mem.switch_candidate = None;
                switch_note = Some(format!(
                    "{} would need {} replicas, over maxReplicas {}",
                    cur.v.name, cur.need, max
                ));
                best
            }
            // Over the budget while a cheaper variant fits it: a breached limit does not
            // wait out the savings hysteresis.
            Some(cur)
                if input.budget.max_cost_per_hour.is_some_and(|limit| {
                    cur.cost(max) > limit + 1e-9 && best.cost(max) <= limit + 1e-9
                }) =>
            {
                mem.switch_candidate = None;
                switch_note = Some(format!(
                    "{} costs {:.2}/h, over the {:.2}/h budget; {} fits at {:.2}/h",
                    cur.v.name,
                    cur.cost(max),
                    input.budget.max_cost_per_hour.unwrap_or_default(),
                    best.v.name,
                    best.cost(max)
                ));
                best
            }
            Some(cur) => {
                let (cur_cost, best_cost) = (cur.cost(max), best.cost(max));
                let saving = if cur_cost > 0.0 {
                    1.0 - best_cost / cur_cost
                } else {
                    0.0
                };
                if saving >= tuning.switch_min_saving {
                    let since = match &mem.switch_candidate {
                        Some(c) if c.variant == best.v.name => c.since,
                        _ => now,
                    };
                    mem.switch_candidate = Some(SwitchCandidate {
                        variant: best.v.name.clone(),
                        since,
                        saving,
                    });
                    if now.since(since) >= tuning.switch_window_s
                        && input.fleet.pending_unschedulable.is_none()
                    {
                        mem.switch_candidate = None;
                        switch_note = Some(format!(
                            "{} costs {:.2}/h against {:.2}/h for {} ({:.0} % less for {:.0}s)",
                            best.v.name,
                            best_cost,
                            cur_cost,
                            cur.v.name,
                            saving * 100.0,
                            now.since(since)
                        ));
                        best
                    } else {
                        cur
                    }
                } else {
                    mem.switch_candidate = None;
                    cur
                }
            }
        }
    };
    let switching_now = current.is_some_and(|c| c.name != target.v.name);
    if switching_now {
        mem.last_switch_at = Some(now);
    }
    mem.target_variant = Some(target.v.name.clone());

    // Replicas of the target variant.
    let tv = target.v;
    let fleet_t = input.fleet.of(&tv.name);
    let cur_t = fleet_t.replicas;
    let settled = !switching_now
        && fleet_t.ready >= fleet_t.replicas
        && input
            .fleet
            .variants
            .iter()
            .all(|(n, r)| *n == tv.name || r.replicas == 0);
    if !settled {
        mem.settled_since = None;
    }
    let settled_since = if settled {
        Some(*mem.settled_since.get_or_insert(now))
    } else {
        None
    };
    let latency_settled = settled_since.is_some_and(|t| now.since(t) >= tuning.latency_window_s);
    let latency_rec = match s.p95_ms {
        Some(p95) if p95 > p95_target && fleet_t.ready > 0 && latency_settled => {
            let step = (p95 / p95_target).min(tuning.max_latency_step);
            ceil_u32(fleet_t.ready as f64 * step)
        }
        _ => 0,
    };
    let rec = target.now.max(latency_rec);
    // What the scale-down delay holds. A burst's backlog, and the p95 it inflates, is
    // held by burst mode (a stable window) only: once drained it says nothing about
    // sustained demand, which the burst's arrival rate does. Outside a burst: the
    // stable window's rate and requests in the system, and the p95. The short-window
    // readings scale up at once, but held for the delay they would keep the fleet at
    // the highest of thirty noisy readings.
    let remembered = if in_burst {
        target.rate_rec.max(min)
    } else {
        let queue_stable = ceil_u32(stable_mean / target_q);
        target
            .stable_rec
            .max(queue_stable)
            .max(latency_rec)
            .max(min)
    };
    mem.remember_recommendation(
        Recommendation {
            at: now,
            replicas: remembered,
            variant: tv.name.clone(),
        },
        input.scaling.scale_down_delay_s,
    );
    let window = target.window.max(rec);
    let mut deferred_by: Option<String> = None;
    let mut desired = if switching_now {
        window
    } else if rec >= cur_t {
        rec
    } else if in_burst {
        deferred_by = Some("burst mode".to_string());
        cur_t
    } else if now.since(observed_since) < input.scaling.scale_down_delay_s {
        deferred_by = Some(format!(
            "the {:.0}s scale-down delay (fresh signals for only {:.0}s)",
            input.scaling.scale_down_delay_s,
            now.since(observed_since)
        ));
        cur_t
    } else {
        let fraction = input.scaling.max_scale_down_fraction.clamp(0.0, 1.0);
        let removable = if fraction > 0.0 {
            ((cur_t as f64 * fraction).floor() as u32).max(1)
        } else {
            0
        };
        let step_floor = cur_t.saturating_sub(removable);
        let d = window.max(step_floor).min(cur_t);
        if d > rec {
            deferred_by = Some(if step_floor > window {
                format!("the scale-down step limit ({:.0} %)", fraction * 100.0)
            } else {
                format!(
                    "the {:.0}s scale-down delay (highest recommendation {window})",
                    input.scaling.scale_down_delay_s
                )
            });
        }
        d
    };
    let mut pending_blocked = false;
    if let Some(why) = &input.fleet.pending_unschedulable
        && desired > cur_t
    {
        pending_blocked = true;
        conditions.scaling_limited = Some(format!(
            "pods are Pending as Unschedulable ({why}): holding {} at {cur_t} replicas instead of {desired}",
            tv.name
        ));
        desired = cur_t;
    }
    let over_max = desired > max;
    if over_max {
        conditions.scaling_limited = Some(format!(
            "{} needs {desired} replicas of {}, over maxReplicas {max}",
            if latency_rec > target.now {
                "the observed p95"
            } else {
                "the demand"
            },
            tv.name
        ));
    }
    desired = desired.clamp(min, max);
    let mut budget_capped = false;
    if let Some(cap) = budget_cap
        && desired > cap
    {
        budget_capped = true;
        desired = cap.max(min);
    }

    if desired != cur_t {
        // The fleet changes: the p95 will describe it only a full window from now.
        mem.settled_since = None;
    }

    // Surge rollout: other variants keep their replicas until the target's are Ready.
    let mut replicas = BTreeMap::new();
    // At least one Ready replica of the target before anything else goes.
    let rolled_out = fleet_t.ready >= desired.max(1);
    let mut holding_old: Vec<String> = Vec::new();
    for (name, vr) in &input.fleet.variants {
        if *name == tv.name {
            continue;
        }
        let keep = if rolled_out { 0 } else { vr.replicas };
        if keep > 0 {
            holding_old.push(format!("{name} holds {keep}"));
        }
        replicas.insert(name.clone(), keep);
    }
    replicas.insert(tv.name.clone(), desired);

    let predicted_p95_ms = predicted_p95(tv, desired, forecast_rate, speed);
    let projected_cost_per_hour = cost_of(&replicas, &input.variants);

    let ready_t = fleet_t.ready;
    let (reason, message) = if switching_now {
        (
            DecisionReason::VariantSwitch,
            format!(
                "switching {}→{}: {}; surging {} to {desired} replicas before the old replicas go",
                current.map_or("-", |c| c.name.as_str()),
                tv.name,
                switch_note.unwrap_or_default(),
                tv.name
            ),
        )
    } else if !holding_old.is_empty() {
        (
            DecisionReason::RolloutInProgress,
            format!(
                "rolling out {}: {ready_t}/{desired} Ready; {} until then",
                tv.name,
                holding_old.join(", ")
            ),
        )
    } else if pending_blocked {
        (
            DecisionReason::PendingUnschedulable,
            conditions.scaling_limited.clone().unwrap_or_default(),
        )
    } else if budget_capped {
        (
            DecisionReason::BudgetCapped,
            conditions.budget_constrained.clone().unwrap_or_default(),
        )
    } else if over_max && desired >= cur_t {
        (
            DecisionReason::MaxReplicas,
            conditions.scaling_limited.clone().unwrap_or_default(),
        )
    } else if desired > cur_t {
        let scaling = format!("scaling {} {cur_t}→{desired}", tv.name);
        if burst_now {
            (
                DecisionReason::ScaleUpBurst,
                format!(
                    "burst: demand at {burst_ratio:.1}× the {:.0}s average ({} in the system, {forecast_rate:.1}/s): {scaling}{}",
                    tuning.stable_window_s,
                    fmt_n(in_system),
                    if target.queue_rec < queue_rec {
                        format!(
                            " (the backlog sized to clear within {:.0}s, {}, not at {}/replica)",
                            demand.drain_horizon_s,
                            if input.fleet.startup_s.is_some() {
                                "a new replica's startup"
                            } else {
                                "the default drain time"
                            },
                            fmt_n(target_q)
                        )
                    } else {
                        String::new()
                    }
                ),
            )
        } else if target.queue_rec >= target.rate_rec && target.queue_rec >= latency_rec {
            (
                DecisionReason::ScaleUpQueueDepth,
                format!(
                    "queue depth {} over {ready_t} ready replicas (target {}/replica): {scaling}",
                    fmt_n(in_system),
                    fmt_n(target_q)
                ),
            )
        } else if target.rate_rec >= latency_rec {
            (
                DecisionReason::ScaleUpArrivalRate,
                format!(
                    "arrival rate {forecast_rate:.1}/s needs {} replicas at {:.0}/s each ({:.0} % utilization, p95 ≤ {p95_target:.0} ms): {scaling}",
                    target.rate_rec,
                    tv.capacity.items_per_second * speed,
                    tuning.target_utilization * 100.0
                ),
            )
        } else {
            (
                DecisionReason::ScaleUpLatency,
                format!(
                    "p95 {} over the {p95_target:.0} ms target on {ready_t} ready replicas: {scaling}",
                    fmt_ms(s.p95_ms)
                ),
            )
        }
    } else if desired < cur_t {
        (
            DecisionReason::ScaleDown,
            format!(
                "demand fell (recommendation {rec}, highest over the last {:.0}s {window}): scaling {} {cur_t}→{desired}{}",
                input.scaling.scale_down_delay_s,
                tv.name,
                deferred_by
                    .as_ref()
                    .map(|by| format!(", no lower for now: {by}"))
                    .unwrap_or_default()
            ),
        )
    } else if let Some(by) = deferred_by {
        (
            DecisionReason::ScaleDownDeferred,
            format!(
                "{cur_t} replicas of {} kept although {rec} would do: held by {by}",
                tv.name
            ),
        )
    } else {
        (
            DecisionReason::Steady,
            format!(
                "{desired} replicas of {} ({ready_t} ready) hold the load: {} in the system, {:.1}/s, p95 {}",
                tv.name,
                fmt_n(in_system),
                s.arrival_rate,
                fmt_ms(s.p95_ms)
            ),
        )
    };

    Decision {
        replicas,
        target_variant: tv.name.clone(),
        reason,
        message,
        predicted_p95_ms,
        projected_cost_per_hour,
        conditions,
        recommendations: Recommendations {
            queue_depth: target.queue_rec,
            arrival_rate: target.rate_rec,
            latency: latency_rec,
            burst: in_burst,
        },
        memory: mem,
    }
}

/// What the signals say about demand, shared by every variant's plan.
struct Demand {
    /// ⌈requests in the system ÷ target per replica⌉.
    queue_rec: u32,
    in_system: f64,
    /// The stable window's arrival rate.
    stable_rate: f64,
    /// max(stable, short window).
    forecast_rate: f64,
    /// Observed ÷ profiled capacity.
    speed: f64,
    /// A backlog the Ready fleet clears within this many seconds (a new replica's
    /// observed startup, else `Tuning::backlog_drain_s`) is sized by that drain rate.
    drain_horizon_s: f64,
}

/// One variant's sizing at this step.
struct Plan<'a> {
    v: &'a VariantSpec,
    /// From forecast arrival rate alone.
    rate_rec: u32,
    /// From the stable window's arrival rate alone.
    stable_rec: u32,
    /// From requests in the system (in burst mode: the rate that clears them).
    queue_rec: u32,
    /// max(min, queue, rate): what this variant needs now.
    now: u32,
    /// Highest remembered recommendation over the scale-down delay, in this variant's replicas.
    window: u32,
    /// max(now, window): the variant's steady need, what variants are compared on.
    need: u32,
}

impl Plan<'_> {
    fn cost(&self, max: u32) -> f64 {
        self.need.min(max) as f64 * self.v.price_per_replica_hour
    }
}

fn plan<'a>(
    v: &'a VariantSpec,
    input: &DecisionInput,
    mem: &PolicyMemory,
    d: &Demand,
    in_burst: bool,
) -> Plan<'a> {
    let needed = |rate: f64| {
        v.capacity.replicas_needed(
            rate,
            d.speed,
            input.targets.p95_latency_ms,
            input.tuning.target_utilization,
        )
    };
    let rate_rec = needed(d.forecast_rate);
    let queue_rec = if in_burst && input.tuning.backlog_drain_s > 0.0 {
        let drain = needed(d.forecast_rate + d.in_system / d.drain_horizon_s);
        d.queue_rec.min(drain)
    } else {
        d.queue_rec
    };
    let now = queue_rec.max(rate_rec).max(input.scaling.min_replicas);
    let window = mem
        .recommendations
        .iter()
        .map(|r| convert(r, v, &input.variants))
        .max()
        .unwrap_or(0);
    Plan {
        v,
        rate_rec,
        stable_rec: needed(d.stable_rate),
        queue_rec,
        now,
        window,
        need: now.max(window),
    }
}

/// A remembered recommendation in replicas of `to`, by the ratio of capacities.
fn convert(r: &Recommendation, to: &VariantSpec, variants: &[VariantSpec]) -> u32 {
    if r.variant == to.name {
        return r.replicas;
    }
    match variants.iter().find(|v| v.name == r.variant) {
        Some(from) if to.capacity.items_per_second > 0.0 => ceil_u32(
            r.replicas as f64 * from.capacity.items_per_second / to.capacity.items_per_second,
        ),
        _ => r.replicas,
    }
}

/// The cheapest plan whose need fits under max; if none does, the one needing fewest.
fn cheapest_plan<'p, 'a>(plans: &'p [Plan<'a>], max: u32) -> &'p Plan<'a> {
    let key = |p: &Plan| (p.cost(max), p.v.quality_loss);
    let feasible = plans.iter().filter(|p| p.need <= max);
    let by_cost = |a: &&Plan, b: &&Plan| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    feasible
        .min_by(by_cost)
        .or_else(|| plans.iter().min_by_key(|p| p.need))
        .expect("plans is non-empty: one per eligible variant")
}

/// Under a budget: for each variant, the replicas the budget buys (within min..=max and
/// no more than needed). Ranked: within budget first (min may force a breach), then
/// those whose predicted p95 meets the target (cheapest first), then by predicted p95.
fn best_under_budget<'p, 'a>(
    plans: &'p [Plan<'a>],
    limit: f64,
    min: u32,
    max: u32,
    rate: f64,
    speed: f64,
    p95_target: f64,
) -> (&'p Plan<'a>, u32, Option<f64>) {
    // (plan, replicas, predicted p95, rank: over budget, misses target, cost or p95)
    type Ranked<'p, 'a> = (&'p Plan<'a>, u32, Option<f64>, (bool, bool, f64));
    let mut options: Vec<Ranked> = plans
        .iter()
        .map(|p| {
            let price = p.v.price_per_replica_hour;
            let affordable = if price > 0.0 {
                (limit / price + 1e-9).floor().min(u32::MAX as f64) as u32
            } else {
                u32::MAX
            };
            let n = affordable.min(p.need).clamp(min, max);
            let p95 = predicted_p95(p.v, n, rate, speed);
            let cost = n as f64 * price;
            let meets = p95.is_some_and(|x| x <= p95_target);
            let rank = (
                cost > limit + 1e-9,
                !meets,
                if meets { cost } else { p95.unwrap_or(f64::MAX) },
            );
            (p, n, p95, rank)
        })
        .collect();
    options.sort_by(|a, b| a.3.partial_cmp(&b.3).unwrap_or(std::cmp::Ordering::Equal));
    let (p, n, p95, _) = options.swap_remove(0);
    (p, n, p95)
}

fn predicted_p95(v: &VariantSpec, replicas: u32, rate: f64, speed: f64) -> Option<f64> {
    if replicas == 0 {
        return if rate > 0.0 { None } else { Some(0.0) };
    }
    v.capacity.predict_p95_ms(rate / replicas as f64, speed)
}

/// Holds the fleet as it is (raised to min, lowered to max), finishing a surge
/// rollout whose target is Ready. Used when no decision can be computed.
fn hold(
    input: &DecisionInput,
    mut mem: PolicyMemory,
    target: Option<&VariantSpec>,
    reason: DecisionReason,
    why: String,
    metrics_available: bool,
) -> Decision {
    let min = input.scaling.min_replicas;
    let max = input.scaling.max_replicas.max(min);
    let mut replicas: BTreeMap<String, u32> = input
        .fleet
        .variants
        .iter()
        .map(|(n, v)| (n.clone(), v.replicas))
        .collect();
    let target_name = target.map(|t| t.name.clone());
    let mut message = why.clone();
    if let Some(name) = &target_name {
        let fleet_t = input.fleet.of(name);
        let desired = fleet_t.replicas.clamp(min, max);
        replicas.insert(name.clone(), desired);
        if fleet_t.ready >= desired.max(1) {
            for (n, r) in replicas.iter_mut() {
                if n != name {
                    *r = 0;
                }
            }
        }
        message = format!("{why}: holding {desired} replicas of {name}");
        mem.target_variant = Some(name.clone());
    }
    let projected_cost_per_hour = cost_of(&replicas, &input.variants);
    Decision {
        replicas,
        target_variant: target_name.unwrap_or_default(),
        reason,
        message,
        predicted_p95_ms: None,
        projected_cost_per_hour,
        conditions: DecisionConditions {
            metrics_available,
            scaling_limited: (reason == DecisionReason::NoFeasibleVariant).then_some(why),
            budget_constrained: None,
        },
        recommendations: Recommendations::default(),
        memory: mem,
    }
}

fn qualifies(v: &VariantSpec, input: &DecisionInput) -> bool {
    v.allowed
        && v.capacity.items_per_second > 0.0
        && input
            .budget
            .max_quality_loss
            .is_none_or(|q| v.quality_loss <= q + 1e-12)
}

/// The variant the fleet is converging to: remembered, else the one with most replicas.
fn current_variant<'a>(input: &'a DecisionInput, mem: &PolicyMemory) -> Option<&'a VariantSpec> {
    let by_name = |n: &str| input.variants.iter().find(|v| v.name == n);
    if let Some(v) = mem.target_variant.as_deref().and_then(by_name) {
        return Some(v);
    }
    input
        .fleet
        .variants
        .iter()
        .filter(|(_, r)| r.replicas > 0)
        .max_by_key(|(n, r)| (r.replicas, std::cmp::Reverse((*n).clone())))
        .and_then(|(n, _)| by_name(n))
}

/// For a first decision without signals: the variant cheapest at `min` replicas.
fn cheapest_at<'a>(eligible: &[&'a VariantSpec], min: u32) -> Option<&'a VariantSpec> {
    eligible.iter().copied().min_by(|a, b| {
        let ka = (
            a.price_per_replica_hour * min as f64,
            -a.capacity.items_per_second,
        );
        let kb = (
            b.price_per_replica_hour * min as f64,
            -b.capacity.items_per_second,
        );
        ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// Signals fit to decide on, or why not. Optional fields that are NaN become `None`.
fn usable_signals(signals: Option<Signals>, max_age_s: f64) -> Result<Signals, String> {
    let Some(mut s) = signals else {
        return Err("no signals".to_string());
    };
    if !(s.age_seconds.is_finite() && s.age_seconds <= max_age_s) {
        return Err(format!(
            "signals are {:.0}s old, over the {max_age_s:.0}s limit",
            s.age_seconds
        ));
    }
    for (name, x) in [
        ("queue depth", s.queue_depth),
        ("in-flight", s.in_flight),
        ("arrival rate", s.arrival_rate),
    ] {
        if !(x.is_finite() && x >= 0.0) {
            return Err(format!("{name} is {x}"));
        }
    }
    let ok = |x: &f64| x.is_finite() && *x >= 0.0;
    s.arrival_rate_short = s.arrival_rate_short.filter(ok);
    s.p95_ms = s.p95_ms.filter(ok);
    s.observed_throughput = s.observed_throughput.filter(ok);
    Ok(s)
}

/// Learns observed ÷ profiled capacity, only from a fleet of one variant that has been
/// saturated (a full batch waiting per ready replica) over the whole stable window.
fn correct_capacity(mem: &mut PolicyMemory, input: &DecisionInput, s: &Signals, now: Timestamp) {
    let mut ready = input.fleet.variants.iter().filter(|(_, r)| r.ready > 0);
    let (Some((name, r)), None) = (ready.next(), ready.next()) else {
        return;
    };
    let (Some(v), Some(thr)) = (
        input.variants.iter().find(|v| &v.name == name),
        s.observed_throughput,
    ) else {
        return;
    };
    let full = r.ready as f64 * v.capacity.max_batch() as f64;
    let window = input.tuning.stable_window_s;
    let covered = mem
        .demand
        .first()
        .is_some_and(|d| now.since(d.at) >= 0.8 * window);
    let saturated =
        covered && s.queue_depth >= full && mem.demand.iter().all(|d| d.in_system >= full);
    let sample = thr / (r.ready as f64 * v.capacity.items_per_second);
    if saturated || sample > mem.capacity_speed {
        mem.capacity_speed = (0.7 * mem.capacity_speed + 0.3 * sample).clamp(0.25, 4.0);
    }
}

fn cost_of(replicas: &BTreeMap<String, u32>, variants: &[VariantSpec]) -> f64 {
    replicas
        .iter()
        .map(|(n, r)| {
            let price = variants
                .iter()
                .find(|v| &v.name == n)
                .map_or(0.0, |v| v.price_per_replica_hour);
            *r as f64 * price
        })
        .sum()
}

fn ceil_u32(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        x.ceil().min(u32::MAX as f64) as u32
    } else {
        0
    }
}

fn fmt_ms(p: Option<f64>) -> String {
    p.map_or("unbounded".to_string(), |p| format!("{p:.0} ms"))
}

fn fmt_n(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}
