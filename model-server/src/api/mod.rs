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
            SubmitError::Full { .. } | SubmitError::TokensFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "queue_full", e.to_string())
            }
            SubmitError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "too_many_tokens",
                e.to_string(),
            ),
            SubmitError::Closed(_) => ApiError::unavailable("draining", e.to_string()),
            SubmitError::Failed { .. } => ApiError::unavailable("model_failed", e.to_string()),
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
                    Some(Runtime::Embedding { model, batcher }) => {
                        m.insert("dimension".into(), json!(model.dimension()));
                        m.insert("maxSeqLength".into(), json!(model.settings().max_seq_length));
                        m.insert("queuedTokens".into(), json!(batcher.tokens_waiting()));
                    }
                    Some(Runtime::Generation { model, scheduler }) => {
                        m.insert("contextLength".into(), json!(model.context_length()));
                        let kv = scheduler.kv();
                        m.insert(
                            "kvCache".into(),
                            json!({
                                "budgetBytes": kv.budget_bytes,
                                "reservedBytes": kv.reserved_bytes(),
                                "usedBytes": kv.used_bytes(),
                                "bytesPerToken": kv.bytes_per_token,
                            }),
                        );
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
        "openConnections": state.metrics.open_connections.get(),
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

/// An inference request, checked as far as the server can without the handler: a JSON content
/// type, a body read within its size and time limits, valid UTF-8 JSON holding an object, a
/// `model` this pod serves, and that model loaded and ready. Checks that need the model (such as
/// `dimensions`) come after this, so a model still loading always answers 503 first.
pub struct Inference {
    pub body: serde_json::Map<String, Value>,
    pub id: ModelRef,
}

impl axum::extract::FromRequest<Shared> for Inference {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &Shared) -> Result<Self, ApiError> {
        require_json(req.headers())?;
        let bytes =
            read_body(req.into_body(), state.limits.max_body_bytes, state.limits.body_read_timeout).await?;
        let body = parse_object(&bytes)?;
        let id = resolve(state, body.get("model"))?;
        if let Err(e) = ready_runtime(state, &id) {
            // Counted under the model like every answer about it.
            record(state, &id, e.status, Instant::now());
            return Err(e);
        }
        Ok(Inference { body, id })
    }
}

/// JSON only (`application/json` or a `+json` type): a browser's cross-origin form post
/// (`text/plain`, `application/x-www-form-urlencoded`) never runs inference.
fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence.strip_prefix("application/").is_some_and(|sub| sub.ends_with("+json"));
    if json {
        return Ok(());
    }
    let shown =
        if given.is_empty() { "no Content-Type".to_string() } else { format!("Content-Type {given:?}") };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "unsupported_media_type",
        format!("{shown}: this endpoint takes a JSON body; send Content-Type: application/json"),
    ))
}

/// The whole body, refusing more than `limit` bytes (413) and a body still incomplete after
/// `timeout` (408), so a slow client cannot hold a request open indefinitely.
async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    use futures::StreamExt as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body is larger than the server's limit of {limit} bytes"),
        )
    };
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("bad_body", format!("cannot read the request body: {e}"))
            })?;
            if buf.len().saturating_add(chunk.len()) > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            format!("the request body did not arrive within {} s", timeout.as_secs_f64()),
        ))
    })
}

/// Syntax errors (and invalid UTF-8) are 400, a body that is not an object 422.
fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::bad_request("invalid_utf8", "request body is not valid UTF-8"));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::unprocessable("invalid_body", "request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_json", format!("request body is not valid JSON: {e}"))),
    }
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
/// A draining server still answers: its readiness is down so no new traffic comes, and what
/// arrives during the drain delay (clients that have not yet seen the endpoint go) is served.
fn ready_runtime<'a>(state: &'a AppState, id: &ModelRef) -> Result<&'a Runtime, ApiError> {
    if let Some(rt) = state.runtime_for(id) {
        return match rt.failure() {
            Some(reason) => Err(model_failed(id, &reason)),
            None => Ok(rt),
        };
    }
    Err({
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

/// Run `work` on the blocking pool, at most `tokenize_concurrency` at once: tokenizing is CPU
/// work that must neither stall the async workers nor pile up without bound.
pub(crate) async fn tokenize<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = state.tokenizing.acquire().await.map_err(|_| internal("the tokenizer pool is closed"))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| internal(&e.to_string()))
}

/// How long a request whose worker vanished waits for the reason to be recorded.
pub(crate) const WORKER_DEATH_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) fn internal(message: &str) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal", message)
}

/// 503 for a model whose worker died, naming why.
pub(crate) fn model_failed(id: &ModelRef, reason: &str) -> ApiError {
    ApiError::unavailable("model_failed", format!("model {id} stopped serving: {reason}"))
}

/// Take a queue place (so a full queue refuses before any tokenizing), tokenize off the async
/// workers, queue, and wait for the batch.
async fn embed_texts(state: &Shared, id: &ModelRef, texts: Vec<String>) -> Result<Embedded, ApiError> {
    let (model, batcher) = match ready_runtime(state, id)? {
        Runtime::Embedding { model, batcher } => (model.clone(), batcher.clone()),
        Runtime::Generation { .. } => {
            return Err(ApiError::bad_request(
                "wrong_family",
                format!("model {id} generates text; use POST /v1/chat/completions or /v1/completions"),
            ));
        }
    };
    let place = batcher.reserve().map_err(ApiError::from)?;
    let tokens =
        tokenize(state, move || texts.iter().map(|t| model.tokenize(t)).collect::<Result<Vec<_>, _>>())
            .await?
            .map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
    let counts = tokens.iter().map(|t| t.ids.len()).collect();
    let truncated = tokens.iter().map(|t| t.truncated).collect();
    let rx = place.submit(tokens.into_iter().map(|t| t.ids).collect()).map_err(ApiError::from)?;
    let vectors = match rx.await {
        Ok(Ok(vectors)) => vectors,
        // The worker answered with an error: its own, or that it died.
        Ok(Err(e)) => {
            return Err(match batcher.failure() {
                Some(reason) => model_failed(id, &reason),
                None => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "inference_failed",
                    e.to_string(),
                ),
            });
        }
        // The worker unwound past this request: it died.
        Err(_) => {
            let reason = batcher.failure_within(WORKER_DEATH_GRACE).await;
            return Err(model_failed(id, reason.as_deref().unwrap_or("its worker thread stopped")));
        }
    };
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

async fn embeddings(State(state): State<Shared>, request: Result<Inference, ApiError>) -> Response {
    let Inference { body: req, id } = match request {
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

async fn embed_text(State(state): State<Shared>, request: Result<Inference, ApiError>) -> Response {
    let Inference { body: req, id } = match request {
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
