//! `POST /v1/embeddings` (OpenAI) and `POST /embed/text` (the product's own endpoint).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::TextEmbedding;
use crate::api::{ApiError, Inference, RequestBody, counted, tokenize, worker_answer};
use crate::families::Shared;
use crate::loader::Lease;
use crate::manifest::ModelRef;

pub fn routes() -> Router<Shared<TextEmbedding>> {
    Router::new().route("/v1/embeddings", post(embeddings)).route("/embed/text", post(embed_text))
}

/// OpenAI's embeddings request. `model` is resolved by [`Inference`]; unknown fields (`user`)
/// are ignored, as OpenAI does.
#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Input,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    /// Accepted only when it equals the model's dimension (checked against the model).
    #[serde(default)]
    dimensions: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    Float,
    Base64,
}

impl RequestBody for EmbeddingsRequest {
    fn field_error(field: &str, missing: bool, _detail: &str) -> ApiError {
        match (field, missing) {
            ("input", true) => ApiError::bad_request("missing_input", "`input` is required"),
            ("input", false) => ApiError::unprocessable(
                "invalid_input",
                "`input` must be a string or an array of strings (token arrays are not supported)",
            ),
            ("encoding_format", _) => ApiError::bad_request(
                "invalid_encoding_format",
                "`encoding_format` must be \"float\" or \"base64\"",
            ),
            (other, _) => ApiError::unprocessable("invalid_body", format!("`{other}` is not valid here")),
        }
    }
}

/// The product's `{"text": "..."}`.
#[derive(Deserialize)]
struct EmbedTextRequest {
    text: String,
}

impl RequestBody for EmbedTextRequest {
    fn field_error(field: &str, missing: bool, _detail: &str) -> ApiError {
        match (field, missing) {
            ("text", true) => ApiError::bad_request("missing_text", "`text` is required"),
            ("text", false) => ApiError::unprocessable("invalid_text", "`text` must be a string"),
            (other, _) => ApiError::unprocessable("invalid_body", format!("`{other}` is not valid here")),
        }
    }
}

struct Embedded {
    vectors: Vec<Vec<f32>>,
    tokens: Vec<usize>,
    truncated: Vec<bool>,
}

/// Take a queue place (so a full queue refuses before any tokenizing), tokenize off the async
/// workers, queue, and wait for the batch.
async fn embed_texts(
    state: &Shared<TextEmbedding>,
    serving: &Lease<TextEmbedding>,
    id: &ModelRef,
    texts: Vec<String>,
) -> Result<Embedded, ApiError> {
    let (model, batcher) = (serving.model.clone(), serving.batcher.clone());
    let place = batcher.reserve().map_err(ApiError::from)?;
    let tokens =
        tokenize(state, move || texts.iter().map(|t| model.tokenize(t)).collect::<Result<Vec<_>, _>>())
            .await?
            .map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
    let counts = tokens.iter().map(|t| t.ids.len()).collect();
    let truncated = tokens.iter().map(|t| t.truncated).collect();
    let rx = place.submit(tokens.into_iter().map(|t| t.ids).collect()).map_err(ApiError::from)?;
    let vectors = worker_answer(rx, batcher.queue(), id).await?;
    Ok(Embedded { vectors, tokens: counts, truncated })
}

async fn embeddings(
    State(state): State<Shared<TextEmbedding>>,
    request: Result<Inference<TextEmbedding, EmbeddingsRequest>, ApiError>,
) -> Response {
    let Inference { body: req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let texts = match req.input {
            Input::One(s) => vec![s],
            Input::Many(items) if items.is_empty() => {
                return Err(ApiError::bad_request("empty_input", "`input` must not be an empty array"));
            }
            Input::Many(items) => items,
        };
        if texts.len() > state.limits.max_inputs {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "too_many_inputs",
                format!("{} inputs in one request; the limit is {}", texts.len(), state.limits.max_inputs),
            ));
        }
        let dimension = lease.model.dimension();
        match &req.dimensions {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64() == Some(dimension as u64) => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "dimensions_not_supported",
                    format!(
                        "model {id} returns {dimension} dimensions and cannot shorten them; omit `dimensions`"
                    ),
                ));
            }
        }
        let base64 = req.encoding_format == Some(EncodingFormat::Base64);
        let out = embed_texts(&state, &lease, &id, texts).await?;
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
    State(state): State<Shared<TextEmbedding>>,
    request: Result<Inference<TextEmbedding, EmbedTextRequest>, ApiError>,
) -> Response {
    let Inference { body: req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let mut out = embed_texts(&state, &lease, &id, vec![req.text]).await?;
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
