//! The worker's Prometheus series, named only through `kestrel_crds::contract`.
//!
//! prometheus-client appends `_total` to counters when it encodes them, so counters
//! are registered under the contract name without that suffix.

use kestrel_crds::contract::{labels, metrics as names};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

/// How a request ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Rejected,
    Error,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => labels::OUTCOME_OK,
            Outcome::Rejected => labels::OUTCOME_REJECTED,
            Outcome::Error => labels::OUTCOME_ERROR,
            Outcome::Cancelled => labels::OUTCOME_CANCELLED,
        }
    }
}

/// Labels of the model-info series.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model: String,
    pub variant: String,
    pub precision: String,
    pub device: String,
}

/// The text-generation task's series (registered only when it is served).
pub struct GenerationMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
}

impl GenerationMetrics {
    fn register(registry: &mut Registry) -> Self {
        let time_to_first_token = Histogram::new(names::DURATION_BUCKETS.iter().copied());
        registry.register(
            names::TIME_TO_FIRST_TOKEN,
            "Seconds from admission to the first generated token",
            time_to_first_token.clone(),
        );
        let inter_token_latency = Histogram::new(names::DURATION_BUCKETS.iter().copied());
        registry.register(
            names::INTER_TOKEN_LATENCY,
            "Seconds between consecutive generated tokens of a sequence",
            inter_token_latency.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            counter_name(names::PROMPT_TOKENS_TOTAL),
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            counter_name(names::GENERATED_TOKENS_TOTAL),
            "Tokens generated",
            generated_tokens.clone(),
        );
        let running = Gauge::default();
        registry.register(
            names::RUNNING_SEQUENCES,
            "Sequences being decoded",
            running.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            names::WAITING_SEQUENCES,
            "Sequences admitted and waiting for a decode slot",
            waiting.clone(),
        );
        let kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            names::KV_CACHE_USAGE,
            "Fraction of the KV-cache budget (running slots x context) in use",
            kv_cache_usage.clone(),
        );
        GenerationMetrics {
            time_to_first_token,
            inter_token_latency,
            prompt_tokens,
            generated_tokens,
            running,
            waiting,
            kv_cache_usage,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Present when the worker serves text generation.
    pub generation: Option<GenerationMetrics>,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub request_duration: Histogram,
    pub queue_wait: Histogram,
    pub batch_size: Histogram,
    requests: Family<Labels, Counter>,
    pub tokens: Counter,
}

fn counter_name(contract_name: &str) -> &str {
    contract_name
        .strip_suffix("_total")
        .unwrap_or(contract_name)
}

impl Metrics {
    /// The embeddings task's series.
    pub fn new(info: &ModelInfo) -> Self {
        Self::build(info, false)
    }

    /// The text-generation task's series: the common ones plus [`GenerationMetrics`].
    pub fn new_generation(info: &ModelInfo) -> Self {
        Self::build(info, true)
    }

    fn build(info: &ModelInfo, generation: bool) -> Self {
        let mut registry = Registry::default();
        let queue_depth = Gauge::default();
        registry.register(
            names::QUEUE_DEPTH,
            "Requests admitted and waiting for a batch",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            names::IN_FLIGHT,
            "Requests admitted and not yet answered",
            in_flight.clone(),
        );
        let request_duration = Histogram::new(names::DURATION_BUCKETS.iter().copied());
        registry.register(
            names::REQUEST_DURATION,
            "Seconds from admission to response",
            request_duration.clone(),
        );
        let queue_wait = Histogram::new(names::DURATION_BUCKETS.iter().copied());
        registry.register(
            names::QUEUE_WAIT,
            "Seconds from admission to the start of the batch that ran the request",
            queue_wait.clone(),
        );
        let batch_size = Histogram::new(names::BATCH_SIZE_BUCKETS.iter().copied());
        registry.register(
            names::BATCH_SIZE,
            "Inputs per executed batch",
            batch_size.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            counter_name(names::REQUESTS_TOTAL),
            "Requests by outcome",
            requests.clone(),
        );
        let tokens = Counter::default();
        registry.register(
            counter_name(names::TOKENS_TOTAL),
            "Input tokens processed",
            tokens.clone(),
        );
        let model_info = Family::<Labels, Gauge>::default();
        model_info
            .get_or_create(&vec![
                (labels::MODEL, info.model.clone()),
                (labels::VARIANT, info.variant.clone()),
                (labels::PRECISION, info.precision.clone()),
                (labels::DEVICE, info.device.clone()),
            ])
            .set(1);
        registry.register(
            names::MODEL_INFO,
            "The served model and variant (always 1)",
            model_info,
        );
        let generation = generation.then(|| GenerationMetrics::register(&mut registry));
        let metrics = Metrics {
            registry,
            generation,
            queue_depth,
            in_flight,
            request_duration,
            queue_wait,
            batch_size,
            requests,
            tokens,
        };
        // Every outcome exists from the start, so rate() works before the first error.
        for o in [
            Outcome::Ok,
            Outcome::Rejected,
            Outcome::Error,
            Outcome::Cancelled,
        ] {
            metrics.outcome_counter(o);
        }
        metrics
    }

    fn outcome_counter(&self, outcome: Outcome) -> Counter {
        self.requests
            .get_or_create(&vec![(labels::OUTCOME, outcome.as_str().to_string())])
            .clone()
    }

    pub fn count(&self, outcome: Outcome) {
        self.outcome_counter(outcome).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The Prometheus text format (0.0.4), which `promtool check metrics` lints: the
    /// same samples, with counter families named by their `_total` series and no `# EOF`.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text generation adds exactly the contract's generation series.
    #[test]
    fn generation_exposition_adds_the_generation_names() {
        let m = Metrics::new_generation(&ModelInfo {
            model: "gemma-3-270m".into(),
            variant: "q8_0".into(),
            precision: "q8_0".into(),
            device: "cpu".into(),
        });
        let g = m.generation.as_ref().expect("generation series");
        g.time_to_first_token.observe(0.2);
        g.kv_cache_usage.set(0.25);
        g.generated_tokens.inc_by(5);
        let text = m.encode_text();
        for name in [
            names::TIME_TO_FIRST_TOKEN,
            names::INTER_TOKEN_LATENCY,
            names::PROMPT_TOKENS_TOTAL,
            names::GENERATED_TOKENS_TOTAL,
            names::RUNNING_SEQUENCES,
            names::WAITING_SEQUENCES,
            names::KV_CACHE_USAGE,
            names::QUEUE_DEPTH,
            names::REQUEST_DURATION,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in\n{text}"
            );
        }
        assert!(
            text.contains(&format!("{} 0.25", names::KV_CACHE_USAGE)),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 5", names::GENERATED_TOKENS_TOTAL)),
            "{text}"
        );
        assert!(
            !Metrics::new(&ModelInfo {
                model: "m".into(),
                variant: "f32".into(),
                precision: "f32".into(),
                device: "cpu".into(),
            })
            .encode_text()
            .contains(names::TIME_TO_FIRST_TOKEN)
        );
    }

    /// The exposition's series families are exactly the contract's names.
    #[test]
    fn exposition_uses_exactly_the_contract_names() {
        let m = Metrics::new(&ModelInfo {
            model: "m".into(),
            variant: "f32".into(),
            precision: "f32".into(),
            device: "cpu".into(),
        });
        m.count(Outcome::Ok);
        m.tokens.inc_by(3);
        m.request_duration.observe(0.01);
        let mut expected = vec![
            names::QUEUE_DEPTH,
            names::IN_FLIGHT,
            names::REQUEST_DURATION,
            names::QUEUE_WAIT,
            names::BATCH_SIZE,
            names::REQUESTS_TOTAL,
            names::TOKENS_TOTAL,
            names::MODEL_INFO,
        ];
        expected.sort();
        let text = m.encode_text();
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        families.sort();
        assert_eq!(families, expected, "Prometheus text format");
        assert!(!text.contains("# EOF"));
        // OpenMetrics names counter families without `_total`; the samples carry it.
        let om = m.encode();
        assert!(om.contains(&format!(
            "# TYPE {} counter",
            counter_name(names::REQUESTS_TOTAL)
        )));
        for text in [&text, &om] {
            assert!(
                text.contains(&format!("{}{{outcome=\"ok\"}} 1", names::REQUESTS_TOTAL)),
                "{text}"
            );
            assert!(
                text.contains(&format!("{} 3", names::TOKENS_TOTAL)),
                "{text}"
            );
            for o in ["ok", "rejected", "error", "cancelled"] {
                assert!(text.contains(&format!("{}{{outcome=\"{o}\"}}", names::REQUESTS_TOTAL)));
            }
            assert!(text.contains(&format!(
                "{}{{model=\"m\",variant=\"f32\",precision=\"f32\",device=\"cpu\"}} 1",
                names::MODEL_INFO
            )));
            assert!(text.contains(&format!(
                "{}_bucket{{le=\"0.001\"}}",
                names::REQUEST_DURATION
            )));
        }
    }
}
