//! HTTP API: OpenAI embeddings, the seeds' `/embed/text`, OpenAI chat/completions and
//! completions ([`generation`]), health, readiness, status, metrics.
//! Every error is JSON `{"error": {"message", "type", "code"}}` with the right status.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::batching::SubmitError;
use crate::manifest::ModelRef;
use crate::state::{AppState, Runtime};

mod generation;

type Shared = Arc<AppState>;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into() }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }
    fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", code, message)
    }
    fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", code, message)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Full { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "queue_full", e.to_string())
            }
            SubmitError::Closed(_) => ApiError::unavailable("draining", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": self.code}});
        let mut resp = (self.status, Json(body)).into_response();
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub fn router(state: Shared) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(generation::chat_completions))
        .route("/v1/completions", post(generation::completions))
        .route("/embed/text", post(embed_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "unknown_path",
        "no such endpoint; see GET /v1/models, POST /v1/embeddings, POST /embed/text, POST /v1/chat/completions, POST /v1/completions",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}

async fn healthz() -> Json<Value> {
    // The process is alive and its loader or batchers are running; failures of a model show
    // up in readiness, which a restart would not fix.
    Json(json!({"status": "ok"}))
}

fn model_progress(state: &AppState) -> Value {
    let models: serde_json::Map<String, Value> = state
        .slots
        .values()
        .filter(|s| s.serve || s.runtime.get().is_some())
        .map(|s| (s.id.to_string(), serde_json::to_value(s.progress()).unwrap_or(Value::Null)))
        .collect();
    Value::Object(models)
}

async fn readyz(State(state): State<Shared>) -> Response {
    let ready = state.is_ready();
    let body = json!({
        "ready": ready,
        "draining": state.is_draining(),
        "secondsSinceStart": state.started.elapsed().as_secs_f64(),
        "models": model_progress(&state),
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn status(State(state): State<Shared>) -> Json<Value> {
    let models: Vec<Value> = state
        .slots
        .values()
        .map(|s| {
            let mut v = serde_json::to_value(s.progress()).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("model".into(), json!(s.id.name));
                m.insert("version".into(), json!(s.id.version));
                m.insert("serve".into(), json!(s.serve));
                m.insert("queueDepth".into(), json!(s.runtime.get().map(Runtime::depth).unwrap_or(0)));
                match s.runtime.get() {
                    Some(Runtime::Embedding { model, .. }) => {
                        m.insert("dimension".into(), json!(model.dimension()));
                        m.insert("maxSeqLength".into(), json!(model.settings().max_seq_length));
                    }
                    Some(Runtime::Generation { model, .. }) => {
                        m.insert("contextLength".into(), json!(model.context_length()));
                    }
                    None => {}
                }
            }
            v
        })
        .collect();
    Json(json!({
        "family": state.family,
        "ready": state.is_ready(),
        "draining": state.is_draining(),
        "uptimeSeconds": state.started.elapsed().as_secs_f64(),
        "queueDepth": state.queue_depth(),
        "residentBytes": crate::loader::rss_bytes(),
        "models": models,
    }))
}

async fn metrics(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = state
        .served
        .iter()
        .map(|id| json!({"id": id.to_string(), "object": "model", "created": 0, "owned_by": "kiln"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Parse a JSON body: syntax errors (and invalid UTF-8) are 400, a non-object is 422.
fn parse_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "body_too_large",
                "request body is larger than the server's limit",
            )
        } else {
            ApiError::new(status, "invalid_request_error", "bad_body", r.body_text())
        }
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::bad_request("invalid_utf8", "request body is not valid UTF-8"));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::unprocessable("invalid_body", "request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_json", format!("request body is not valid JSON: {e}"))),
    }
}

/// An inference request's JSON body and the served model it names.
fn parse_request(
    state: &AppState,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(serde_json::Map<String, Value>, ModelRef), ApiError> {
    let req = parse_body(body)?;
    let id = resolve(state, req.get("model"))?;
    Ok((req, id))
}

fn resolve(state: &AppState, requested: Option<&Value>) -> Result<ModelRef, ApiError> {
    let available = || state.served.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match requested {
        None | Some(Value::Null) => state.served.first().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "model_not_found",
                "this server serves no model",
            )
        }),
        Some(Value::String(name)) => state.resolve(name).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "model_not_found",
                format!("model {name:?} is not served here; available: {}", available()),
            )
        }),
        Some(_) => Err(ApiError::unprocessable(
            "invalid_model",
            "`model` must be a string such as \"minilm\" or \"minilm:v2\"",
        )),
    }
}

struct Embedded {
    vectors: Vec<Vec<f32>>,
    tokens: Vec<usize>,
    truncated: Vec<bool>,
}

/// The runtime answering for `id`, or why there is none yet.
fn ready_runtime<'a>(state: &'a AppState, id: &ModelRef) -> Result<&'a Runtime, ApiError> {
    if state.is_draining() {
        return Err(ApiError::unavailable("draining", "server is shutting down; retry on another replica"));
    }
    state.runtime_for(id).ok_or_else(|| {
        let progress = state.slots.get(id).map(|s| s.progress());
        match progress {
            Some(p) if p.error.is_some() => ApiError::unavailable(
                "model_failed",
                format!("model {id} failed to load: {}", p.error.unwrap_or_default()),
            ),
            _ => {
                ApiError::unavailable("model_loading", format!("model {id} is still loading; retry shortly"))
            }
        }
    })
}

/// Tokenize off the async workers, queue, and wait for the batch.
async fn embed_texts(state: &Shared, id: &ModelRef, texts: Vec<String>) -> Result<Embedded, ApiError> {
    let (model, batcher) = match ready_runtime(state, id)? {
        Runtime::Embedding { model, batcher } => (model.clone(), batcher),
        Runtime::Generation { .. } => {
            return Err(ApiError::bad_request(
                "wrong_family",
                format!("model {id} generates text; use POST /v1/chat/completions or /v1/completions"),
            ));
        }
    };
    let tokens = tokio::task::spawn_blocking(move || {
        texts.iter().map(|t| model.tokenize(t)).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal", e.to_string()))?
    .map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
    let counts = tokens.iter().map(|t| t.ids.len()).collect();
    let truncated = tokens.iter().map(|t| t.truncated).collect();
    let rx = batcher.submit(tokens.into_iter().map(|t| t.ids).collect()).map_err(ApiError::from)?;
    let vectors = rx
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
                "batch worker stopped",
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "inference_failed",
                e.to_string(),
            )
        })?;
    Ok(Embedded { vectors, tokens: counts, truncated })
}

fn record(state: &AppState, id: &ModelRef, code: StatusCode, started: Instant) {
    let code = code.as_u16().to_string();
    state.metrics.requests.with_label_values(&[&id.name, &id.version, &code]).inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[&id.name, &id.version])
        .observe(started.elapsed().as_secs_f64());
}

/// Run `f` for a resolved model and count the outcome under that model's labels.
async fn counted<F, Fut>(state: &Shared, id: &ModelRef, f: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let resp = f().await.unwrap_or_else(IntoResponse::into_response);
    record(state, id, resp.status(), started);
    resp
}

async fn embeddings(
    State(state): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (req, id) = match parse_request(&state, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let texts = match req.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(ApiError::bad_request("empty_input", "`input` must not be an empty array"));
                }
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| ApiError::unprocessable("invalid_input", "`input` must be a string or an array of strings (token arrays are not supported)"))?
            }
            Some(_) => return Err(ApiError::unprocessable("invalid_input", "`input` must be a string or an array of strings")),
            None => return Err(ApiError::bad_request("missing_input", "`input` is required")),
        };
        if texts.len() > state.limits.max_inputs {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "too_many_inputs",
                format!("{} inputs in one request; the limit is {}", texts.len(), state.limits.max_inputs),
            ));
        }
        let base64 = match req.get("encoding_format") {
            None | Some(Value::Null) => false,
            Some(Value::String(f)) if f == "float" => false,
            Some(Value::String(f)) if f == "base64" => true,
            Some(_) => return Err(ApiError::bad_request("invalid_encoding_format", "`encoding_format` must be \"float\" or \"base64\"")),
        };
        let runtime_dim = match state.runtime_for(&id) {
            Some(Runtime::Embedding { model, .. }) => Some(model.dimension()),
            _ => None,
        };
        match (req.get("dimensions"), runtime_dim) {
            (None | Some(Value::Null), _) => {}
            (Some(Value::Number(n)), Some(d)) if n.as_u64() == Some(d as u64) => {}
            (Some(_), d) => {
                return Err(ApiError::bad_request(
                    "dimensions_not_supported",
                    format!("model {id} returns {} dimensions and cannot shorten them; omit `dimensions`", d.map(|d| d.to_string()).unwrap_or_else(|| "fixed".into())),
                ));
            }
        }
        let out = embed_texts(&state, &id, texts).await?;
        let total: usize = out.tokens.iter().sum();
        let data: Vec<Value> = out
            .vectors
            .iter()
            .zip(&out.truncated)
            .enumerate()
            .map(|(i, (v, &truncated))| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                let mut item = json!({"object": "embedding", "index": i, "embedding": embedding});
                if truncated {
                    item["truncated"] = json!(true);
                }
                item
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": id.to_string(),
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }))
        .into_response())
    })
    .await
}

async fn embed_text(
    State(state): State<Shared>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (req, id) = match parse_request(&state, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let text = match req.get("text") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::unprocessable("invalid_text", "`text` must be a string")),
            None => return Err(ApiError::bad_request("missing_text", "`text` is required")),
        };
        let mut out = embed_texts(&state, &id, vec![text]).await?;
        let embedding = out.vectors.pop().unwrap_or_default();
        Ok(Json(json!({
            "embedding": embedding,
            "dimension": embedding.len(),
            "model": id.to_string(),
            "tokens": out.tokens.first().copied().unwrap_or(0),
            "truncated": out.truncated.first().copied().unwrap_or(false),
        }))
        .into_response())
    })
    .await
}
