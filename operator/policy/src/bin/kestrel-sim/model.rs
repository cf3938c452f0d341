//! The discrete-event model of a serving fleet.
//!
//! Requests arrive at a Kubernetes Service that picks a Ready, non-draining replica at
//! random (kube-proxy's iptables mode). Each replica admits at most `max_queue`
//! waiting requests (beyond: 429, counted as rejected) and runs continuous dynamic
//! batching: when idle it takes up to `max_batch` waiting requests and is busy for the
//! profiled service time of that batch size (± a seeded jitter). New replicas become
//! Ready after `cold_start_s`; removed replicas stop receiving requests at once, finish
//! what they hold, then go (not-Ready replicas go first, newest first, as a ReplicaSet
//! does). A replica costs from being scheduled to removal; with `max_scheduled`,
//! replicas beyond it stay Pending (as Unschedulable) until room frees.
//!
//! Every second the model records a [`Sample`]; every `scrape_s` one of them becomes a
//! Prometheus scrape. Policies see the fleet only through [`View`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use kestrel_policy::VariantCapacity;

use crate::rng::Rng;

/// One variant as the simulator knows it.
#[derive(Debug, Clone)]
pub struct SimVariant {
    pub name: String,
    pub price_per_hour: f64,
    pub quality_loss: f64,
    pub capacity: VariantCapacity,
}

/// The replica model's parameters (the same for every policy).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub variants: Vec<SimVariant>,
    pub p95_target_ms: f64,
    pub cold_start_s: f64,
    pub max_queue: usize,
    pub max_batch: u32,
    pub service_jitter: f64,
    pub scrape_s: f64,
    pub seed: u64,
    /// At most this many replicas (all variants) fit on the nodes; the rest stay
    /// Pending as Unschedulable until room frees (and cost nothing meanwhile).
    pub max_scheduled: Option<u32>,
}

/// Desired replicas per variant index.
pub type Replicas = BTreeMap<usize, u32>;

/// A fleet policy: told the time and what it may see, it answers desired replicas.
pub trait Autoscaler {
    /// Seconds between evaluations.
    fn period_s(&self) -> f64;
    /// Replicas at time 0 (Ready at once).
    fn initial(&self) -> Replicas;
    /// Desired replicas per variant now; variants left out keep their count.
    fn evaluate(&mut self, now: f64, view: &View) -> Replicas;
    /// Lines explaining the run (Kestrel: its decisions); empty by default.
    fn explain(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The fleet-wide state at one instant (recorded every second).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub t: f64,
    /// Waiting requests, all replicas.
    pub queue: f64,
    /// Waiting + running requests, all replicas.
    pub in_flight: f64,
    /// Requests arrived so far (admitted or rejected).
    pub arrivals: u64,
    /// Requests answered so far.
    pub completions: u64,
}

/// Replicas of one variant as the Kubernetes API would report them.
#[derive(Debug, Clone, Copy, Default)]
pub struct VariantCount {
    /// Not draining (the Deployment's replicas).
    pub replicas: u32,
    /// Ready and not draining.
    pub ready: u32,
}

/// What a policy may observe.
pub struct View<'a> {
    /// One sample per second, oldest first.
    pub samples: &'a [Sample],
    /// Samples taken at scrape times, oldest first.
    pub scrapes: &'a [Sample],
    /// (completion time, latency ms) of every answered request, in completion order.
    pub latencies: &'a [(f64, f64)],
    /// Per variant index.
    pub fleet: Vec<VariantCount>,
    /// Some replica is Pending as Unschedulable.
    pub pending: bool,
    /// Median creation-to-Ready seconds of the replicas started so far (what the
    /// operator reads from its pods); none before the first.
    pub startup_s: Option<f64>,
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl View<'_> {
    /// The newest scrape at or before `t`.
    pub fn scrape_at(&self, t: f64) -> Option<&Sample> {
        let i = self.scrapes.partition_point(|s| s.t <= t);
        i.checked_sub(1).map(|i| &self.scrapes[i])
    }

    /// Mean in-flight over per-second samples in (t − window, t].
    pub fn mean_in_flight(&self, t: f64, window: f64) -> f64 {
        let hi = self.samples.partition_point(|s| s.t <= t);
        let lo = self.samples.partition_point(|s| s.t <= t - window);
        let n = hi.saturating_sub(lo);
        if n == 0 {
            return 0.0;
        }
        self.samples[lo..hi]
            .iter()
            .map(|s| s.in_flight)
            .sum::<f64>()
            / n as f64
    }

    /// The `q` quantile (0..1) of latencies completed in (from, to]; `None` if none.
    pub fn latency_quantile(&self, from: f64, to: f64, q: f64) -> Option<f64> {
        let hi = self.latencies.partition_point(|l| l.0 <= to);
        let lo = self.latencies.partition_point(|l| l.0 <= from);
        quantile(self.latencies[lo..hi].iter().map(|l| l.1).collect(), q)
    }
}

/// The `q` quantile (nearest rank) of `v`; `None` when empty.
pub fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub arrivals: u64,
    pub completed: u64,
    pub rejected: u64,
    pub within_target: u64,
    pub p95_ms: f64,
    pub replica_hours: f64,
    /// Replica-hours per variant index.
    pub variant_hours: Vec<f64>,
    pub cost: f64,
    pub scale_events: u64,
    /// Every 10 s: (time, replicas scheduled, p95 ms of the last 30 s of completions).
    pub timeline: Vec<(f64, u32, Option<f64>)>,
}

impl RunResult {
    /// Share of all requests (rejected ones included) answered within the p95 target.
    pub fn slo_attainment(&self) -> f64 {
        if self.arrivals == 0 {
            1.0
        } else {
            self.within_target as f64 / self.arrivals as f64
        }
    }
}

struct Replica {
    variant: usize,
    /// When it was scheduled (cost starts); for a Pending replica, when it was asked for.
    created: f64,
    pending: bool,
    removed: Option<f64>,
    ready: bool,
    draining: bool,
    queue: VecDeque<f64>,
    running: Vec<f64>,
}

impl Replica {
    fn alive(&self) -> bool {
        self.removed.is_none()
    }
    fn idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    BatchDone(usize),
    Ready(usize),
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    // Reversed: BinaryHeap pops the earliest (then the first scheduled).
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

struct Fleet<'c> {
    cfg: &'c ModelConfig,
    replicas: Vec<Replica>,
    routable: Vec<usize>,
    events: BinaryHeap<Event>,
    seq: u64,
    rng: Rng,
    latencies: Vec<(f64, f64)>,
    arrivals: u64,
    rejected: u64,
    queued: u64,
    /// Creation-to-Ready seconds of every replica that became Ready after starting.
    startups: Vec<f64>,
}

impl Fleet<'_> {
    fn schedule(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.events.push(Event {
            t,
            seq: self.seq,
            kind,
        });
    }

    fn reroute(&mut self) {
        self.routable = (0..self.replicas.len())
            .filter(|&i| {
                let r = &self.replicas[i];
                r.alive() && r.ready && !r.draining
            })
            .collect();
    }

    fn arrive(&mut self, t: f64) {
        self.arrivals += 1;
        if self.routable.is_empty() {
            self.rejected += 1;
            return;
        }
        let i = self.routable[self.rng.below(self.routable.len())];
        if self.replicas[i].queue.len() >= self.cfg.max_queue {
            self.rejected += 1;
            return;
        }
        self.replicas[i].queue.push_back(t);
        self.queued += 1;
        if self.replicas[i].running.is_empty() {
            self.start_batch(i, t);
        }
    }

    fn start_batch(&mut self, i: usize, t: f64) {
        let r = &mut self.replicas[i];
        let k = r.queue.len().min(self.cfg.max_batch as usize);
        if k == 0 {
            return;
        }
        r.running.extend(r.queue.drain(..k));
        self.queued -= k as u64;
        let base = self.cfg.variants[r.variant]
            .capacity
            .batch_latency_ms(k as f64);
        let jitter = 1.0 + self.cfg.service_jitter * (2.0 * self.rng.uniform() - 1.0);
        self.schedule(t + base * jitter / 1000.0, Kind::BatchDone(i));
    }

    fn batch_done(&mut self, i: usize, t: f64) {
        let done: Vec<f64> = std::mem::take(&mut self.replicas[i].running);
        for a in done {
            self.latencies.push((t, (t - a) * 1000.0));
        }
        if !self.replicas[i].queue.is_empty() {
            self.start_batch(i, t);
        } else if self.replicas[i].draining {
            self.replicas[i].removed = Some(t);
            self.schedule_pending(t);
        }
    }

    fn scheduled(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|r| r.alive() && !r.pending)
            .count() as u32
    }

    /// Schedules Pending replicas, oldest first, while there is room.
    fn schedule_pending(&mut self, t: f64) {
        let Some(limit) = self.cfg.max_scheduled else {
            return;
        };
        let mut room = limit.saturating_sub(self.scheduled());
        for i in 0..self.replicas.len() {
            if room == 0 {
                break;
            }
            let r = &mut self.replicas[i];
            if r.alive() && r.pending && !r.draining {
                r.pending = false;
                r.created = t;
                room -= 1;
                self.schedule(t + self.cfg.cold_start_s, Kind::Ready(i));
            }
        }
    }

    fn add(&mut self, variant: usize, t: f64, ready: bool) {
        let pending = self
            .cfg
            .max_scheduled
            .is_some_and(|limit| self.scheduled() >= limit);
        let ready = ready && !pending;
        self.replicas.push(Replica {
            variant,
            created: t,
            pending,
            removed: None,
            ready,
            draining: false,
            queue: VecDeque::new(),
            running: Vec::new(),
        });
        if !ready && !pending {
            let i = self.replicas.len() - 1;
            self.schedule(t + self.cfg.cold_start_s, Kind::Ready(i));
        }
    }

    fn count(&self, variant: usize) -> VariantCount {
        let mut c = VariantCount::default();
        for r in &self.replicas {
            if r.variant == variant && r.alive() && !r.draining {
                c.replicas += 1;
                c.ready += u32::from(r.ready);
            }
        }
        c
    }

    /// Sets the replicas of `variant` to `want`: adds cold replicas or removes
    /// not-Ready ones first, then the newest Ready ones (which drain).
    fn set(&mut self, variant: usize, want: u32, t: f64) {
        let have = self.count(variant).replicas;
        if want > have {
            for _ in have..want {
                self.add(variant, t, false);
            }
        } else if want < have {
            let mut victims: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| {
                    let r = &self.replicas[i];
                    r.variant == variant && r.alive() && !r.draining
                })
                .collect();
            // Not Ready first, then newest first.
            victims.sort_by(|&a, &b| {
                let (ra, rb) = (&self.replicas[a], &self.replicas[b]);
                ra.ready
                    .cmp(&rb.ready)
                    .then(rb.created.total_cmp(&ra.created))
                    .then(b.cmp(&a))
            });
            // Pending first, then not Ready, then newest first.
            victims.sort_by_key(|&i| !self.replicas[i].pending);
            for &i in victims.iter().take((have - want) as usize) {
                let r = &mut self.replicas[i];
                r.draining = true;
                if r.pending {
                    r.created = t;
                }
                if !r.ready || r.idle() {
                    r.removed = Some(t);
                }
            }
            self.schedule_pending(t);
        }
        self.reroute();
    }

    fn sample(&self, t: f64) -> Sample {
        let running: usize = self.replicas.iter().map(|r| r.running.len()).sum();
        Sample {
            t,
            queue: self.queued as f64,
            in_flight: (self.queued as usize + running) as f64,
            arrivals: self.arrivals,
            completions: self.latencies.len() as u64,
        }
    }

    fn busy(&self) -> bool {
        self.queued > 0 || self.replicas.iter().any(|r| !r.running.is_empty())
    }
}

/// Replays `arrivals` (sorted seconds) through the model under `policy`.
pub fn run(arrivals: &[f64], cfg: &ModelConfig, policy: &mut dyn Autoscaler) -> RunResult {
    let mut fleet = Fleet {
        cfg,
        replicas: Vec::new(),
        routable: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        rng: Rng::new(cfg.seed),
        latencies: Vec::with_capacity(arrivals.len()),
        arrivals: 0,
        rejected: 0,
        queued: 0,
        startups: Vec::new(),
    };
    let mut desired: Replicas = policy.initial();
    for (&v, &n) in &desired {
        for _ in 0..n {
            fleet.add(v, 0.0, true);
        }
    }
    fleet.reroute();
    let mut samples: Vec<Sample> = Vec::new();
    let mut scrapes: Vec<Sample> = Vec::new();
    let mut timeline = Vec::new();
    let mut scale_events = 0u64;
    let period = policy.period_s().max(1.0);
    let scrape_every = cfg.scrape_s.max(1.0).round() as u64;
    let period_every = period.round() as u64;
    let mut next = 0usize;
    let mut tick: u64 = 0;
    loop {
        let tick_t = tick as f64;
        // Everything that happens before this tick, in time order.
        loop {
            let ev_t = fleet.events.peek().map_or(f64::INFINITY, |e| e.t);
            let ar_t = arrivals.get(next).copied().unwrap_or(f64::INFINITY);
            if ev_t.min(ar_t) > tick_t {
                break;
            }
            if ev_t <= ar_t {
                let e = fleet.events.pop().expect("peeked");
                match e.kind {
                    Kind::BatchDone(i) => fleet.batch_done(i, e.t),
                    Kind::Ready(i) => {
                        let r = &mut fleet.replicas[i];
                        if r.alive() && !r.draining {
                            r.ready = true;
                            let startup = e.t - r.created;
                            fleet.startups.push(startup);
                            fleet.reroute();
                        }
                    }
                }
            } else {
                fleet.arrive(ar_t);
                next += 1;
            }
        }
        if next >= arrivals.len() && !fleet.busy() {
            break;
        }
        let s = fleet.sample(tick_t);
        samples.push(s);
        if tick.is_multiple_of(scrape_every) {
            scrapes.push(s);
        }
        if tick.is_multiple_of(10) {
            let alive = fleet.scheduled();
            let hi = fleet.latencies.partition_point(|l| l.0 <= tick_t);
            let lo = fleet.latencies.partition_point(|l| l.0 <= tick_t - 30.0);
            let p95 = quantile(fleet.latencies[lo..hi].iter().map(|l| l.1).collect(), 0.95);
            timeline.push((tick_t, alive, p95));
        }
        if tick.is_multiple_of(period_every) && tick > 0 {
            let view = View {
                samples: &samples,
                scrapes: &scrapes,
                latencies: &fleet.latencies,
                fleet: (0..cfg.variants.len()).map(|v| fleet.count(v)).collect(),
                pending: fleet.replicas.iter().any(|r| r.alive() && r.pending),
                startup_s: median(&fleet.startups),
            };
            let want = policy.evaluate(tick_t, &view);
            let mut changed = false;
            for (v, n) in want {
                if v >= cfg.variants.len() {
                    continue;
                }
                if desired.get(&v).copied().unwrap_or(0) != n {
                    changed = true;
                    desired.insert(v, n);
                }
                if fleet.count(v).replicas != n {
                    fleet.set(v, n, tick_t);
                }
            }
            scale_events += u64::from(changed);
        }
        tick += 1;
    }
    let end = fleet
        .latencies
        .last()
        .map_or(0.0, |l| l.0)
        .max(arrivals.last().copied().unwrap_or(0.0));
    let mut variant_hours = vec![0.0; cfg.variants.len()];
    for r in fleet.replicas.iter().filter(|r| !(r.pending && r.alive())) {
        let until = r.removed.unwrap_or(end).min(end);
        variant_hours[r.variant] += (until - r.created).max(0.0) / 3600.0;
    }
    let replica_hours = variant_hours.iter().sum();
    let cost = variant_hours
        .iter()
        .zip(&cfg.variants)
        .map(|(h, v)| h * v.price_per_hour)
        .sum();
    let within_target = fleet
        .latencies
        .iter()
        .filter(|l| l.1 <= cfg.p95_target_ms)
        .count() as u64;
    let p95_ms = quantile(fleet.latencies.iter().map(|l| l.1).collect(), 0.95).unwrap_or(0.0);
    RunResult {
        arrivals: fleet.arrivals,
        completed: fleet.latencies.len() as u64,
        rejected: fleet.rejected,
        within_target,
        p95_ms,
        replica_hours,
        variant_hours,
        cost,
        scale_events,
        timeline,
    }
}
