//! `POST /face/detect`: a multipart `file`, or JSON `image_base64` (one image) or
//! `images_base64` (a list); `score_threshold`, `nms_threshold` and `top_k` as OpenCV's
//! `FaceDetectorYN` takes them, with its defaults.

use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Detection, FaceDetection};
use crate::api::images::{self, Encoded, is_multipart};
use crate::api::{ApiError, Inference, RequestBody, Upload, counted};
use crate::families::Shared;
use crate::images::ImageLimits;
use crate::models::yunet::DetectOptions;

/// The most candidates a request may send into NMS (OpenCV's default).
pub const MAX_TOP_K: u64 = 5000;

pub fn routes() -> Router<Shared<FaceDetection>> {
    Router::new().route("/face/detect", post(detect))
}

/// The JSON form.
#[derive(Deserialize)]
struct DetectRequest {
    #[serde(default)]
    image_base64: Option<String>,
    #[serde(default)]
    images_base64: Option<Vec<String>>,
    #[serde(default)]
    score_threshold: Option<f64>,
    #[serde(default)]
    nms_threshold: Option<f64>,
    #[serde(default)]
    top_k: Option<u64>,
}

impl RequestBody for DetectRequest {
    const CARRIES_FILE: bool = true;

    fn field_error(field: &str, _missing: bool, _detail: &str) -> ApiError {
        let invalid = |code: &'static str, what: &str| {
            ApiError::unprocessable(code, format!("`{field}` must be {what}"))
        };
        match field {
            "image_base64" => invalid("invalid_image_base64", "a string"),
            f if f.starts_with("images_base64") => invalid("invalid_images_base64", "an array of strings"),
            "score_threshold" | "nms_threshold" => invalid("invalid_threshold", "a number between 0 and 1"),
            "top_k" => invalid("invalid_top_k", &format!("an integer from 1 to {MAX_TOP_K}")),
            other => ApiError::unprocessable("invalid_body", format!("`{other}` is not valid here")),
        }
    }
}

/// The multipart form: the image is the `file` part; the settings are text fields.
#[derive(Deserialize)]
struct DetectForm {
    #[serde(default)]
    score_threshold: Option<String>,
    #[serde(default)]
    nms_threshold: Option<String>,
    #[serde(default)]
    top_k: Option<String>,
}

impl RequestBody for DetectForm {
    fn field_error(field: &str, _missing: bool, _detail: &str) -> ApiError {
        ApiError::bad_request("invalid_field", format!("form field `{field}` must be text"))
    }
}

/// A request's settings as sent: score threshold, NMS threshold, top-k.
type Settings = (Option<f64>, Option<f64>, Option<u64>);

impl DetectForm {
    fn settings(&self) -> Result<Settings, ApiError> {
        let number = |name: &str, v: &Option<String>| -> Result<Option<f64>, ApiError> {
            match v.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
                None => Ok(None),
                Some(t) => t.parse::<f64>().map(Some).map_err(|_| {
                    ApiError::bad_request("invalid_threshold", format!("`{name}` {t:?} is not a number"))
                }),
            }
        };
        let top_k = match self.top_k.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(t.parse::<u64>().map_err(|_| {
                ApiError::bad_request("invalid_top_k", format!("`top_k` {t:?} is not a positive integer"))
            })?),
        };
        Ok((
            number("score_threshold", &self.score_threshold)?,
            number("nms_threshold", &self.nms_threshold)?,
            top_k,
        ))
    }
}

/// The request's settings over OpenCV's defaults, checked.
fn options(score: Option<f64>, nms: Option<f64>, top_k: Option<u64>) -> Result<DetectOptions, ApiError> {
    let defaults = DetectOptions::default();
    let unit = |name: &str, v: Option<f64>, default: f32| match v {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::bad_request(
            "invalid_threshold",
            format!("`{name}` is {v}; it must be between 0 and 1"),
        )),
    };
    let top_k = match top_k {
        None => defaults.top_k,
        Some(k) if (1..=MAX_TOP_K).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(
                "invalid_top_k",
                format!("`top_k` is {k}; it must be from 1 to {MAX_TOP_K}"),
            ));
        }
    };
    Ok(DetectOptions {
        score_threshold: unit("score_threshold", score, defaults.score_threshold)?,
        nms_threshold: unit("nms_threshold", nms, defaults.nms_threshold)?,
        top_k,
    })
}

fn detection_json(d: &Detection) -> Value {
    let faces: Vec<Value> =
        d.faces.iter().map(|f| json!({"box": f.bbox, "landmarks": f.landmarks, "score": f.score})).collect();
    json!({"faces": faces, "image": {"width": d.width, "height": d.height}})
}

async fn detect(State(state): State<Shared<FaceDetection>>, req: Request) -> Response {
    // The images, whether one was sent, and the settings, with the lease and model they go to.
    let (id, lease, parsed) = if is_multipart(&req) {
        match Upload::<FaceDetection, DetectForm>::from_request(req, &state).await {
            Ok(Upload { id, lease, file, body, .. }) => {
                let parsed = body
                    .settings()
                    .and_then(|(s, n, k)| options(s, n, k))
                    .map(|o| (vec![("`file`".to_string(), Encoded::Raw(file))], true, o));
                (id, lease, parsed)
            }
            Err(e) => return e.into_response(),
        }
    } else {
        match Inference::<FaceDetection, DetectRequest>::from_request(req, &state).await {
            Ok(Inference { body, id, lease }) => {
                let parsed = options(body.score_threshold, body.nms_threshold, body.top_k).and_then(|o| {
                    images::from_json(body.image_base64, body.images_base64)
                        .map(|(images, one)| (images, one, o))
                });
                (id, lease, parsed)
            }
            Err(e) => return e.into_response(),
        }
    };
    counted(&state, &id, || async {
        let (images, one, options) = parsed?;
        let model = lease.model.clone();
        let decode = move |bytes: &[u8], limits: &ImageLimits| model.image(bytes, limits, options);
        let detections = images::queue_images(&state, &lease.batcher, &id, images, decode).await?;
        let body = match (one, detections.first()) {
            (true, Some(d)) => {
                let mut body = detection_json(d);
                body["model"] = json!(id.to_string());
                body
            }
            _ => json!({"detections": detections.iter().map(detection_json).collect::<Vec<_>>(), "model": id.to_string()}),
        };
        Ok(Json(body).into_response())
    })
    .await
}
