//! `POST /v1/embeddings` (OpenAI) and `POST /embed/text` (the product's own endpoint).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::TextEmbedding;
use crate::api::embeddings::Embedded;
use crate::api::{ApiError, Inference, RequestBody, counted};
use crate::families::Shared;
use crate::families::embedding::{self, EmbedsText};
use crate::loader::Lease;
use crate::manifest::ModelRef;

pub fn routes() -> Router<Shared<TextEmbedding>> {
    Router::new()
        .route("/v1/embeddings", post(embedding::embeddings::<TextEmbedding>))
        .route("/embed/text", post(embed_text))
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

impl EmbedsText for TextEmbedding {
    fn dimension(lease: &Lease<TextEmbedding>) -> usize {
        lease.model.dimension()
    }

    async fn embed_texts(
        state: &Shared<TextEmbedding>,
        lease: &Lease<TextEmbedding>,
        id: &ModelRef,
        texts: Vec<String>,
    ) -> Result<Embedded, ApiError> {
        let model = lease.model.clone();
        embedding::embed_texts(state, &lease.batcher, id, texts, move |t| model.tokenize(t), |ids| ids).await
    }
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
        let mut out = TextEmbedding::embed_texts(&state, &lease, &id, vec![req.text]).await?;
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
