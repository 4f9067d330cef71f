//! `POST /v1/audio/transcriptions` and `/v1/audio/translations` (OpenAI, multipart) and
//! `POST /asr/transcribe` (the product's JSON with base64 audio).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::SpeechToText;
use super::audio::{self, AudioError};
use crate::api::{ApiError, Inference, RequestBody, Upload, counted, tokenize, worker_answer};
use crate::families::Shared;
use crate::loader::Lease;
use crate::manifest::ModelRef;
use crate::models::whisper::Task;
use crate::models::whisper::transcribe::{FALLBACK_TEMPERATURES, Options, Transcript};

pub fn routes() -> Router<Shared<SpeechToText>> {
    Router::new()
        .route("/v1/audio/transcriptions", post(transcriptions))
        .route("/v1/audio/translations", post(translations))
        .route("/asr/transcribe", post(asr_transcribe))
}

/// OpenAI's form fields besides `file` and `model`, as strings (a form has no numbers).
#[derive(Deserialize)]
struct AudioForm {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    temperature: Option<String>,
    #[serde(default)]
    timestamp_granularities: Option<Vec<String>>,
}

impl RequestBody for AudioForm {
    fn field_error(field: &str, _missing: bool, _detail: &str) -> ApiError {
        ApiError::bad_request("invalid_field", format!("form field `{field}` must be text"))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
    Srt,
    Vtt,
    VerboseJson,
}

impl AudioForm {
    fn format(&self) -> Result<Format, ApiError> {
        Ok(match self.response_format.as_deref().unwrap_or("json") {
            "json" => Format::Json,
            "text" => Format::Text,
            "srt" => Format::Srt,
            "vtt" => Format::Vtt,
            "verbose_json" => Format::VerboseJson,
            other => {
                return Err(ApiError::bad_request(
                    "invalid_response_format",
                    format!("response_format {other:?}: use json, text, srt, vtt or verbose_json"),
                ));
            }
        })
    }

    /// Only greedy decoding (temperature 0) and segment timestamps are served.
    /// The temperatures to decode at: as OpenAI documents it, 0 (the default) starts greedy and
    /// falls back to higher temperatures where a window's text looks wrong; a higher value
    /// starts there.
    fn temperatures(&self) -> Result<Vec<f32>, ApiError> {
        let Some(t) = self.temperature.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(FALLBACK_TEMPERATURES.to_vec());
        };
        let value: f32 = t.parse().map_err(|_| {
            ApiError::bad_request("invalid_temperature", format!("temperature {t:?} is not a number"))
        })?;
        if !(0.0..=1.0).contains(&value) {
            return Err(ApiError::bad_request("invalid_temperature", "temperature must be between 0 and 1"));
        }
        Ok(Options::schedule_from(value))
    }

    fn check_granularities(&self) -> Result<(), ApiError> {
        for g in self.timestamp_granularities.iter().flatten() {
            if g != "segment" {
                return Err(ApiError::bad_request(
                    "timestamp_granularity_not_supported",
                    format!(
                        "timestamp granularity {g:?}: this server gives segment timestamps; ask for \"segment\""
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The product's `{"audio_base64": "...", "language": "en"}`.
#[derive(Deserialize)]
struct AsrRequest {
    audio_base64: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
}

impl RequestBody for AsrRequest {
    const CARRIES_FILE: bool = true;

    fn field_error(field: &str, missing: bool, _detail: &str) -> ApiError {
        match (field, missing) {
            ("audio_base64", true) => ApiError::bad_request("missing_audio", "`audio_base64` is required"),
            (other, _) => ApiError::unprocessable("invalid_body", format!("`{other}` must be a string")),
        }
    }
}

fn audio_error(e: AudioError) -> ApiError {
    let message = e.to_string();
    match e {
        AudioError::Empty | AudioError::Silent => ApiError::bad_request("empty_audio", message),
        AudioError::Unsupported(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_audio",
            message,
        ),
        AudioError::Corrupt(_) => ApiError::bad_request("invalid_audio", message),
        AudioError::TooLong { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "audio_too_long", message)
        }
    }
}

/// Check the options against the model, take a queue place, decode the audio off the async
/// workers, queue it and wait for the transcript.
async fn run(
    state: &Shared<SpeechToText>,
    serving: &Lease<SpeechToText>,
    id: &ModelRef,
    bytes: bytes::Bytes,
    extension: String,
    options: Options,
) -> Result<Transcript, ApiError> {
    serving
        .model
        .check_options(&options)
        .map_err(|e| ApiError::bad_request("unsupported_option", e.to_string()))?;
    let worker = serving.worker.clone();
    let place = worker.reserve().map_err(ApiError::from)?;
    let max_seconds = state.limits.max_audio_seconds;
    // Decoding, resampling and the log-mel features run here, beside the request, so the
    // model's worker spends its time on the network only.
    let model = serving.model.clone();
    let clip = tokenize(state, move || {
        audio::decode(&bytes, &extension, max_seconds).map(|d| model.audio_features(&d.samples))
    })
    .await?
    .map_err(audio_error)?;
    let rx = place.submit(clip, options).map_err(ApiError::from)?;
    worker_answer(rx, worker.queue(), id).await
}

fn extension(file_name: &str) -> String {
    file_name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).unwrap_or_default()
}

async fn transcriptions(
    State(state): State<Shared<SpeechToText>>,
    request: Result<Upload<SpeechToText, AudioForm>, ApiError>,
) -> Response {
    openai(state, request, Task::Transcribe).await
}

async fn translations(
    State(state): State<Shared<SpeechToText>>,
    request: Result<Upload<SpeechToText, AudioForm>, ApiError>,
) -> Response {
    openai(state, request, Task::Translate).await
}

async fn openai(
    state: Shared<SpeechToText>,
    request: Result<Upload<SpeechToText, AudioForm>, ApiError>,
    task: Task,
) -> Response {
    let Upload { body: form, id, file, file_name, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let format = form.format()?;
        let temperatures = form.temperatures()?;
        form.check_granularities()?;
        // OpenAI's translations endpoint takes no language: the source is detected.
        let language =
            if task == Task::Translate { None } else { form.language.clone().filter(|l| !l.is_empty()) };
        let options = Options { language, task, prompt: form.prompt.clone(), temperatures };
        let transcript = run(&state, &lease, &id, file, extension(&file_name), options).await?;
        Ok(render(&transcript, format, task))
    })
    .await
}

async fn asr_transcribe(
    State(state): State<Shared<SpeechToText>>,
    request: Result<Inference<SpeechToText, AsrRequest>, ApiError>,
) -> Response {
    let Inference { body: req, id, lease } = match request {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    counted(&state, &id, || async {
        let task = match req.task.as_deref() {
            None | Some("transcribe") => Task::Transcribe,
            Some("translate") => Task::Translate,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_task",
                    format!("task {other:?}: use \"transcribe\" or \"translate\""),
                ));
            }
        };
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(req.audio_base64.trim()).map_err(|e| {
                ApiError::bad_request("invalid_base64", format!("`audio_base64` is not base64: {e}"))
            })?;
        if bytes.len() > state.limits.max_upload_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "file_too_large",
                format!(
                    "the audio is larger than this server's limit of {} bytes",
                    state.limits.max_upload_bytes
                ),
            ));
        }
        let language = req.language.filter(|l| !l.is_empty());
        let options = Options { language, task, prompt: req.prompt, ..Options::transcribe() };
        let transcript = run(&state, &lease, &id, bytes.into(), String::new(), options).await?;
        let segments: Vec<Value> = transcript
            .segments
            .iter()
            .map(|s| json!({"start": round(s.start), "end": round(s.end), "text": s.text.trim()}))
            .collect();
        Ok(Json(json!({
            "text": transcript.text(),
            "language": transcript.language,
            "language_probability": transcript.language_probability,
            "duration": round(transcript.duration),
            "segments": segments,
            "model": id.to_string(),
        }))
        .into_response())
    })
    .await
}

/// Seconds to the millisecond, as the responses show them.
fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn render(t: &Transcript, format: Format, task: Task) -> Response {
    let text = t.text();
    match format {
        Format::Json => Json(json!({"text": text})).into_response(),
        Format::Text => plain("text/plain; charset=utf-8", format!("{text}\n")),
        Format::Srt => plain("application/x-subrip; charset=utf-8", subtitles(t, false)),
        Format::Vtt => plain("text/vtt; charset=utf-8", subtitles(t, true)),
        Format::VerboseJson => {
            let segments: Vec<Value> = t
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "id": i,
                        "seek": s.seek,
                        "start": round(s.start),
                        "end": round(s.end),
                        "text": s.text,
                        "tokens": s.tokens,
                        "temperature": s.temperature,
                        "avg_logprob": s.avg_logprob,
                        "compression_ratio": s.compression_ratio,
                        "no_speech_prob": s.no_speech_prob,
                    })
                })
                .collect();
            let task = if task == Task::Translate { "translate" } else { "transcribe" };
            Json(json!({
                "task": task,
                "language": t.language,
                "duration": round(t.duration),
                "text": text,
                "segments": segments,
            }))
            .into_response()
        }
    }
}

fn plain(content_type: &'static str, body: String) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// SubRip (`00:00:01,500`) or WebVTT (`00:00:01.500`) cues, one per segment.
fn subtitles(t: &Transcript, vtt: bool) -> String {
    let stamp = |s: f64| {
        let ms = (s * 1000.0).round().max(0.0) as u64;
        let sep = if vtt { '.' } else { ',' };
        format!("{:02}:{:02}:{:02}{sep}{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
    };
    let mut out = if vtt { String::from("WEBVTT\n\n") } else { String::new() };
    for (i, s) in t.segments.iter().enumerate() {
        if !vtt {
            out.push_str(&format!("{}\n", i + 1));
        }
        out.push_str(&format!("{} --> {}\n{}\n\n", stamp(s.start), stamp(s.end), s.text.trim()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::whisper::transcribe::Segment;

    fn transcript() -> Transcript {
        let seg = |start, end, text: &str| Segment {
            start,
            end,
            text: text.to_string(),
            tokens: vec![],
            avg_logprob: -0.2,
            no_speech_prob: 0.01,
            temperature: 0.0,
            compression_ratio: 1.2,
            seek: 0,
        };
        Transcript {
            language: "en".into(),
            language_probability: 1.0,
            duration: 3725.5,
            segments: vec![seg(0.0, 1.5, " Hello there."), seg(3723.25, 3725.0, " Goodbye.")],
        }
    }

    #[test]
    fn subtitles_number_their_cues_and_write_hours_minutes_seconds_milliseconds() {
        let srt = subtitles(&transcript(), false);
        assert_eq!(
            srt,
            "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,000\nGoodbye.\n\n"
        );
        let vtt = subtitles(&transcript(), true);
        assert!(
            vtt.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:02:03.250"),
            "{vtt}"
        );
    }
}
