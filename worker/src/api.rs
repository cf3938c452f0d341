//! The HTTP surface: OpenAI-compatible `POST /v1/embeddings`, health, readiness and
//! metrics. Handlers validate and tokenize, then wait on the batcher; they never run
//! the model themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use kestrel_crds::contract;
use serde_json::{Map, Value, json};

use crate::batcher::{Batcher, JobError, Refusal};
use crate::engine::{LongInput, TextTokenizer, normalize};
use crate::metrics::{Metrics, Outcome};

/// The route of the embeddings task.
pub const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub batcher: Batcher,
    pub tokenizer: Arc<TextTokenizer>,
    pub metrics: Arc<Metrics>,
    /// Loaded, warmed and not draining.
    pub ready: Arc<AtomicBool>,
    pub model_name: String,
    pub dimension: usize,
    pub max_inputs: usize,
    pub long_input: LongInput,
    pub request_timeout: Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(EMBEDDINGS_PATH, post(embeddings))
        .route(contract::HEALTH_PATH, get(|| async { "ok" }))
        .route(contract::READY_PATH, get(ready))
        .route(contract::METRICS_PATH, get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the Prometheus
/// text format (curl, promtool).
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    metrics_response(&state.metrics, &headers)
}

/// `/metrics` for any task: OpenMetrics when asked for, else Prometheus text.
pub(crate) fn metrics_response(metrics: &Metrics, headers: &axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            metrics.encode_text(),
        )
            .into_response()
    }
}

/// An OpenAI-style error: `{"error":{"message","type","param"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) param: Option<&'static str>,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The response, serialized straight from these types (no intermediate JSON tree).
#[derive(serde::Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: &'a str,
    usage: Usage,
}

#[derive(serde::Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(serde::Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EncodingFormat {
    Float,
    Base64,
}

/// A validated embeddings request.
#[derive(Debug)]
struct EmbeddingsRequest {
    inputs: Vec<String>,
    format: EncodingFormat,
    dimensions: Option<usize>,
}

const KNOWN_FIELDS: &[&str] = &["input", "model", "encoding_format", "dimensions", "user"];

fn parse_request(body: &[u8], state: &AppState) -> Result<EmbeddingsRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    if let Some(unknown) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            None,
            format!("unknown field {unknown:?}"),
        ));
    }
    let inputs = parse_input(&obj, state.max_inputs)?;
    if let Some(model) = obj.get("model")
        && !model.is_string()
    {
        return Err(ApiError::invalid(Some("model"), "model must be a string"));
    }
    let format = match obj.get("encoding_format") {
        None | Some(Value::Null) => EncodingFormat::Float,
        Some(Value::String(s)) if s == "float" => EncodingFormat::Float,
        Some(Value::String(s)) if s == "base64" => EncodingFormat::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("encoding_format must be \"float\" or \"base64\", not {other}"),
            ));
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 && d as usize <= state.dimension => Some(d as usize),
            _ => {
                return Err(ApiError::invalid(
                    Some("dimensions"),
                    format!(
                        "dimensions must be an integer from 1 to {}, not {v}",
                        state.dimension
                    ),
                ));
            }
        },
    };
    Ok(EmbeddingsRequest {
        inputs,
        format,
        dimensions,
    })
}

fn parse_input(obj: &Map<String, Value>, max_inputs: usize) -> Result<Vec<String>, ApiError> {
    let inputs = match obj.get("input") {
        None => return Err(ApiError::invalid(Some("input"), "input is required")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid(
                    Some("input"),
                    "input must not be an empty array",
                ));
            }
            if items.len() > max_inputs {
                return Err(ApiError::invalid(
                    Some("input"),
                    format!(
                        "too many inputs: {} (at most {max_inputs} per request)",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ApiError::invalid(
                        Some("input"),
                        format!("input[{i}] must be a string (token arrays are not accepted)"),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("input"),
                "input must be a string or an array of strings",
            ));
        }
    };
    if let Some(i) = inputs.iter().position(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            Some("input"),
            format!("input[{i}] is empty"),
        ));
    }
    Ok(inputs)
}

/// Decrements the in-flight gauge however the handler ends (answered or dropped).
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn enter(metrics: &Arc<Metrics>) -> Self {
        metrics.in_flight.inc();
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn embeddings(State(state): State<AppState>, body: Bytes) -> Response {
    match handle_embeddings(&state, &body).await {
        Ok(response) => {
            state.metrics.count(Outcome::Ok);
            response
        }
        Err((outcome, error)) => {
            state.metrics.count(outcome);
            error.into_response()
        }
    }
}

/// Requests with more inputs than this are tokenized on several blocking threads at once
/// (tokenizing is ~25 µs per sentence: 256 inputs take 6 ms on one core).
const PARALLEL_TOKENIZE_MIN: usize = 64;

/// Token ids of every input, in order; the first failing input's error.
async fn tokenize_all(state: &AppState, inputs: Vec<String>) -> Result<Vec<Vec<u32>>, ApiError> {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads =
        *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if inputs.len() < PARALLEL_TOKENIZE_MIN || threads < 2 {
        return inputs
            .iter()
            .enumerate()
            .map(|(i, text)| tokenize_one(&state.tokenizer, state.long_input, i, text))
            .collect();
    }
    let chunk = inputs
        .len()
        .div_ceil(threads.min(16))
        .max(PARALLEL_TOKENIZE_MIN / 4);
    let mut inputs = inputs.into_iter();
    let mut tasks = Vec::new();
    let mut first = 0;
    loop {
        let part: Vec<String> = inputs.by_ref().take(chunk).collect();
        if part.is_empty() {
            break;
        }
        let (tokenizer, long_input, start) = (state.tokenizer.clone(), state.long_input, first);
        first += part.len();
        tasks.push(tokio::task::spawn_blocking(move || {
            part.iter()
                .enumerate()
                .map(|(k, text)| tokenize_one(&tokenizer, long_input, start + k, text))
                .collect::<Result<Vec<_>, ApiError>>()
        }));
    }
    let mut ids = Vec::with_capacity(first);
    for task in tasks {
        let part = task.await.map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: format!("tokenizing failed: {e}"),
            param: None,
            retry_after: None,
        })??;
        ids.extend(part);
    }
    Ok(ids)
}

/// One input's token ids, or why it is refused (named by its index).
fn tokenize_one(
    tokenizer: &TextTokenizer,
    long_input: LongInput,
    i: usize,
    text: &str,
) -> Result<Vec<u32>, ApiError> {
    let enc = tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid(Some("input"), format!("input[{i}]: {e}")))?;
    if enc.full_len > tokenizer.max_len() && long_input == LongInput::Refuse {
        return Err(ApiError::invalid(
            Some("input"),
            format!(
                "input[{i}] has {} tokens, more than the model's maximum of {}",
                enc.full_len,
                tokenizer.max_len()
            ),
        ));
    }
    Ok(enc.ids)
}

async fn handle_embeddings(state: &AppState, body: &[u8]) -> Result<Response, (Outcome, ApiError)> {
    let mut request = parse_request(body, state).map_err(|e| (Outcome::Error, e))?;
    let inputs = std::mem::take(&mut request.inputs);
    let token_ids = tokenize_all(state, inputs)
        .await
        .map_err(|e| (Outcome::Error, e))?;
    let prompt_tokens = token_ids.iter().map(Vec::len).sum::<usize>();

    let _in_flight = InFlight::enter(&state.metrics);
    let admitted = Instant::now();
    let rx = state
        .batcher
        .submit(token_ids, state.request_timeout)
        .map_err(|refusal| {
            let error = match refusal {
                Refusal::QueueFull(_) => ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    kind: "rate_limit_error",
                    message: format!("{refusal}; retry later"),
                    param: None,
                    retry_after: Some(1),
                },
                Refusal::Draining => ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    kind: "service_unavailable",
                    message: refusal.to_string(),
                    param: None,
                    retry_after: Some(1),
                },
            };
            (Outcome::Rejected, error)
        })?;
    let result = rx
        .await
        .unwrap_or_else(|_| Err(JobError::Engine("the batcher stopped".into())));
    state
        .metrics
        .request_duration
        .observe(admitted.elapsed().as_secs_f64());
    let embeddings = result.map_err(|e| {
        let (status, kind) = match e {
            JobError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            JobError::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        (
            Outcome::Error,
            ApiError {
                status,
                kind,
                message: e.to_string(),
                param: None,
                retry_after: None,
            },
        )
    })?;

    let data: Vec<EmbeddingData> = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, mut v)| {
            if let Some(d) = request.dimensions {
                v.truncate(d);
                normalize(&mut v);
            }
            let embedding = match request.format {
                EncodingFormat::Float => Embedding::Float(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Embedding::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            EmbeddingData {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let body = EmbeddingsResponse {
        object: "list",
        data,
        model: &state.model_name,
        usage: Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    Ok(axum::Json(body).into_response())
}
