//! OpenAI's embeddings request and response (`POST /v1/embeddings`), for every family that
//! embeds text: the checks that need no model, and the response from the vectors.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, RequestBody};
use crate::manifest::ModelRef;

/// OpenAI's embeddings request. `model` is resolved by [`super::Inference`]; unknown fields
/// (`user`) are ignored, as OpenAI does.
#[derive(Deserialize)]
pub struct EmbeddingsRequest {
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

/// The answer for one input: its vector, its token count, whether it was cut.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: Vec<usize>,
    pub truncated: Vec<bool>,
}

/// More inputs in one request than the server takes.
pub fn too_many_inputs(given: usize, limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "too_many_inputs",
        format!("{given} inputs in one request; the limit is {limit}"),
    )
}

impl EmbeddingsRequest {
    /// The texts to embed, after the checks that need only the model's dimension.
    pub fn texts(
        &mut self,
        id: &ModelRef,
        dimension: usize,
        max_inputs: usize,
    ) -> Result<Vec<String>, ApiError> {
        let texts = match std::mem::replace(&mut self.input, Input::Many(Vec::new())) {
            Input::One(s) => vec![s],
            Input::Many(items) if items.is_empty() => {
                return Err(ApiError::bad_request("empty_input", "`input` must not be an empty array"));
            }
            Input::Many(items) => items,
        };
        if texts.len() > max_inputs {
            return Err(too_many_inputs(texts.len(), max_inputs));
        }
        match &self.dimensions {
            None | Some(Value::Null) => Ok(texts),
            Some(Value::Number(n)) if n.as_u64() == Some(dimension as u64) => Ok(texts),
            Some(_) => Err(ApiError::bad_request(
                "dimensions_not_supported",
                format!(
                    "model {id} returns {dimension} dimensions and cannot shorten them; omit `dimensions`"
                ),
            )),
        }
    }

    /// OpenAI's list response, in the encoding asked for.
    pub fn response(&self, id: &ModelRef, out: &Embedded) -> Response {
        let base64 = self.encoding_format == Some(EncodingFormat::Base64);
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
        Json(json!({
            "object": "list",
            "data": data,
            "model": id.to_string(),
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }))
        .into_response()
    }
}
