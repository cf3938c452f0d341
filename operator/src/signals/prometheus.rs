//! `PrometheusSource`: the serving signals of one ModelDeployment, read with PromQL over
//! the worker contract's series. All of Kestrel's PromQL lives in this file.

use std::time::Duration;

use futures::future::BoxFuture;
use kestrel_crds::contract::{labels, metrics as series, pod_labels};
use prometheus_http_query::Client;

use super::{MetricsSource, Signals, SignalsError, SignalsQuery, SignalsReading};

/// Samples older than this are stale: the decision holds instead of trusting them.
pub const MAX_SAMPLE_AGE_SECONDS: f64 = 30.0;

pub struct PrometheusSource {
    client: Client,
    url: String,
}

impl PrometheusSource {
    pub fn new(url: &str) -> Result<Self, SignalsError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| SignalsError::Query {
                url: url.into(),
                message: e.to_string(),
            })?;
        let client = Client::from(http, url).map_err(|e| SignalsError::Query {
            url: url.into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            client,
            url: url.into(),
        })
    }

    /// A query that may not apply to this ModelDeployment (`None`: no value).
    async fn optional(&self, promql: Option<&str>) -> Result<Option<f64>, SignalsError> {
        match promql {
            Some(q) => self.scalar(q).await,
            None => Ok(None),
        }
    }

    async fn scalar(&self, promql: &str) -> Result<Option<f64>, SignalsError> {
        let result = self
            .client
            .query(promql)
            .get()
            .await
            .map_err(|e| SignalsError::Query {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        Ok(result
            .data()
            .as_vector()
            .and_then(|v| v.first())
            .map(|s| s.sample().value()))
    }

    async fn read_all(&self, q: &SignalsQuery) -> Result<SignalsReading, SignalsError> {
        let queries = Queries::new(q);
        let (
            workers,
            age,
            in_flight,
            waiting,
            arrivals,
            arrivals_short,
            ok,
            p95,
            prompt_tokens,
            generated_tokens,
        ) = futures::try_join!(
            self.scalar(&queries.scraped_workers),
            self.scalar(&queries.sample_age),
            self.scalar(&queries.in_flight),
            self.scalar(&queries.waiting),
            self.scalar(&queries.arrival_rate),
            self.scalar(&queries.arrival_rate_short),
            self.scalar(&queries.throughput),
            self.scalar(&queries.p95_seconds),
            self.optional(queries.prompt_tokens_per_request.as_deref()),
            self.optional(queries.generated_tokens_per_request.as_deref()),
        )?;
        let Some(age) = age else {
            return Ok(SignalsReading::NoData);
        };
        if !age.is_finite() || age > MAX_SAMPLE_AGE_SECONDS {
            return Ok(SignalsReading::Unavailable(format!(
                "the newest worker sample in Prometheus is {age:.0}s old (limit {MAX_SAMPLE_AGE_SECONDS:.0}s)"
            )));
        }
        let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
        Ok(SignalsReading::Fresh(Signals {
            waiting: finite(waiting).unwrap_or(0.0),
            in_flight: finite(in_flight).unwrap_or(0.0),
            arrival_rate: finite(arrivals).unwrap_or(0.0),
            arrival_rate_short: finite(arrivals_short),
            throughput: finite(ok).unwrap_or(0.0),
            // No completed request in the window gives NaN: no latency to report.
            p95_ms: finite(p95).map(|s| s * 1000.0),
            // No answered request in the window divides by zero: no shape to report.
            prompt_tokens_per_request: finite(prompt_tokens),
            generated_tokens_per_request: finite(generated_tokens),
            scraped_workers: finite(workers).unwrap_or(0.0) as u32,
            age_seconds: age,
        }))
    }
}

impl MetricsSource for PrometheusSource {
    fn read<'a>(&'a self, query: &'a SignalsQuery) -> BoxFuture<'a, SignalsReading> {
        Box::pin(async move {
            match self.read_all(query).await {
                Ok(r) => r,
                Err(e) => SignalsReading::Unavailable(e.to_string()),
            }
        })
    }
}

/// The PromQL for one ModelDeployment. Pure, so tests can check the text.
#[derive(Debug, PartialEq)]
pub struct Queries {
    pub scraped_workers: String,
    pub sample_age: String,
    pub in_flight: String,
    pub waiting: String,
    pub arrival_rate: String,
    pub arrival_rate_short: String,
    pub throughput: String,
    pub p95_seconds: String,
    /// Text generation only.
    pub prompt_tokens_per_request: Option<String>,
    /// Text generation only.
    pub generated_tokens_per_request: Option<String>,
}

impl Queries {
    pub fn new(q: &SignalsQuery) -> Self {
        let sel = format!(
            r#"namespace="{}",{}="{}""#,
            escape(&q.namespace),
            pod_labels::MODEL_DEPLOYMENT_SERIES,
            escape(&q.name)
        );
        let w = q.window_seconds;
        let short = q.short_window_seconds;
        let answered = format!(
            r#"sum(rate({}{{{sel},{}="{}"}}[{w}s]))"#,
            series::REQUESTS_TOTAL,
            labels::OUTCOME,
            labels::OUTCOME_OK
        );
        let per_request = |tokens: &str| {
            q.generation
                .then(|| format!(r#"sum(rate({tokens}{{{sel}}}[{w}s])) / {answered}"#))
        };
        Self {
            scraped_workers: format!(r#"count(up{{{sel}}} == 1)"#),
            sample_age: format!(r#"time() - max(timestamp({}{{{sel}}}))"#, series::IN_FLIGHT),
            // Gauges averaged over the short window: one scrape's transient backlog
            // must not size the fleet.
            in_flight: format!(
                r#"sum(avg_over_time({}{{{sel}}}[{short}s]))"#,
                series::IN_FLIGHT
            ),
            waiting: format!(
                r#"sum(avg_over_time({}{{{sel}}}[{short}s]))"#,
                series::QUEUE_DEPTH
            ),
            // All outcomes: refused requests are demand too.
            arrival_rate: format!(r#"sum(rate({}{{{sel}}}[{w}s]))"#, series::REQUESTS_TOTAL),
            arrival_rate_short: format!(
                r#"sum(rate({}{{{sel}}}[{short}s]))"#,
                series::REQUESTS_TOTAL
            ),
            prompt_tokens_per_request: per_request(series::PROMPT_TOKENS_TOTAL),
            generated_tokens_per_request: per_request(series::GENERATED_TOKENS_TOTAL),
            throughput: answered,
            p95_seconds: format!(
                r#"histogram_quantile(0.95, sum by (le) (rate({}_bucket{{{sel}}}[{w}s])))"#,
                q.latency_metric
            ),
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_one_model_deployment_by_its_pod_label() {
        let q = Queries::new(&SignalsQuery {
            namespace: "search".into(),
            name: "minilm".into(),
            latency_metric: series::REQUEST_DURATION,
            window_seconds: 30,
            short_window_seconds: 15,
            generation: false,
        });
        assert_eq!(
            q.p95_seconds,
            r#"histogram_quantile(0.95, sum by (le) (rate(kestrel_worker_request_duration_seconds_bucket{namespace="search",kestrel_dev_model_deployment="minilm"}[30s])))"#
        );
        assert_eq!(
            q.in_flight,
            r#"sum(avg_over_time(kestrel_worker_in_flight_requests{namespace="search",kestrel_dev_model_deployment="minilm"}[15s]))"#
        );
        assert!(q.throughput.contains(r#"outcome="ok""#));
        assert_eq!(q.generated_tokens_per_request, None);
    }

    #[test]
    fn text_generation_also_reads_tokens_per_answered_request() {
        let q = Queries::new(&SignalsQuery {
            namespace: "chat".into(),
            name: "gemma".into(),
            latency_metric: series::TIME_TO_FIRST_TOKEN,
            window_seconds: 30,
            short_window_seconds: 15,
            generation: true,
        });
        let sel = r#"{namespace="chat",kestrel_dev_model_deployment="gemma"}"#;
        assert_eq!(
            q.generated_tokens_per_request.as_deref(),
            Some(
                format!(
                    r#"sum(rate(kestrel_worker_generated_tokens_total{sel}[30s])) / {}"#,
                    q.throughput
                )
                .as_str()
            )
        );
        assert!(
            q.prompt_tokens_per_request
                .unwrap()
                .starts_with("sum(rate(kestrel_worker_prompt_tokens_total{")
        );
        assert!(
            q.p95_seconds
                .contains("kestrel_worker_time_to_first_token_seconds_bucket")
        );
    }
}
