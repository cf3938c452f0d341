//! OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`, with SSE
//! streaming (one event per generated token). Handlers validate, apply the chat
//! template, tokenize and check the context, then read the engine's events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use kestrel_crds::contract;
use serde_json::{Map, Value, json};

use super::sampling::SamplingParams;
use super::scheduler::{GenEvent, GenRequest, Generator};
use super::tokenizer::{ChatMessage, GemmaTokenizer};
use crate::api::{ApiError, metrics_response};
use crate::batcher::Refusal;
use crate::metrics::{Metrics, Outcome};

pub const COMPLETIONS_PATH: &str = "/v1/completions";
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// `max_tokens` when a completion request names none (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// Stop strings per request, at most (OpenAI's limit).
const MAX_STOPS: usize = 4;

#[derive(Clone)]
pub struct TextState {
    pub generator: Generator,
    pub tokenizer: Arc<GemmaTokenizer>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub model_name: String,
    /// Prompt + generated tokens a sequence may hold.
    pub max_context: usize,
    pub next_id: Arc<AtomicU64>,
}

pub fn router(state: TextState) -> Router {
    Router::new()
        .route(COMPLETIONS_PATH, post(completions))
        .route(CHAT_COMPLETIONS_PATH, post(chat_completions))
        .route(contract::HEALTH_PATH, get(|| async { "ok" }))
        .route(
            contract::READY_PATH,
            get(|State(s): State<TextState>| async move {
                if s.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            contract::METRICS_PATH,
            get(
                |State(s): State<TextState>, headers: axum::http::HeaderMap| async move {
                    metrics_response(&s.metrics, &headers)
                },
            ),
        )
        .with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A validated request.
struct Parsed {
    prompt: String,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
];

fn number(
    obj: &Map<String, Value>,
    key: &'static str,
    lo: f64,
    hi: f64,
) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                Some(key),
                format!("{key} must be a number from {lo} to {hi}, not {v}"),
            )),
        },
    }
}

fn parse(body: &[u8], kind: Kind) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    let own: &[&str] = match kind {
        Kind::Completion => &["prompt", "echo"],
        Kind::Chat => &["messages", "max_completion_tokens"],
    };
    if let Some(unknown) = obj
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            None,
            format!("unknown field {unknown:?}"),
        ));
    }
    let prompt = match kind {
        Kind::Completion => match obj.get("prompt") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Array(a))
                if a.len() == 1 && a[0].as_str().is_some_and(|s| !s.is_empty()) =>
            {
                a[0].as_str().unwrap_or_default().to_string()
            }
            None => return Err(ApiError::invalid(Some("prompt"), "prompt is required")),
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "prompt must be a non-empty string (or an array of one)",
                ));
            }
        },
        Kind::Chat => {
            let Some(Value::Array(items)) = obj.get("messages") else {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "messages must be a non-empty array",
                ));
            };
            let mut messages = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                let content = match m.get("content") {
                    Some(Value::String(s)) => Some(s.clone()),
                    // Content parts: the text ones, joined.
                    Some(Value::Array(parts)) => Some(
                        parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join(""),
                    ),
                    _ => None,
                };
                match (role, content) {
                    (Some(r @ ("system" | "developer" | "user" | "assistant")), Some(c)) => {
                        messages.push(ChatMessage {
                            role: r.to_string(),
                            content: c,
                        })
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!(
                                "messages[{i}] needs a role (system, user or assistant) and text content"
                            ),
                        ));
                    }
                }
            }
            if !messages.iter().any(|m| m.role == "user") {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "messages must hold at least one user message",
                ));
            }
            GemmaTokenizer::chat_prompt(&messages)
        }
    };
    let max_key = if kind == Kind::Chat && obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match obj.get(max_key) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("{max_key} must be a positive integer, not {v}"),
                ));
            }
        },
    };
    let temperature = number(&obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(&obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    if top_p <= 0.0 {
        return Err(ApiError::invalid(Some("top_p"), "top_p must be above 0"));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => {
            // Unseeded: a different draw each request.
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        }
        Some(v) => v.as_i64().map(|s| s as u64).ok_or_else(|| {
            ApiError::invalid(Some("seed"), format!("seed must be an integer, not {v}"))
        })?,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOPS && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stop"),
                format!(
                    "stop must be a string or an array of at most {MAX_STOPS} strings, not {v}"
                ),
            ));
        }
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stream"),
                format!("stream must be a boolean, not {v}"),
            ));
        }
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(n) = obj.get("n")
        && !n.is_null()
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = obj.get(key)
            && !v.is_null()
            && v.as_f64() != Some(0.0)
        {
            return Err(ApiError::invalid(
                None,
                format!("{key} is not supported (only 0)"),
            ));
        }
    }
    if obj
        .get("logprobs")
        .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "logprobs are not supported",
        ));
    }
    if obj.get("echo").is_some_and(|v| v == &Value::Bool(true)) {
        return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
    }
    Ok(Parsed {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed,
        },
        stop,
        stream,
        include_usage,
    })
}

async fn completions(State(state): State<TextState>, body: Bytes) -> Response {
    respond(state, body, Kind::Completion).await
}

async fn chat_completions(State(state): State<TextState>, body: Bytes) -> Response {
    respond(state, body, Kind::Chat).await
}

async fn respond(state: TextState, body: Bytes, kind: Kind) -> Response {
    match handle(&state, &body, kind).await {
        Ok(r) => r,
        Err((outcome, e)) => {
            state.metrics.count(outcome);
            e.into_response()
        }
    }
}

async fn handle(
    state: &TextState,
    body: &[u8],
    kind: Kind,
) -> Result<Response, (Outcome, ApiError)> {
    let p = parse(body, kind).map_err(|e| (Outcome::Error, e))?;
    let prompt = state.tokenizer.encode(&p.prompt).map_err(|e| {
        (
            Outcome::Error,
            ApiError::invalid(Some("prompt"), format!("failed to tokenize: {e}")),
        )
    })?;
    let param = match kind {
        Kind::Completion => "prompt",
        Kind::Chat => "messages",
    };
    let max = state.max_context;
    if prompt.len() >= max {
        return Err((
            Outcome::Error,
            ApiError::invalid(
                Some(param),
                format!(
                    "the prompt has {} tokens; this model's context is {max} tokens, so it must be shorter than {max}",
                    prompt.len()
                ),
            ),
        ));
    }
    let room = max - prompt.len();
    let max_tokens = match (p.max_tokens, kind) {
        (Some(m), _) => m,
        (None, Kind::Completion) => DEFAULT_COMPLETION_TOKENS.min(room),
        (None, Kind::Chat) => room,
    };
    if max_tokens > room {
        return Err((
            Outcome::Error,
            ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "this model's context is {max} tokens; the prompt has {} tokens and max_tokens asks for {max_tokens} more ({} in all)",
                    prompt.len(),
                    prompt.len() + max_tokens
                ),
            ),
        ));
    }
    let rx = state
        .generator
        .submit(GenRequest {
            prompt,
            max_tokens,
            sampling: p.sampling,
            stop: p.stop,
        })
        .map_err(|refusal| {
            let (status, kind) = match refusal {
                Refusal::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
                Refusal::Draining => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            };
            (
                Outcome::Rejected,
                ApiError {
                    status,
                    kind,
                    message: match refusal {
                        Refusal::QueueFull(_) => format!("{refusal}; retry later"),
                        Refusal::Draining => refusal.to_string(),
                    },
                    param: None,
                    retry_after: Some(1),
                },
            )
        })?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let shape = Shape {
        id,
        created,
        model: state.model_name.clone(),
        kind,
    };
    if p.stream {
        return Ok(stream(rx, shape, p.include_usage));
    }
    collect(rx, shape).await
}

/// What every response and chunk repeats.
#[derive(Clone)]
struct Shape {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choice: Value) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), json!([choice]));
        m
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }
}

fn engine_error(e: GenEvent) -> (Outcome, ApiError) {
    let (status, kind, message) = match e {
        GenEvent::Timeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request waited past its deadline".to_string(),
        ),
        GenEvent::Failed(m) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("generation failed: {m}"),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the engine stopped".to_string(),
        ),
    };
    // The engine counted the outcome already.
    (
        Outcome::Error,
        ApiError {
            status,
            kind,
            message,
            param: None,
            retry_after: None,
        },
    )
}

async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    shape: Shape,
) -> Result<Response, (Outcome, ApiError)> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(GenEvent::Token { text: t }) => text.push_str(&t),
            Some(GenEvent::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let choice = match shape.kind {
                    Kind::Completion => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()})
                    }
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": reason.as_str()})
                    }
                };
                let mut body = shape.envelope(false, choice);
                body.insert(
                    "usage".into(),
                    Shape::usage(prompt_tokens, completion_tokens),
                );
                return Ok(axum::Json(Value::Object(body)).into_response());
            }
            Some(other) => return Err(engine_error(other)),
            None => return Err(engine_error(GenEvent::Failed("the engine stopped".into()))),
        }
    }
}

/// SSE: one `data:` event per generated token, then one with the finish reason, the
/// usage when asked for, and `data: [DONE]`. Dropping the stream (the client left)
/// drops the receiver, which cancels the sequence.
fn stream(
    rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    shape: Shape,
    include_usage: bool,
) -> Response {
    let mut first = true;
    let events = tokio_stream_from(rx).flat_map(move |ev| {
        let mut out: Vec<Value> = Vec::new();
        let mut done = false;
        match ev {
            GenEvent::Token { text } => {
                let choice = match shape.kind {
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}),
                    Kind::Chat if first => json!({"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": null}),
                    Kind::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}),
                };
                first = false;
                out.push(Value::Object(shape.envelope(true, choice)));
            }
            GenEvent::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = match shape.kind {
                    Kind::Completion => json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason.as_str()}),
                    Kind::Chat => json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}),
                };
                out.push(Value::Object(shape.envelope(true, choice)));
                if include_usage {
                    let mut u = shape.envelope(true, Value::Null);
                    u.insert("choices".into(), json!([]));
                    u.insert("usage".into(), Shape::usage(prompt_tokens, completion_tokens));
                    out.push(Value::Object(u));
                }
                done = true;
            }
            other => {
                let (_, e) = engine_error(other);
                out.push(json!({"error": {"message": e.message, "type": e.kind, "param": null}}));
                done = true;
            }
        }
        let mut events: Vec<Result<Event, std::convert::Infallible>> = out
            .into_iter()
            .map(|v| Ok(Event::default().data(v.to_string())))
            .collect();
        if done {
            events.push(Ok(Event::default().data("[DONE]")));
        }
        futures::stream::iter(events)
    });
    Sse::new(events).into_response()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
) -> impl futures::Stream<Item = GenEvent> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
