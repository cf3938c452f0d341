//! The capacity model: how a replica's batch service-time curve turns an arrival rate
//! into a predicted p95 and a replica count.
//!
//! A replica runs continuous dynamic batching: while a batch runs, arrivals queue, and
//! the next batch takes them all (up to the largest profiled batch). At a steady
//! per-replica rate `r` the batch size settles where `b = r · L(b)` (what arrives
//! during one batch fills the next). A request then waits at most one batch and runs
//! in the next, so the p95 is taken as `2 · L(b)`. Past the largest batch's
//! throughput the queue grows without bound: no prediction (`None`).
//!
//! For text generation scaled on time to first token the same fixed point sizes the
//! running batch, and the p95 is taken as `2 · F(b)`, F the first token's latency with
//! `b` sequences running ([`VariantCapacity::first_token`]).

use crate::input::{BatchLatency, VariantCapacity};

impl VariantCapacity {
    /// Builds a capacity from a batch curve; `items_per_second` is the curve's best.
    pub fn from_batches(mut batches: Vec<BatchLatency>) -> Self {
        batches.retain(|b| b.batch_size > 0 && b.latency_ms.is_finite() && b.latency_ms > 0.0);
        batches.sort_by_key(|b| b.batch_size);
        let items_per_second = batches
            .iter()
            .map(|b| b.batch_size as f64 * 1000.0 / b.latency_ms)
            .fold(0.0, f64::max);
        VariantCapacity {
            items_per_second,
            batches,
            first_token: None,
        }
    }

    /// The same capacity with the SLO's latency taken from a first-token curve.
    pub fn with_first_token(mut self, mut points: Vec<BatchLatency>) -> Self {
        points.retain(|b| b.batch_size > 0 && b.latency_ms.is_finite() && b.latency_ms > 0.0);
        points.sort_by_key(|b| b.batch_size);
        self.first_token = (!points.is_empty()).then_some(points);
        self
    }

    /// A flat curve for tests and for variants without a profile: `items_per_second`
    /// at batch 1, the same per-item time at every batch size up to `max_batch`.
    pub fn flat(items_per_second: f64, max_batch: u32) -> Self {
        let per_item_ms = 1000.0 / items_per_second;
        let max_batch = max_batch.max(1);
        VariantCapacity::from_batches(vec![
            BatchLatency {
                batch_size: 1,
                latency_ms: per_item_ms,
            },
            BatchLatency {
                batch_size: max_batch,
                latency_ms: per_item_ms * max_batch as f64,
            },
        ])
    }

    /// The same curve on a replica `factor` times as fast: service times divided by it.
    /// The operator uses it for a CPU replica limited to a share of the cores the
    /// profile was measured with. A non-finite or non-positive factor changes nothing.
    pub fn scaled(mut self, factor: f64) -> Self {
        if !(factor.is_finite() && factor > 0.0) {
            return self;
        }
        for b in self
            .batches
            .iter_mut()
            .chain(self.first_token.iter_mut().flatten())
        {
            b.latency_ms /= factor;
        }
        self.items_per_second *= factor;
        self
    }

    /// The curve a worker that runs at most `max_batch` inputs at once can reach: the
    /// profiled points up to it (at least the first). A worker limited to 4 sequences
    /// never reaches the throughput the profile measured at 16.
    pub fn up_to_batch(mut self, max_batch: u32) -> Self {
        let keep = |b: &BatchLatency| b.batch_size <= max_batch.max(1);
        if self.batches.iter().any(keep) {
            self.batches.retain(keep);
        } else {
            self.batches.truncate(1);
        }
        if let Some(first) = self.first_token.as_mut() {
            if first.iter().any(keep) {
                first.retain(keep);
            } else {
                first.truncate(1);
            }
        }
        let first_token = self.first_token.take();
        let capacity = VariantCapacity::from_batches(self.batches);
        match first_token {
            Some(points) => capacity.with_first_token(points),
            None => capacity,
        }
    }

    /// The largest profiled batch (1 without a curve).
    pub fn max_batch(&self) -> u32 {
        self.batches.last().map_or(1, |b| b.batch_size)
    }

    /// Service time of a batch of `batch` inputs, ms: linear between profiled points,
    /// per-item beyond the largest, and the smallest point's time below it.
    pub fn batch_latency_ms(&self, batch: f64) -> f64 {
        interpolate(&self.batches, batch)
            .unwrap_or_else(|| batch.max(1.0) * 1000.0 / self.items_per_second)
    }

    /// The latency the SLO is set on with `batch` inputs running, ms: the first
    /// token's where there is a first-token curve, else the batch's service time.
    pub fn slo_latency_ms(&self, batch: f64) -> f64 {
        self.first_token
            .as_deref()
            .and_then(|points| interpolate(points, batch))
            .unwrap_or_else(|| self.batch_latency_ms(batch))
    }

    /// Predicted p95 latency (ms) of one replica receiving `rate` inputs per second,
    /// its service times divided by `speed` (the online correction; 1 = as profiled).
    /// `None` when the rate exceeds what the replica can serve.
    pub fn predict_p95_ms(&self, rate: f64, speed: f64) -> Option<f64> {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        let lat = |b: f64| self.batch_latency_ms(b) / speed;
        let slo = |b: f64| self.slo_latency_ms(b) / speed;
        if !(rate.is_finite()) {
            return None;
        }
        if rate <= 0.0 {
            return Some(2.0 * slo(1.0));
        }
        let bmax = self.max_batch() as f64;
        // Batch at which arrivals during one batch fill the next: b = rate · L(b).
        let fill = |b: f64| rate * lat(b) / 1000.0 - b;
        if fill(1.0) <= 0.0 {
            return Some(2.0 * slo(1.0));
        }
        if fill(bmax) >= 0.0 {
            return None;
        }
        let (mut lo, mut hi) = (1.0, bmax);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if fill(mid) > 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(2.0 * slo(hi))
    }

    /// Replicas needed so that `rate` inputs per second, spread evenly, keep each
    /// replica under `utilization` of its capacity and its predicted p95 under
    /// `p95_target_ms`. Zero for no demand. Saturates at `u32::MAX / 2` for
    /// targets no replica count can meet (the batch-1 time alone is over the target).
    pub fn replicas_needed(
        &self,
        rate: f64,
        speed: f64,
        p95_target_ms: f64,
        utilization: f64,
    ) -> u32 {
        if !(rate.is_finite() && rate > 0.0) {
            return 0;
        }
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        let utilization = utilization.clamp(0.05, 1.0);
        let per_replica = self.items_per_second * speed * utilization;
        let mut n = (rate / per_replica).ceil().max(1.0);
        const CAP: f64 = (u32::MAX / 2) as f64;
        // The p95 falls as replicas are added, down to 2·L(1); stop there.
        let floor = self.predict_p95_ms(0.0, speed).unwrap_or(f64::INFINITY);
        if floor > p95_target_ms {
            return CAP as u32;
        }
        while n < CAP {
            match self.predict_p95_ms(rate / n, speed) {
                Some(p) if p <= p95_target_ms => break,
                _ => n = (n * 1.05).ceil().max(n + 1.0),
            }
        }
        n.min(CAP) as u32
    }
}

/// A curve's value at `batch`: linear between points, proportional beyond the last,
/// the first point's below it. `None` for an empty curve.
fn interpolate(points: &[BatchLatency], batch: f64) -> Option<f64> {
    let first = points.first()?;
    if batch <= first.batch_size as f64 {
        return Some(first.latency_ms);
    }
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        if batch <= b.batch_size as f64 {
            let t = (batch - a.batch_size as f64) / (b.batch_size - a.batch_size) as f64;
            return Some(a.latency_ms + t * (b.latency_ms - a.latency_ms));
        }
    }
    let last = points[points.len() - 1];
    Some(last.latency_ms * batch / last.batch_size as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve() -> VariantCapacity {
        // 10 ms at batch 1, 60 ms at batch 8, 200 ms at batch 32: 160 items/s at best.
        VariantCapacity::from_batches(vec![
            BatchLatency {
                batch_size: 1,
                latency_ms: 10.0,
            },
            BatchLatency {
                batch_size: 8,
                latency_ms: 60.0,
            },
            BatchLatency {
                batch_size: 32,
                latency_ms: 200.0,
            },
        ])
    }

    #[test]
    fn best_throughput_is_the_curve_maximum() {
        assert!((curve().items_per_second - 160.0).abs() < 1e-9);
    }

    #[test]
    fn a_scaled_curve_serves_proportionally_less_and_takes_longer() {
        let c = curve().scaled(0.25);
        assert!((c.items_per_second - 40.0).abs() < 1e-9);
        assert!((c.batch_latency_ms(8.0) - 240.0).abs() < 1e-9);
        // 50/s fits one full-speed replica but needs two at a quarter of the speed.
        assert_eq!(curve().replicas_needed(50.0, 1.0, 1000.0, 1.0), 1);
        assert_eq!(c.replicas_needed(50.0, 1.0, 1000.0, 1.0), 2);
        assert_eq!(curve().scaled(f64::NAN), curve());
        assert_eq!(curve().scaled(0.0), curve());
    }

    #[test]
    fn latency_interpolates_between_points() {
        let c = curve();
        for (batch, want) in [
            (0.5, 10.0),
            (1.0, 10.0),
            (4.5, 35.0),
            (8.0, 60.0),
            (64.0, 400.0),
        ] {
            assert!(
                (c.batch_latency_ms(batch) - want).abs() < 1e-9,
                "batch {batch}"
            );
        }
    }

    #[test]
    fn p95_grows_with_rate_and_is_none_past_capacity() {
        let c = curve();
        let cases = [(0.0, Some(20.0)), (50.0, Some(20.0)), (170.0, None)];
        for (rate, want) in cases {
            let got = c.predict_p95_ms(rate, 1.0);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-6, "rate {rate}: {g}"),
                (None, None) => {}
                _ => panic!("rate {rate}: got {got:?}, want {want:?}"),
            }
        }
        // 120/s settles at batch 2.4 (20 ms): 40 ms; 150/s at batch 16: 213 ms.
        let p120 = c.predict_p95_ms(120.0, 1.0).unwrap();
        let p150 = c.predict_p95_ms(150.0, 1.0).unwrap();
        assert!((p120 - 40.0).abs() < 1e-6, "{p120}");
        assert!((p150 - 640.0 / 3.0).abs() < 1e-6, "{p150}");
        // Twice as fast (speed 2) at twice the rate: the same batch, half the latency.
        let fast = c.predict_p95_ms(240.0, 2.0).unwrap();
        assert!((fast - p120 / 2.0).abs() < 1e-6);
    }

    #[test]
    fn replicas_needed_meets_utilization_and_latency() {
        let c = curve();
        let table = [
            // (rate, p95 target, utilization, expected)
            (0.0, 200.0, 0.8, 0),
            (100.0, 1000.0, 0.8, 1),  // 100/s < 128/s usable
            (1000.0, 1000.0, 0.8, 8), // 1000/128 = 7.8
            (1000.0, 1000.0, 0.5, 13),
            (100.0, 15.0, 0.8, u32::MAX / 2), // 2·L(1) = 20 ms > 15 ms: never
        ];
        for (rate, target, util, want) in table {
            assert_eq!(
                c.replicas_needed(rate, 1.0, target, util),
                want,
                "rate {rate}"
            );
        }
        // A tight latency target needs more replicas than utilization alone.
        let tight = c.replicas_needed(1000.0, 1.0, 30.0, 0.8);
        assert!(tight > 8, "{tight}");
        assert!(c.predict_p95_ms(1000.0 / tight as f64, 1.0).unwrap() <= 30.0);
    }

    #[test]
    fn a_first_token_curve_sets_the_p95_but_not_the_throughput() {
        // Requests of 1 s alone, 4 s with 8 running: 2 requests/s at best; the first
        // token comes after 100 ms alone, 300 ms with 8 running.
        let whole = VariantCapacity::from_batches(vec![
            BatchLatency {
                batch_size: 1,
                latency_ms: 1000.0,
            },
            BatchLatency {
                batch_size: 8,
                latency_ms: 4000.0,
            },
        ]);
        let ttft = whole.clone().with_first_token(vec![
            BatchLatency {
                batch_size: 1,
                latency_ms: 100.0,
            },
            BatchLatency {
                batch_size: 8,
                latency_ms: 300.0,
            },
        ]);
        assert_eq!(ttft.items_per_second, whole.items_per_second);
        assert_eq!(ttft.predict_p95_ms(0.0, 1.0), Some(200.0));
        assert_eq!(whole.predict_p95_ms(0.0, 1.0), Some(2000.0));
        // 1.5 requests/s: b = 1.5 s · L(b) holds at b = 2.4 running; F(2.4) = 140 ms.
        let p = ttft.predict_p95_ms(1.5, 1.0).unwrap();
        assert!((p - 280.0).abs() < 1e-6, "{p}");
        // Past 2 requests/s no replica keeps up, whatever the first token's latency.
        assert_eq!(ttft.predict_p95_ms(2.5, 1.0), None);
        // A 500 ms first-token target fits one replica; the whole request never could.
        assert_eq!(ttft.replicas_needed(1.5, 1.0, 500.0, 1.0), 1);
        assert_eq!(whole.replicas_needed(1.5, 1.0, 500.0, 1.0), u32::MAX / 2);
        // A CPU share slows both curves alike.
        let half = ttft.scaled(0.5);
        assert_eq!(half.predict_p95_ms(0.0, 1.0), Some(400.0));
    }

    #[test]
    fn a_worker_batch_limit_cuts_the_curve() {
        let c = curve().up_to_batch(8);
        assert_eq!(c.max_batch(), 8);
        assert!((c.items_per_second - 8.0 * 1000.0 / 60.0).abs() < 1e-9);
        // A limit below the first point keeps the first point.
        assert_eq!(curve().up_to_batch(0).max_batch(), 1);
        // Past its batch the worker's queue grows: no prediction at 150/s.
        assert_eq!(c.predict_p95_ms(150.0, 1.0), None);
        assert!(curve().predict_p95_ms(150.0, 1.0).is_some());
        assert_eq!(curve().up_to_batch(64), curve());
    }
}
