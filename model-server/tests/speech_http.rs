//! The speech-to-text family over real HTTP on 127.0.0.1: OpenAI's audio API through the real
//! OpenAI Python SDK, the product's `/asr/transcribe`, every response format, every upload
//! encoding, and each class of bad input with its status and code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{SpeechCase, TestServer};
use serde_json::{Value, json};

fn case(name: &str) -> SpeechCase {
    common::speech_reference().into_iter().find(|c| c.name == name).expect("reference clip")
}

fn wav_path(name: &str) -> std::path::PathBuf {
    std::fs::canonicalize(common::speech_reference_dir().join(format!("{name}.wav"))).expect("clip")
}

async fn post_form(
    server: &TestServer,
    path: &str,
    fields: &[(&str, &str)],
    file: Option<(&str, &[u8])>,
) -> (u16, String) {
    let (content_type, body) = common::multipart(fields, file);
    let r = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_transcribes_unchanged() {
    let server = TestServer::whisper(600.0).await;
    server.wait_ready().await;
    let clip = case("kiln");
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
with open(sys.argv[2], "rb") as f:
    text = client.audio.transcriptions.create(model="whisper", file=f)
with open(sys.argv[2], "rb") as f:
    verbose = client.audio.transcriptions.create(
        model="whisper:tiny-en", file=f, response_format="verbose_json", timestamp_granularities=["segment"])
with open(sys.argv[2], "rb") as f:
    srt = client.audio.transcriptions.create(model="whisper", file=f, response_format="srt")
try:
    with open(sys.argv[2], "rb") as f:
        client.audio.translations.create(model="whisper", file=f)
    refused = None
except Exception as e:
    refused = [type(e).__name__, getattr(e, "status_code", None)]
print(json.dumps({"text": text.text, "segments": [[s.start, s.end, s.text] for s in verbose.segments],
                  "language": verbose.language, "duration": verbose.duration, "srt": srt, "refused": refused}))
"#;
    let python = common::reference_python();
    let (base, wav) = (server.base.clone(), wav_path("kiln"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(base)
            .arg(wav)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "the SDK failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["text"], clip.transcript.as_str(), "the transcript is faster-whisper's");
    let segments = got["segments"].as_array().expect("segments");
    assert_eq!(segments.len(), clip.segments.len());
    for (g, w) in segments.iter().zip(&clip.segments) {
        assert_eq!(g[2], w.2.as_str());
        assert!((g[0].as_f64().unwrap() - w.0).abs() < 1e-3 && (g[1].as_f64().unwrap() - w.1).abs() < 1e-3);
    }
    assert_eq!(got["language"], "en");
    assert!((got["duration"].as_f64().unwrap() - clip.samples.len() as f64 / 16_000.0).abs() < 1e-3);
    let srt = got["srt"].as_str().expect("srt");
    assert!(
        srt.starts_with("1\n00:00:00,000 --> 00:00:0") && srt.contains(clip.segments[0].2.trim()),
        "{srt}"
    );
    // tiny.en cannot translate: the SDK raises the 400.
    assert_eq!(got["refused"], json!(["BadRequestError", 400]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upload_encoding_and_the_product_endpoint_transcribe() {
    let server = TestServer::whisper(600.0).await;
    server.wait_ready().await;
    let clip = case("kiln");
    assert!(clip.encodings.len() >= 5, "{:?}", clip.encodings);
    for (path, reference) in &clip.encodings {
        let bytes = std::fs::read(path).expect("read");
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (status, body) = post_form(
            &server,
            "/v1/audio/transcriptions",
            &[("model", "whisper"), ("response_format", "text")],
            Some((&name, &bytes)),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        let w = common::word_error_rate(&body, reference);
        eprintln!("{name}: {:?} (faster-whisper {reference:?}, WER {w:.3})", body.trim());
        assert!(w <= 0.1, "{name}: {body:?} against faster-whisper's {reference:?}");
    }
    // The same 16 kHz WAV through the product's JSON endpoint gives faster-whisper's text.
    use base64::Engine as _;
    let audio =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(wav_path("kiln")).expect("read"));
    let r = reqwest::Client::new()
        .post(server.url("/asr/transcribe"))
        .json(&json!({"audio_base64": audio, "language": "en"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["text"], clip.transcript.as_str());
    assert_eq!((v["language"].as_str(), v["model"].as_str()), (Some("en"), Some("whisper:tiny-en")));
    assert_eq!(v["segments"].as_array().map(Vec::len), Some(clip.segments.len()));
    assert!(v["segments"][0]["start"].is_number() && v["segments"][0]["text"].is_string());
    // vtt and plain json.
    let wav = std::fs::read(wav_path("kiln")).expect("read");
    let (status, vtt) =
        post_form(&server, "/v1/audio/transcriptions", &[("response_format", "vtt")], Some(("a.wav", &wav)))
            .await;
    assert!(status == 200 && vtt.starts_with("WEBVTT\n\n00:00:00.000 --> "), "{vtt}");
    let (status, plain) = post_form(&server, "/v1/audio/transcriptions", &[], Some(("a.wav", &wav))).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&plain).expect("json")["text"], clip.transcript.as_str());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_and_options_are_refused_with_status_and_code() {
    // 20 s of audio at most: the long clip is over it.
    let server = TestServer::whisper(20.0).await;
    server.wait_ready().await;
    let wav = std::fs::read(wav_path("fox")).expect("read");
    let long = std::fs::read(wav_path("long")).expect("read");
    let t = "/v1/audio/transcriptions";
    // (what, form fields, file part, status, error code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<(&'a str, &'a [u8])>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no file", vec![("model", "whisper")], None, 400, "missing_file"),
        ("empty file", vec![], Some(("a.wav", &b""[..])), 400, "empty_audio"),
        (
            "not audio",
            vec![],
            Some(("a.txt", &b"hello, this is text and not audio at all"[..])),
            415,
            "unsupported_audio",
        ),
        ("truncated wav", vec![], Some(("a.wav", &wav[..30])), 400, "invalid_audio"),
        ("too long", vec![], Some(("long.wav", &long)), 413, "audio_too_long"),
        ("other language", vec![("language", "de")], Some(("a.wav", &wav)), 400, "unsupported_option"),
        ("too hot", vec![("temperature", "1.5")], Some(("a.wav", &wav)), 400, "invalid_temperature"),
        (
            "words",
            vec![("timestamp_granularities[]", "word")],
            Some(("a.wav", &wav)),
            400,
            "timestamp_granularity_not_supported",
        ),
        ("format", vec![("response_format", "xml")], Some(("a.wav", &wav)), 400, "invalid_response_format"),
        ("model", vec![("model", "nope")], Some(("a.wav", &wav)), 404, "model_not_found"),
    ];
    for (what, fields, file, status, want) in cases {
        let (got, body) = post_form(&server, t, &fields, file).await;
        assert_eq!((got, code(&body).as_str()), (status, want), "{what}: {body}");
    }
    let (got, body) = post_form(&server, "/v1/audio/translations", &[], Some(("a.wav", &wav))).await;
    assert_eq!((got, code(&body).as_str()), (400, "unsupported_option"), "{body}");
    assert!(body.contains("English-only"), "{body}");
    // JSON where a form is expected, and a form where JSON is.
    let r =
        reqwest::Client::new().post(server.url(t)).json(&json!({"file": "x"})).send().await.expect("send");
    assert_eq!(r.status(), 415);
    let (got, body) = post_form(&server, "/asr/transcribe", &[], Some(("a.wav", &wav))).await;
    assert_eq!((got, code(&body).as_str()), (415, "unsupported_media_type"));
    let r = reqwest::Client::new()
        .post(server.url("/asr/transcribe"))
        .json(&json!({"audio_base64": "%%%not base64%%%"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    assert_eq!(code(&r.text().await.expect("body")), "invalid_base64");
    // Nothing refused is lost: the server still answers a good request.
    let (got, body) = post_form(&server, t, &[("response_format", "text")], Some(("a.wav", &wav))).await;
    assert_eq!(got, 200, "{body}");
    assert_eq!(body.trim(), case("fox").transcript);
    // A temperature starts the fallback schedule there: the windows are sampled, and say so.
    let fields = [("response_format", "verbose_json"), ("temperature", "0.6")];
    let (got, body) = post_form(&server, t, &fields, Some(("a.wav", &wav))).await;
    assert_eq!(got, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let segments = v["segments"].as_array().expect("segments");
    assert!(!segments.is_empty(), "{body}");
    for s in segments {
        let temp = s["temperature"].as_f64().expect("temperature");
        assert!((0.6 - 1e-6..=1.0 + 1e-6).contains(&temp), "{s}");
        assert!(s["compression_ratio"].as_f64().is_some_and(|c| c > 0.0), "{s}");
    }
    server.shutdown().await;
}
