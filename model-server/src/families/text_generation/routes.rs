//! OpenAI `POST /v1/chat/completions` and `POST /v1/completions`, with `stream: true` as
//! server-sent events in OpenAI's chunk format ending with `data: [DONE]`.
//!
//! A request is validated and tokenized here, then handed to the model's continuous-batching
//! scheduler, whose events (text, then done or failed) become the JSON body or the SSE stream.
//! Dropping the stream (the client went away) closes the event channel, and the scheduler frees
//! the sequence's slot before its next step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::TextGeneration;
use super::model::{ChatMessage, FinishReason, SamplingParams};
use super::scheduler::{Event, Request, Scheduler};
use crate::api::{ApiError, Inference, RequestBody, WORKER_DEATH_GRACE, counted, tokenize};
use crate::families::Shared;
use crate::loader::Lease;
use crate::manifest::ModelRef;

/// OpenAI's default `max_tokens` for `/v1/completions`; chat defaults to the rest of the context.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;
/// OpenAI allows up to four stop strings.
const MAX_STOPS: usize = 4;
/// Longest stop string, and all of them together, in bytes.
const MAX_STOP_BYTES: usize = 256;
const MAX_STOP_TOTAL_BYTES: usize = 512;

pub fn routes() -> Router<Shared<TextGeneration>> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The body of both endpoints (chat has `messages`, completions `prompt`). `model` is resolved
/// by [`Inference`]; unknown fields are ignored, as OpenAI does.
#[derive(Deserialize)]
struct GenerationRequest {
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Strings>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    /// An extension: 0 means no top-k cut.
    #[serde(default)]
    top_k: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stop: Option<Strings>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    // Features this server does not have: refused when set, never silently ignored.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: Role,
    content: Content,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    /// Content parts: text only.
    Parts(Vec<TextPart>),
}

#[derive(Deserialize)]
struct TextPart {
    #[serde(rename = "type")]
    kind: PartKind,
    text: String,
}

#[derive(Deserialize)]
enum PartKind {
    #[serde(rename = "text")]
    Text,
}

/// One string or a list of them (`prompt`, `stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Strings {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl RequestBody for GenerationRequest {
    fn field_error(field: &str, _missing: bool, detail: &str) -> ApiError {
        let bad = |code, message: String| ApiError::bad_request(code, message);
        match field {
            "messages" => bad("invalid_messages", "`messages` must be an array of {role, content}".into()),
            f if f.starts_with("messages") && f.ends_with(".content") => bad(
                "invalid_messages",
                format!(
                    "{f} must be a string or text parts ({{\"type\": \"text\", \"text\": ...}}); only text parts are supported"
                ),
            ),
            f if f.starts_with("messages") => bad("invalid_messages", format!("{f}: {detail}")),
            "prompt" => bad("invalid_prompt", "`prompt` must be a string".into()),
            f if f == "stop" || f.starts_with("stop[") => {
                bad("invalid_stop", "`stop` must be a string or an array of strings".into())
            }
            "max_tokens" | "max_completion_tokens" | "top_k" | "seed" | "n" => bad(
                "invalid_parameter",
                format!("`{field}` must be a non-negative integer below 2^64 ({detail})"),
            ),
            "temperature" | "top_p" => {
                bad("invalid_parameter", format!("`{field}` must be a number ({detail})"))
            }
            "stream" | "stream_options.include_usage" => {
                bad("invalid_parameter", format!("`{field}` must be true or false"))
            }
            "stream_options" => bad("invalid_parameter", "`stream_options` must be an object".into()),
            other => bad("invalid_parameter", format!("`{other}`: {detail}")),
        }
    }
}

/// A validated request, before tokenization.
struct Parsed {
    prompt: PromptInput,
    max_tokens: Option<u64>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

enum PromptInput {
    Messages(Vec<ChatMessage>),
    Text(String),
}

async fn chat_completions(
    State(state): State<Shared<TextGeneration>>,
    request: Result<Inference<TextGeneration, GenerationRequest>, ApiError>,
) -> Response {
    handle(state, request, Kind::Chat).await
}

async fn completions(
    State(state): State<Shared<TextGeneration>>,
    request: Result<Inference<TextGeneration, GenerationRequest>, ApiError>,
) -> Response {
    handle(state, request, Kind::Completion).await
}

async fn handle(
    state: Shared<TextGeneration>,
    request: Result<Inference<TextGeneration, GenerationRequest>, ApiError>,
    kind: Kind,
) -> Response {
    let Inference { body: req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (shared, model) = (state.clone(), id.clone());
    counted(&state, &id, || async move { generate(shared, lease, model, req, kind).await }).await
}

async fn generate(
    state: Shared<TextGeneration>,
    serving: Lease<TextGeneration>,
    id: ModelRef,
    req: GenerationRequest,
    kind: Kind,
) -> Result<Response, ApiError> {
    let parsed = validate(req, kind)?;
    let (model, scheduler) = (serving.model.clone(), serving.scheduler.clone());
    // A queue place first: a full queue refuses before any tokenizing is done.
    let place = scheduler.reserve()?;
    let prompt_input = parsed.prompt;
    let tokenizing = model.clone();
    let prompt = tokenize(&state, move || match prompt_input {
        PromptInput::Messages(messages) => tokenizing.encode_chat(&messages),
        PromptInput::Text(text) => tokenizing.encode_plain(&text),
    })
    .await?
    .map_err(|e| ApiError::bad_request("invalid_prompt", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::bad_request("empty_prompt", "the prompt is empty after tokenization"));
    }
    let vocab = model.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(
            "invalid_prompt",
            format!(
                "the tokenizer produced token id {bad}, outside the model's vocabulary of {vocab}; the model's tokenizer and weights disagree"
            ),
        ));
    }
    // Without max_tokens the window's rest is the default, but no more than one sequence can
    // hold in the KV budget: a small pod has, in effect, a smaller window.
    let context = model.context_length().min(scheduler.kv_capacity_tokens());
    let max_tokens = match parsed.max_tokens {
        None => max_tokens_for(None, prompt.len(), context, kind)?,
        asked => max_tokens_for(asked, prompt.len(), model.context_length(), kind)?,
    };
    scheduler
        .check_budget(prompt.len(), max_tokens)
        .map_err(|e| ApiError::bad_request("kv_cache_exceeded", e.to_string()))?;
    let (events, rx) = mpsc::unbounded_channel();
    place.submit(Request { prompt, max_tokens, sampling: parsed.sampling, stop: parsed.stop, events })?;
    let meta = Meta::new(kind, &id);
    if parsed.stream {
        Ok(stream_response(meta, rx, parsed.include_usage, scheduler).into_response())
    } else {
        collect_response(meta, rx, &scheduler).await
    }
}

/// The tokens to generate: what the request asked for, or the default (the rest of the window
/// for chat, OpenAI's 16 for completions). Arithmetic on the request's number saturates: a
/// `max_tokens` of 2^64-1 is an error that gives the numbers, never an overflow.
fn max_tokens_for(asked: Option<u64>, prompt: usize, context: usize, kind: Kind) -> Result<usize, ApiError> {
    let room = context.saturating_sub(prompt);
    match asked {
        Some(n) if (prompt as u64).saturating_add(n) > context as u64 => Err(ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "this model's context window is {context} tokens; the prompt is {prompt} tokens and max_tokens asks for {n} more; at most {room} can be generated: shorten the prompt or lower max_tokens"
            ),
        )),
        // Fits the window, so it fits usize.
        Some(n) => Ok(usize::try_from(n).unwrap_or(room)),
        None if room == 0 => Err(ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "this model's context window is {context} tokens and the prompt is {prompt} tokens; nothing is left to generate"
            ),
        )),
        None if kind == Kind::Completion => Ok(COMPLETIONS_DEFAULT_MAX_TOKENS.min(room)),
        None => Ok(room),
    }
}

/// Why the scheduler stopped talking to a request: it died.
async fn worker_gone(id: &str, scheduler: &Scheduler) -> String {
    let reason = scheduler.failure_within(WORKER_DEATH_GRACE).await;
    format!("model {id} stopped serving: {}", reason.as_deref().unwrap_or("its worker thread stopped"))
}

/// What every response and chunk of one request shares.
#[derive(Clone)]
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    model_ref: ModelRef,
}

impl Meta {
    fn new(kind: Kind, model: &ModelRef) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
        Meta {
            kind,
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
            model: model.to_string(),
            model_ref: model.clone(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One streamed piece: text so far unsent and, on the last piece, why it ended.
    fn chunk(&self, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice]))
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn failed(message: String) -> ApiError {
    ApiError::inference_failed(message)
}

async fn collect_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    scheduler: &Scheduler,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Failed(message)) => return Err(failed(message)),
            Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                let choice = match meta.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                    Kind::Completion => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
                    }
                };
                let mut body = meta.envelope(false, json!([choice]));
                body["usage"] = usage(prompt_tokens, completion_tokens);
                return Ok(Json(body).into_response());
            }
            // The worker unwound past this request: it died.
            None => {
                let reason = scheduler.failure_within(WORKER_DEATH_GRACE).await;
                return Err(ApiError::model_failed(
                    &meta.model_ref,
                    reason.as_deref().unwrap_or("its worker thread stopped"),
                ));
            }
        }
    }
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    scheduler: Scheduler,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    // Chat streams open with the assistant role, as OpenAI's do.
    let opening = (meta.kind == Kind::Chat).then(|| data(&meta.chunk(None, None)));
    let body = stream::unfold(Some((rx, meta)), move |st| {
        let scheduler = scheduler.clone();
        async move {
        let (mut rx, meta) = st?;
        let events: Vec<SseEvent> = match rx.recv().await {
            Some(Event::Text(t)) if t.is_empty() => Vec::new(),
            Some(Event::Text(t)) => vec![data(&meta.chunk(Some(&t), None))],
            Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                let mut out = vec![data(&meta.chunk(None, Some(finish)))];
                if include_usage {
                    let mut last = meta.envelope(true, json!([]));
                    last["usage"] = usage(prompt_tokens, completion_tokens);
                    out.push(data(&last));
                }
                out.push(SseEvent::default().data("[DONE]"));
                return Some((out, None));
            }
            Some(Event::Failed(message)) => {
                let error = json!({"error": {"message": message, "type": "server_error", "code": "inference_failed"}});
                return Some((vec![data(&error), SseEvent::default().data("[DONE]")], None));
            }
            // The worker went away without a last word (it died): say so, then end.
            None => {
                let message = worker_gone(&meta.model, &scheduler).await;
                let error = json!({"error": {"message": message, "type": "server_error", "code": "model_failed"}});
                return Some((vec![data(&error), SseEvent::default().data("[DONE]")], None));
            }
        };
        Some((events, Some((rx, meta))))
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)));
    Sse::new(stream::iter(opening.into_iter().map(Ok)).chain(body))
}

/// The checks a type cannot express: what each endpoint requires, ranges, counts and lengths.
fn validate(req: GenerationRequest, kind: Kind) -> Result<Parsed, ApiError> {
    let bad = |code, message: String| ApiError::bad_request(code, message);
    let prompt = match kind {
        Kind::Chat => {
            let messages =
                req.messages.ok_or_else(|| bad("missing_messages", "`messages` is required".into()))?;
            if messages.is_empty() {
                return Err(bad("invalid_messages", "`messages` must not be empty".into()));
            }
            PromptInput::Messages(messages.into_iter().map(chat_message).collect())
        }
        Kind::Completion => PromptInput::Text(match req.prompt {
            Some(Strings::One(s)) => s,
            Some(Strings::Many(mut items)) if items.len() == 1 => items.remove(0),
            Some(Strings::Many(_)) => {
                return Err(bad(
                    "invalid_prompt",
                    "`prompt` must be one string (batches of prompts are not supported)".into(),
                ));
            }
            None => return Err(bad("missing_prompt", "`prompt` is required".into())),
        }),
    };
    if req.max_tokens == Some(0) || req.max_completion_tokens == Some(0) {
        return Err(bad("invalid_parameter", "`max_tokens` must be at least 1".into()));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            "invalid_parameter",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "invalid_parameter",
            format!("`top_p` must be greater than 0 and at most 1, got {top_p}"),
        ));
    }
    let top_k = req.top_k.unwrap_or(0).min(u64::from(u32::MAX)) as usize;
    if let Some(n) = req.n.filter(|&n| n != 1) {
        return Err(bad("unsupported_parameter", format!("`n` must be 1 (got {n}); send separate requests")));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Strings::One(s)) => vec![s],
        Some(Strings::Many(items)) => items,
    };
    if stop.len() > MAX_STOPS {
        return Err(bad("invalid_stop", format!("at most {MAX_STOPS} stop strings, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(bad("invalid_stop", "stop strings must not be empty".into()));
    }
    // Bounded so the per-token stop search stays cheap.
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            "invalid_stop",
            format!("a stop string may be at most {MAX_STOP_BYTES} bytes; one is {} bytes", long.len()),
        ));
    }
    let total: usize = stop.iter().map(String::len).sum();
    if total > MAX_STOP_TOTAL_BYTES {
        return Err(bad(
            "invalid_stop",
            format!("stop strings may total at most {MAX_STOP_TOTAL_BYTES} bytes; these are {total}"),
        ));
    }
    let unsupported = [
        ("tools", &req.tools),
        ("functions", &req.functions),
        ("logit_bias", &req.logit_bias),
        ("response_format", &req.response_format),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null())) {
        return Err(bad("unsupported_parameter", format!("`{key}` is not supported by this server")));
    }
    if req.logprobs.as_ref().is_some_and(|v| !(v.is_null() || *v == Value::Bool(false))) {
        return Err(bad("unsupported_parameter", "`logprobs` is not supported by this server".into()));
    }
    Ok(Parsed {
        prompt,
        max_tokens: req.max_tokens.or(req.max_completion_tokens),
        sampling: SamplingParams { temperature, top_p, top_k, seed: req.seed.unwrap_or_else(random_seed) },
        stop,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
    })
}

/// A message as the chat template sees it: `developer` is the system role; parts are joined.
fn chat_message(m: Message) -> ChatMessage {
    let role = match m.role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let content = match m.content {
        Content::Text(t) => t,
        Content::Parts(parts) => parts
            .into_iter()
            .map(|p| match p.kind {
                PartKind::Text => p.text,
            })
            .collect(),
    };
    ChatMessage { role: role.to_string(), content }
}

/// A seed for requests that do not name one.
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}
