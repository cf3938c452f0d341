//! A bounded open-loop load generator for the embeddings route: requests are sent on a
//! schedule (a fixed rate, or an Azure trace's arrival times, time-compressed), never
//! more than `max_in_flight` at once, and the run stops by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{Mutex, Semaphore};

/// What one run saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    /// 429 answers (backpressure, expected under overload).
    pub rejected: u64,
    /// Any other status, or no answer at all.
    pub failed: u64,
    /// Requests not sent because `max_in_flight` were outstanding.
    pub skipped: u64,
    /// Latencies of the 200 answers, milliseconds, in completion order.
    pub latencies_ms: Vec<f64>,
    /// When each of those was sent, seconds since the start (same order).
    pub sent_at_s: Vec<f64>,
    /// (seconds since start, status or 0 for a transport error, the body or the error)
    /// of every failure.
    pub failures: Vec<(f64, u16, String)>,
}

impl LoadReport {
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    }

    /// The `q` quantile of the 200 answers to requests sent in `[from_s, to_s)`.
    pub fn quantile_ms_between(&self, q: f64, from_s: f64, to_s: f64) -> f64 {
        let window = LoadReport {
            latencies_ms: self
                .sent_at_s
                .iter()
                .zip(&self.latencies_ms)
                .filter(|(t, _)| (from_s..to_s).contains(*t))
                .map(|(_, ms)| *ms)
                .collect(),
            ..Default::default()
        };
        window.quantile_ms(q)
    }
}

/// When to send: offsets from the start.
pub fn fixed_rate(rate_per_second: f64, duration: Duration) -> Vec<Duration> {
    let n = (rate_per_second * duration.as_secs_f64()).floor() as u64;
    (0..n)
        .map(|i| Duration::from_secs_f64(i as f64 / rate_per_second))
        .collect()
}

/// Arrival offsets of an Azure LLM trace (`TIMESTAMP,ContextTokens,GeneratedTokens`),
/// time-compressed by `speedup` and cut at `limit`.
pub fn azure_trace(csv: &str, speedup: f64, limit: Duration) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for line in csv.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let ts = line.split(',').next().context("empty trace line")?;
        times.push(parse_timestamp(ts).with_context(|| format!("bad trace timestamp {ts:?}"))?);
    }
    let first = times.first().copied().unwrap_or(0.0);
    Ok(times
        .into_iter()
        .map(|t| Duration::from_secs_f64((t - first) / speedup))
        .take_while(|d| *d < limit)
        .collect())
}

/// "2023-11-16 18:17:03.9799600" → seconds since midnight (the traces span one day).
fn parse_timestamp(ts: &str) -> Option<f64> {
    let time = ts.split(' ').nth(1)?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Sends one embeddings request per scheduled offset to `url` (…/v1/embeddings).
pub async fn run(
    url: &str,
    schedule: &[Duration],
    max_in_flight: usize,
    sentence: &str,
) -> LoadReport {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client");
    let body = serde_json::json!({"model": "all-MiniLM-L6-v2", "input": sentence}).to_string();
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(schedule.len());
    for at in schedule {
        tokio::time::sleep_until((start + *at).into()).await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            report.lock().await.skipped += 1;
            continue;
        };
        let (client, url, body, report) =
            (client.clone(), url.to_owned(), body.clone(), report.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let ms = sent.elapsed().as_secs_f64() * 1000.0;
            let at = start.elapsed().as_secs_f64();
            // A failure's body says which part refused it (the worker's error type).
            let outcome = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let mut body = String::new();
                    if !matches!(status, 200 | 429) {
                        body = resp.text().await.unwrap_or_default();
                        body.truncate(300);
                    }
                    Ok((status, body))
                }
                Err(e) => Err(e.to_string()),
            };
            let mut r = report.lock().await;
            r.sent += 1;
            match outcome {
                Ok((200, _)) => {
                    r.ok += 1;
                    r.latencies_ms.push(ms);
                    r.sent_at_s.push((sent - start).as_secs_f64());
                }
                Ok((429, _)) => r.rejected += 1,
                Ok((status, body)) => {
                    r.failed += 1;
                    r.failures.push((at, status, body));
                }
                Err(e) => {
                    r.failed += 1;
                    r.failures.push((at, 0, e));
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    report.lock().await.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_time_compressed_from_their_first_request() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,1,1\n2023-11-16 18:17:13.0,1,1\n2023-11-16 18:18:03.0,1,1\n";
        let s = azure_trace(csv, 10.0, Duration::from_secs(5)).unwrap();
        assert_eq!(s, vec![Duration::ZERO, Duration::from_secs(1)]);
    }

    #[test]
    fn a_fixed_rate_spreads_requests_evenly() {
        let s = fixed_rate(4.0, Duration::from_secs(2));
        assert_eq!(s.len(), 8);
        assert_eq!(s[1], Duration::from_millis(250));
    }
}
