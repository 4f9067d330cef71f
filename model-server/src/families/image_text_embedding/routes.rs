//! `POST /embed/vision` (JSON `image_base64` or `images_base64`, or a multipart `file`),
//! `POST /embed/text` (`text`, one or a list) and OpenAI's `POST /v1/embeddings` (text).

use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ImageTextEmbedding, Input};
use crate::api::embeddings::{Embedded, too_many_inputs};
use crate::api::images::{self, Encoded, is_multipart};
use crate::api::{ApiError, Inference, RequestBody, Upload, counted};
use crate::families::Shared;
use crate::families::embedding::{self, EmbedsText};
use crate::loader::Lease;
use crate::manifest::ModelRef;

pub fn routes() -> Router<Shared<ImageTextEmbedding>> {
    Router::new()
        .route("/embed/vision", post(embed_vision))
        .route("/embed/text", post(embed_text))
        .route("/v1/embeddings", post(embedding::embeddings::<ImageTextEmbedding>))
}

/// The JSON form of `/embed/vision`: one image or a list, base64-encoded.
#[derive(Deserialize)]
struct VisionRequest {
    #[serde(default)]
    image_base64: Option<String>,
    #[serde(default)]
    images_base64: Option<Vec<String>>,
}

impl RequestBody for VisionRequest {
    const CARRIES_FILE: bool = true;

    fn field_error(field: &str, _missing: bool, _detail: &str) -> ApiError {
        match field {
            "image_base64" => {
                ApiError::unprocessable("invalid_image_base64", "`image_base64` must be a string")
            }
            f if f.starts_with("images_base64") => ApiError::unprocessable(
                "invalid_images_base64",
                "`images_base64` must be an array of strings",
            ),
            other => ApiError::unprocessable("invalid_body", format!("`{other}` is not valid here")),
        }
    }
}

/// The multipart form of `/embed/vision`: the image is the `file` part; `model` may be given.
#[derive(Deserialize)]
struct VisionForm {}

impl RequestBody for VisionForm {
    fn field_error(field: &str, _missing: bool, _detail: &str) -> ApiError {
        ApiError::bad_request("invalid_field", format!("form field `{field}` must be text"))
    }
}

/// `{"text": "..."}` or `{"text": ["...", "..."]}`.
#[derive(Deserialize)]
struct EmbedTextRequest {
    text: TextInput,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextInput {
    One(String),
    Many(Vec<String>),
}

impl RequestBody for EmbedTextRequest {
    fn field_error(field: &str, missing: bool, _detail: &str) -> ApiError {
        match (field, missing) {
            ("text", true) => ApiError::bad_request("missing_text", "`text` is required"),
            ("text", false) => {
                ApiError::unprocessable("invalid_text", "`text` must be a string or an array of strings")
            }
            (other, _) => ApiError::unprocessable("invalid_body", format!("`{other}` is not valid here")),
        }
    }
}

/// Decode and preprocess the images off the async workers, queue them, wait for their batch.
async fn embed_images(
    state: &Shared<ImageTextEmbedding>,
    lease: &Lease<ImageTextEmbedding>,
    id: &ModelRef,
    images: Vec<(String, Encoded)>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let model = lease.model.clone();
    images::queue_images(state, &lease.batcher, id, images, move |bytes, limits| model.image(bytes, limits))
        .await
}

impl EmbedsText for ImageTextEmbedding {
    fn dimension(lease: &Lease<ImageTextEmbedding>) -> usize {
        lease.model.dimension()
    }

    async fn embed_texts(
        state: &Shared<ImageTextEmbedding>,
        lease: &Lease<ImageTextEmbedding>,
        id: &ModelRef,
        texts: Vec<String>,
    ) -> Result<Embedded, ApiError> {
        let model = lease.model.clone();
        embedding::embed_texts(state, &lease.batcher, id, texts, move |t| model.tokenize(t), Input::Text)
            .await
    }
}

async fn embed_vision(State(state): State<Shared<ImageTextEmbedding>>, req: Request) -> Response {
    // One image or a list of them, with the lease and model they go to.
    let (id, lease, images, one) = if is_multipart(&req) {
        match Upload::<ImageTextEmbedding, VisionForm>::from_request(req, &state).await {
            Ok(Upload { id, lease, file, .. }) => {
                (id, lease, vec![("`file`".to_string(), Encoded::Raw(file))], true)
            }
            Err(e) => return e.into_response(),
        }
    } else {
        match Inference::<ImageTextEmbedding, VisionRequest>::from_request(req, &state).await {
            Ok(Inference { body, id, lease }) => {
                let images = images::from_json(body.image_base64, body.images_base64);
                match images {
                    Ok((images, one)) => (id, lease, images, one),
                    Err(e) => return counted(&state, &id, || async { Err(e) }).await,
                }
            }
            Err(e) => return e.into_response(),
        }
    };
    counted(&state, &id, || async {
        let mut vectors = embed_images(&state, &lease, &id, images).await?;
        let dimension = lease.model.dimension();
        let body = if one {
            json!({"embedding": vectors.pop().unwrap_or_default(), "dimension": dimension, "model": id.to_string()})
        } else {
            json!({"embeddings": vectors, "dimension": dimension, "model": id.to_string()})
        };
        Ok(Json(body).into_response())
    })
    .await
}

async fn embed_text(
    State(state): State<Shared<ImageTextEmbedding>>,
    request: Result<Inference<ImageTextEmbedding, EmbedTextRequest>, ApiError>,
) -> Response {
    let Inference { body: req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let (texts, one) = match req.text {
            TextInput::One(t) => (vec![t], true),
            TextInput::Many(items) if items.is_empty() => {
                return Err(ApiError::bad_request("empty_input", "`text` must not be an empty array"));
            }
            TextInput::Many(items) if items.len() > state.limits.max_inputs => {
                return Err(too_many_inputs(items.len(), state.limits.max_inputs));
            }
            TextInput::Many(items) => (items, false),
        };
        let mut out = ImageTextEmbedding::embed_texts(&state, &lease, &id, texts).await?;
        let dimension = lease.model.dimension();
        let body = if one {
            json!({
                "embedding": out.vectors.pop().unwrap_or_default(),
                "dimension": dimension,
                "model": id.to_string(),
                "tokens": out.tokens.first().copied().unwrap_or(0),
                "truncated": out.truncated.first().copied().unwrap_or(false),
            })
        } else {
            json!({
                "embeddings": out.vectors,
                "dimension": dimension,
                "model": id.to_string(),
                "tokens": out.tokens,
                "truncated": out.truncated,
            })
        };
        Ok(Json(body).into_response())
    })
    .await
}
