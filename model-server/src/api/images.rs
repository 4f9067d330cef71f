//! Images in requests, for every family that takes them (image-text embeddings, face
//! detection): one image or a list as base64 JSON, or a multipart `file`; the 4xx a refused
//! image gets, naming where it was.

use axum::extract::Request;
use axum::http::{StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;

use super::embeddings::too_many_inputs;
use super::{ApiError, tokenize, worker_answer};
use crate::families::ModelFamily;
use crate::families::batcher::{BatchInput, Batcher};
use crate::images::{ImageError, ImageLimits};
use crate::manifest::ModelRef;
use crate::state::AppState;

/// Images in one request: each holds megabytes of pixels until its batch runs.
pub const MAX_IMAGES_PER_REQUEST: usize = 64;

/// An image as it arrived, decoded off the async workers.
pub enum Encoded {
    Base64(String),
    Raw(Bytes),
}

impl Encoded {
    /// The image's bytes; `field` names it in the error.
    pub fn bytes(self, field: &str) -> Result<Vec<u8>, ApiError> {
        match self {
            Encoded::Raw(b) => Ok(b.to_vec()),
            Encoded::Base64(s) => base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| ApiError::bad_request("invalid_base64", format!("{field} is not base64: {e}"))),
        }
    }
}

/// The images of a JSON body (`image_base64`, or a list `images_base64`), each with the field
/// it came from, and whether one image was sent (the answer is then not a list).
pub fn from_json(
    one: Option<String>,
    many: Option<Vec<String>>,
) -> Result<(Vec<(String, Encoded)>, bool), ApiError> {
    match (one, many) {
        (Some(one), None) => Ok((vec![("`image_base64`".to_string(), Encoded::Base64(one))], true)),
        (None, Some(many)) if many.is_empty() => {
            Err(ApiError::bad_request("empty_input", "`images_base64` must not be an empty array"))
        }
        (None, Some(many)) if many.len() > MAX_IMAGES_PER_REQUEST => {
            Err(too_many_inputs(many.len(), MAX_IMAGES_PER_REQUEST))
        }
        (None, Some(many)) => Ok((
            many.into_iter()
                .enumerate()
                .map(|(i, s)| (format!("`images_base64[{i}]`"), Encoded::Base64(s)))
                .collect(),
            false,
        )),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "ambiguous_input",
            "send either `image_base64` or `images_base64`, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "missing_image",
            "`image_base64` (one image) or `images_base64` (a list) is required, or post multipart/form-data with the image as `file`",
        )),
    }
}

/// The 4xx an image refused by the decoder gets; `field` names where it was.
pub fn image_error(field: &str, e: ImageError) -> ApiError {
    let message = format!("{field}: {e}");
    match e {
        ImageError::TooManyBytes { .. } | ImageError::TooManyPixels { .. } | ImageError::OverLimit(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "image_too_large", message)
        }
        ImageError::Unsupported(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_image",
            message,
        ),
        ImageError::Corrupt(_) => ApiError::bad_request("invalid_image", message),
    }
}

/// Whether a request is a multipart upload (else it is JSON).
pub fn is_multipart(req: &Request) -> bool {
    let given = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    given.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("multipart/form-data")
}

/// Take a place in `batcher`'s queue (a full queue refuses before any decoding), decode each
/// image with `decode` on the blocking pool within the upload limit, queue them, and wait for
/// their batch: one output per image, in order.
pub async fn queue_images<F: ModelFamily, I: BatchInput>(
    state: &AppState<F>,
    batcher: &Batcher<I>,
    id: &ModelRef,
    images: Vec<(String, Encoded)>,
    decode: impl Fn(&[u8], &ImageLimits) -> Result<I, ImageError> + Send + 'static,
) -> Result<Vec<I::Output>, ApiError> {
    let place = batcher.reserve().map_err(ApiError::from)?;
    let limits = ImageLimits { max_bytes: state.limits.max_upload_bytes, ..ImageLimits::default() };
    let inputs = tokenize(state, move || {
        images
            .into_iter()
            .map(|(field, encoded)| {
                let bytes = encoded.bytes(&field)?;
                decode(&bytes, &limits).map_err(|e| image_error(&field, e))
            })
            .collect::<Result<Vec<I>, ApiError>>()
    })
    .await??;
    let rx = place.submit(inputs).map_err(ApiError::from)?;
    worker_answer(rx, batcher.queue(), id).await
}
