//! [`Upload`]: the extractor of endpoints that take a file (OpenAI's audio API): a
//! `multipart/form-data` body with one `file` part and text fields, checked as [`super::Inference`]
//! checks JSON: size and time limits, a `model` this pod serves and ready, the other fields
//! typed as `T` (field names as OpenAI's SDKs send them; `name[]` parts become arrays).

use std::time::Instant;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde_json::Value;

use super::{ApiError, RequestBody, read_body, ready, record, resolve, typed};
use crate::families::{ModelFamily, Shared};
use crate::loader::Lease;
use crate::manifest::ModelRef;

/// Text fields may hold a prompt; more than this is not a form a client means to send.
const MAX_FIELD_BYTES: usize = 64 << 10;
const MAX_FIELDS: usize = 64;

pub struct Upload<F: ModelFamily, T> {
    pub body: T,
    pub id: ModelRef,
    pub file: Bytes,
    /// The part's file name (its extension is a format hint), possibly empty.
    pub file_name: String,
    /// The loaded model, held until the request is answered.
    pub lease: Lease<F>,
}

fn unsupported(given: &str) -> ApiError {
    let shown =
        if given.is_empty() { "no Content-Type".to_string() } else { format!("Content-Type {given:?}") };
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "unsupported_media_type",
        format!("{shown}: this endpoint takes multipart/form-data with the file in a `file` part"),
    )
}

fn bad_form(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_form", message)
}

impl<F: ModelFamily, T: RequestBody> axum::extract::FromRequest<Shared<F>> for Upload<F, T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &Shared<F>) -> Result<Self, ApiError> {
        let given =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let essence = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "multipart/form-data" {
            return Err(unsupported(&given));
        }
        let boundary = multer::parse_boundary(&given)
            .map_err(|_| bad_form("multipart/form-data without a boundary parameter"))?;
        let limits = &state.limits;
        // The file plus its headers and the other fields.
        let limit = limits.max_upload_bytes.saturating_add(MAX_FIELDS * MAX_FIELD_BYTES);
        let bytes = read_body(req.into_body(), limit, limits.body_read_timeout).await?;
        let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
        let constraints = multer::Constraints::new().size_limit(
            multer::SizeLimit::new().whole_stream(limit as u64).per_field(limits.max_upload_bytes as u64),
        );
        let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
        let mut fields = serde_json::Map::new();
        let mut file: Option<(Bytes, String)> = None;
        let mut count = 0;
        while let Some(field) =
            form.next_field().await.map_err(|e| bad_form(format!("malformed multipart body: {e}")))?
        {
            count += 1;
            if count > MAX_FIELDS {
                return Err(bad_form(format!("more than {MAX_FIELDS} form fields")));
            }
            let name = field.name().unwrap_or("").to_string();
            if name == "file" {
                let file_name = field.file_name().unwrap_or("").to_string();
                let data = field.bytes().await.map_err(|e| match e {
                    multer::Error::FieldSizeExceeded { .. } | multer::Error::StreamSizeExceeded { .. } => {
                        ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "invalid_request_error",
                            "file_too_large",
                            format!(
                                "the file is larger than this server's limit of {} bytes",
                                limits.max_upload_bytes
                            ),
                        )
                    }
                    other => bad_form(format!("cannot read the file part: {other}")),
                })?;
                file = Some((data, file_name));
                continue;
            }
            let text =
                field.text().await.map_err(|e| bad_form(format!("cannot read field `{name}`: {e}")))?;
            if text.len() > MAX_FIELD_BYTES {
                return Err(bad_form(format!("field `{name}` is longer than {MAX_FIELD_BYTES} bytes")));
            }
            match name.strip_suffix("[]") {
                Some(array) => {
                    let entry = fields.entry(array.to_string()).or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(items) = entry {
                        items.push(Value::String(text));
                    }
                }
                None => {
                    fields.insert(name, Value::String(text));
                }
            }
        }
        let id = resolve(state, fields.get("model"))?;
        let lease = ready(state, &id).await.inspect_err(|e| record(state, &id, e.status, Instant::now()))?;
        let Some((file, file_name)) = file else {
            let e =
                ApiError::bad_request("missing_file", "the form has no `file` part; send the file as `file`");
            record(state, &id, e.status, Instant::now());
            return Err(e);
        };
        let body = typed::<T>(Value::Object(fields))
            .inspect_err(|e| record(state, &id, e.status, Instant::now()))?;
        Ok(Upload { body, id, file, file_name, lease })
    }
}
