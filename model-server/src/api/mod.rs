//! The HTTP API every family shares: health, readiness, status, metrics, the model list, the
//! JSON errors, and [`Inference`], the one extractor every inference handler takes. The
//! families add their own routes (`families/*/routes.rs`).
//!
//! Every error is JSON `{"error": {"message", "type", "code"}}` with the right status.

use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::families::{ModelFamily, Serving, Shared, endpoints};
use crate::loader::{Lease, NotServing};
use crate::manifest::{Family, ModelRef};
use crate::queue::SubmitError;
use crate::state::AppState;

pub mod embeddings;
pub mod images;
mod upload;
pub use upload::Upload;

#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    /// Retry-After in seconds for 429 and 503 (default 1).
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError { status, kind, code, message: message.into(), retry_after: None }
    }
    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }
    pub(crate) fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", code, message)
    }
    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", code, message)
    }
    pub(crate) fn internal(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal", message)
    }
    pub(crate) fn inference_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "inference_failed", message)
    }
    /// 503 for a model whose worker died, naming why.
    pub(crate) fn model_failed(id: &ModelRef, reason: &str) -> Self {
        Self::unavailable("model_failed", format!("model {id} stopped serving: {reason}"))
    }
}

/// How long a request whose worker vanished waits for the reason to be recorded.
pub(crate) const WORKER_DEATH_GRACE: Duration = Duration::from_secs(1);

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

impl From<NotServing> for ApiError {
    fn from(e: NotServing) -> Self {
        let message = e.to_string();
        match e {
            NotServing::Loading { retry_after, .. } => {
                ApiError { retry_after: Some(retry_after), ..ApiError::unavailable("model_loading", message) }
            }
            NotServing::Failed { .. } | NotServing::Died { .. } => {
                ApiError::unavailable("model_failed", message)
            }
            NotServing::NoRoom(_) => ApiError::unavailable("memory_budget", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "code": self.code}});
        let mut resp = (self.status, Json(body)).into_response();
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            let seconds = self.retry_after.unwrap_or(1).to_string();
            if let Ok(value) = HeaderValue::from_str(&seconds) {
                resp.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        resp
    }
}

/// The routes of a pod serving family `F`: the shared ones and `F`'s own. Another family's
/// endpoint is a 404 that names the family this pod serves.
pub fn router<F: ModelFamily>(state: Shared<F>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<F>))
        .route("/status", get(status::<F>))
        .route("/metrics", get(metrics::<F>))
        .route("/v1/models", get(models::<F>))
        .merge(F::routes())
        .fallback(not_found::<F>)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found<F: ModelFamily>(method: Method, uri: Uri) -> ApiError {
    let here = F::FAMILY;
    let asked = format!("{method} {}", uri.path());
    let ours = endpoints(here).join(", ");
    let message = match Family::ALL.iter().find(|f| endpoints(**f).contains(&asked.as_str())) {
        Some(other) => format!(
            "{asked} is a {other} endpoint, but this pod serves the {here} family: {ours}; send it to a pool serving {other}"
        ),
        None => format!("no such endpoint; this pod serves the {here} family: {ours}, and GET /v1/models"),
    };
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "unknown_path", message)
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
    // The process is alive and its loader or workers are running; failures of a model show
    // up in readiness, which a restart would not fix.
    Json(json!({"status": "ok"}))
}

fn model_progress<F: ModelFamily>(state: &AppState<F>) -> Value {
    let models: serde_json::Map<String, Value> = state
        .slots
        .values()
        .filter(|s| s.serve || s.current().is_some())
        .map(|s| (s.id.to_string(), serde_json::to_value(s.progress()).unwrap_or(Value::Null)))
        .collect();
    Value::Object(models)
}

async fn readyz<F: ModelFamily>(State(state): State<Shared<F>>) -> Response {
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

async fn status<F: ModelFamily>(State(state): State<Shared<F>>) -> Json<Value> {
    let models: Vec<Value> = state
        .slots
        .values()
        .map(|s| {
            let mut v = serde_json::to_value(s.progress()).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("model".into(), json!(s.id.name));
                m.insert("version".into(), json!(s.id.version));
                m.insert("serve".into(), json!(s.serve));
                let serving = s.current();
                m.insert("queueDepth".into(), json!(serving.as_ref().map(|s| s.in_flight()).unwrap_or(0)));
                m.insert("queueWaiting".into(), json!(serving.as_ref().map(|s| s.waiting()).unwrap_or(0)));
                if let Some(serving) = serving {
                    m.extend(serving.status());
                }
                let last = s.last_used();
                if last > 0 {
                    let idle = state.now_ms().saturating_sub(last) as f64 / 1000.0;
                    m.insert("idleSeconds".into(), json!(idle));
                }
            }
            v
        })
        .collect();
    Json(json!({
        "family": F::FAMILY,
        "ready": state.is_ready(),
        "draining": state.is_draining(),
        "uptimeSeconds": state.started.elapsed().as_secs_f64(),
        "queueDepth": state.queue_depth(),
        "queueWaiting": state.queue_waiting(),
        "openConnections": state.metrics.open_connections.get(),
        "residentBytes": crate::loader::rss_bytes(),
        "memoryBudgetBytes": state.residency.budget_bytes,
        "device": device_status(&state.plan.device),
        "models": models,
    }))
}

fn device_status(device: &crate::device::ComputeDevice) -> Value {
    let mut v = json!({"device": device.label(), "name": device.name()});
    if let Some(note) = device.note() {
        v["note"] = json!(note);
    }
    v
}

async fn metrics<F: ModelFamily>(State(state): State<Shared<F>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn models<F: ModelFamily>(State(state): State<Shared<F>>) -> Json<Value> {
    // OpenAI's fields, then where the model stands here: lazy models are listed before they
    // load, with their state, so a client can tell a cold model from a warm one.
    let data: Vec<Value> = state
        .served
        .iter()
        .map(|id| {
            let mut item = json!({"id": id.to_string(), "object": "model", "created": 0, "owned_by": "kiln"});
            if let Some(slot) = state.slots.get(id) {
                let p = slot.progress();
                item["load"] = json!(p.load);
                item["state"] = json!(p.state);
                item["step"] = json!(p.step);
                if let Some(percent) = p.percent {
                    item["percent"] = json!(percent);
                }
            }
            item
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// A request body as a typed struct. A field that is missing, of the wrong type or of a value
/// out of its type's range is named in the error, with the status and code its endpoint uses.
pub trait RequestBody: DeserializeOwned + Send + 'static {
    /// Whether the body carries a file as base64 (`audio_base64`): then it may be as large as
    /// an upload, not only `--max-body-bytes`.
    const CARRIES_FILE: bool = false;

    /// The error for `field` (a path such as `messages[0].role`): missing, or invalid with
    /// serde's `detail`.
    fn field_error(field: &str, missing: bool, detail: &str) -> ApiError;
}

/// An inference request, checked as far as the server can without the handler: a JSON content
/// type, a body read within its size and time limits, valid UTF-8 JSON holding an object, a
/// `model` this pod serves, that model loaded and ready, and the body's fields typed as `T`.
/// Checks that need the model (such as `dimensions`) come after this, so a model still loading
/// always answers 503 first.
pub struct Inference<F: ModelFamily, T> {
    pub body: T,
    pub id: ModelRef,
    /// The loaded model, held until the request is answered.
    pub lease: Lease<F>,
}

impl<F: ModelFamily, T: RequestBody> axum::extract::FromRequest<Shared<F>> for Inference<F, T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &Shared<F>) -> Result<Self, ApiError> {
        require_json(req.headers())?;
        let limits = &state.limits;
        let limit = if T::CARRIES_FILE {
            // Base64 is 4 bytes per 3, plus the other fields.
            limits.max_body_bytes.max(limits.max_upload_bytes.saturating_mul(4) / 3 + (64 << 10))
        } else {
            limits.max_body_bytes
        };
        let bytes = read_body(req.into_body(), limit, limits.body_read_timeout).await?;
        let object = parse_object(&bytes)?;
        let id = resolve(state, object.get("model"))?;
        // Counted under the model like every answer about it.
        let lease = ready(state, &id).await.inspect_err(|e| record(state, &id, e.status, Instant::now()))?;
        let body = typed::<T>(Value::Object(object))
            .inspect_err(|e| record(state, &id, e.status, Instant::now()))?;
        Ok(Inference { body, id, lease })
    }
}

/// `value` as `T`, or the error `T` gives for the first field that does not fit.
fn typed<T: RequestBody>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let detail = e.inner().to_string();
        // serde reports a missing field at its parent's path, naming it in the message.
        match detail.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
            Some(field) if path == "." => T::field_error(field, true, &detail),
            Some(field) => T::field_error(&format!("{path}.{field}"), true, &detail),
            None => T::field_error(&path, false, &detail),
        }
    })
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
async fn read_body(body: axum::body::Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
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

fn resolve<F: ModelFamily>(state: &AppState<F>, requested: Option<&Value>) -> Result<ModelRef, ApiError> {
    let available = || state.served.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let not_found =
        |message: String| ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "model_not_found", message);
    match requested {
        None | Some(Value::Null) => {
            state.served.first().cloned().ok_or_else(|| not_found("this server serves no model".into()))
        }
        Some(Value::String(name)) => state.resolve(name).cloned().ok_or_else(|| {
            not_found(format!("model {name:?} is not served here; available: {}", available()))
        }),
        Some(_) => Err(ApiError::unprocessable(
            "invalid_model",
            "`model` must be a string such as \"minilm\" or \"minilm:v2\"",
        )),
    }
}

/// A lease on the model answering for `id` (a lazy one is loaded first, the request waiting up
/// to `--lazy-load-wait-seconds`), or why there is none: loading, failed to load, no room in
/// the memory budget, worker died. A draining server still answers: its readiness is down so
/// no new traffic comes, and what arrives during the drain delay is served.
pub(crate) async fn ready<F: ModelFamily>(state: &Shared<F>, id: &ModelRef) -> Result<Lease<F>, ApiError> {
    crate::loader::acquire(state, id).await.map_err(ApiError::from)
}

/// What a model's worker answered through `rx`: its result, its error, or (when it died
/// without answering) the reason `queue` recorded, waited for briefly.
pub(crate) async fn worker_answer<T, J: crate::queue::Weigh>(
    rx: tokio::sync::oneshot::Receiver<Result<T, crate::models::ModelError>>,
    queue: &crate::queue::RequestQueue<J>,
    id: &ModelRef,
) -> Result<T, ApiError> {
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        // The worker answered with an error: its own, or that it died.
        Ok(Err(e)) => Err(match queue.lock().failed.clone() {
            Some(reason) => ApiError::model_failed(id, &reason),
            None => ApiError::inference_failed(e.to_string()),
        }),
        // The worker unwound past this request: it died.
        Err(_) => {
            let reason = queue.failure_within(WORKER_DEATH_GRACE).await;
            Err(ApiError::model_failed(id, reason.as_deref().unwrap_or("its worker thread stopped")))
        }
    }
}

/// Run `work` on the blocking pool, at most `tokenize_concurrency` at once: tokenizing is CPU
/// work that must neither stall the async workers nor pile up without bound.
pub(crate) async fn tokenize<F: ModelFamily, T: Send + 'static>(
    state: &AppState<F>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit =
        state.tokenizing.acquire().await.map_err(|_| ApiError::internal("the tokenizer pool is closed"))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(&e.to_string()))
}

fn record<F: ModelFamily>(state: &AppState<F>, id: &ModelRef, code: StatusCode, started: Instant) {
    let code = code.as_u16().to_string();
    state.metrics.requests.with_label_values(&[&id.name, &id.version, &code]).inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[&id.name, &id.version])
        .observe(started.elapsed().as_secs_f64());
}

/// Run `f` for a resolved model and count the outcome under that model's labels.
pub(crate) async fn counted<F, Fut>(state: &Shared<F>, id: &ModelRef, f: impl FnOnce() -> Fut) -> Response
where
    F: ModelFamily,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let resp = f().await.unwrap_or_else(IntoResponse::into_response);
    record(state, id, resp.status(), started);
    resp
}
