//! Shared by the integration tests: the real MiniLM weights (`make fixtures`) and the golden
//! reference vectors sentence-transformers computed for them (tests/data/golden-minilm-sample.json).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod faulty_http;
pub mod process;

use std::path::PathBuf;

/// What a GPU path's test runs on: the CPU always, and CUDA device 0 where one opens (the
/// output says "skipped: no CUDA device" and why where none does).
pub fn devices() -> Vec<kiln_model_server::device::ComputeDevice> {
    use kiln_model_server::device::{ComputeDevice, DeviceRequest};
    let mut devices = vec![ComputeDevice::cpu()];
    match ComputeDevice::open(DeviceRequest::Cuda(0)) {
        Ok(gpu) => devices.push(gpu),
        Err(e) => println!("skipped: no CUDA device ({e}); checked on the CPU only"),
    }
    devices
}

/// A scratch directory under the system temp dir, removed with everything in it when dropped
/// (a pull test leaves a 90 MB model copy behind otherwise).
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        self.0.path()
    }
}

pub fn scratch(name: &str) -> Scratch {
    Scratch(tempfile::Builder::new().prefix(&format!("kiln-{name}-")).tempdir().expect("scratch dir"))
}

pub fn minilm_dir() -> PathBuf {
    let dir = fixtures_root().join("minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

fn fixtures_root() -> PathBuf {
    std::env::var_os("KILN_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kiln/fixtures")
    })
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (`make fixtures`).
pub fn smollm2_dir() -> PathBuf {
    let dir = fixtures_root().join("smollm2");
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
        "SmolLM2 fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// The SmolLM2 weights as a Hugging Face checkpoint (scripts/gguf_to_hf.py, run by `make fixtures`).
pub fn smollm2_hf_dir() -> PathBuf {
    let dir = fixtures_root().join("smollm2-hf");
    assert!(
        dir.join("config.json").is_file(),
        "SmolLM2 checkpoint missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// One case of the numpy reference (scripts/gguf_reference.py, run by `make fixtures`).
pub struct ReferenceCase {
    pub name: String,
    pub case: serde_json::Value,
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Per step, the reference's best logit minus its second best.
    pub margins: Vec<f64>,
    /// Per step, the reference's five best (token, logit).
    pub top5: Vec<Vec<(u32, f64)>>,
}

pub fn generation_reference() -> Vec<ReferenceCase> {
    let path = fixtures_root().join("smollm2-reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference json");
    let cases_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/generation-cases.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).expect("cases")).expect("cases json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    };
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("name").to_string();
            let case = cases.iter().find(|k| k["name"] == c["name"]).cloned().unwrap_or_else(|| {
                panic!("reference case {name} is not in {}: run `make fixtures`", cases_path.display())
            });
            ReferenceCase {
                case,
                prompt_text: c["prompt_text"].as_str().expect("prompt_text").to_string(),
                prompt_ids: ids(&c["prompt_ids"]),
                generated_ids: ids(&c["generated_ids"]),
                margins: c["margins"]
                    .as_array()
                    .expect("margins")
                    .iter()
                    .map(|m| m.as_f64().expect("m"))
                    .collect(),
                top5: c["top5"]
                    .as_array()
                    .expect("top5")
                    .iter()
                    .map(|step| {
                        step.as_array()
                            .expect("step")
                            .iter()
                            .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logit")))
                            .collect()
                    })
                    .collect(),
                name,
            }
        })
        .collect()
}

pub struct Golden {
    pub text: String,
    pub n_tokens: usize,
    pub n_tokens_untruncated: usize,
    pub embedding: Vec<f32>,
}

pub fn golden() -> Vec<Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-minilm-sample.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden json");
    json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| Golden {
            text: i["text"].as_str().expect("text").to_string(),
            n_tokens: i["n_tokens"].as_u64().expect("n_tokens") as usize,
            n_tokens_untruncated: i["n_tokens_untruncated"].as_u64().expect("n_tokens_untruncated") as usize,
            embedding: i["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("f") as f32)
                .collect(),
        })
        .collect()
}

use std::time::Duration;

use kiln_model_server::manifest::{Batching, Family, Warmup};
use kiln_model_server::serve::{ServeOptions, ServePlan};
use kiln_model_server::state::Limits;

/// A server running in this process on 127.0.0.1; dropped → shut down.
pub struct TestServer {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(plan: ServePlan, limits: Limits) -> Self {
        Self::with_options(plan, ServeOptions { limits, ..ServeOptions::default() }).await
    }

    pub async fn with_options(plan: ServePlan, options: ServeOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kiln_model_server::families::serve(plan, listener, options, async move {
            let _ = rx.await;
        }));
        TestServer { base, stop: Some(stop), task: Some(task) }
    }

    pub async fn minilm(warmup_iterations: u32, batching: Batching) -> Self {
        let plan = ServePlan::from_args(
            Family::TextEmbedding,
            &[format!("minilm:v2={}", minilm_dir().display())],
            Warmup { iterations: warmup_iterations, ..Warmup::default() },
            batching,
        )
        .expect("plan");
        Self::start(plan, Limits { max_body_bytes: 64 << 10, max_inputs: 16, ..Limits::default() }).await
    }

    pub async fn smollm2(batching: Batching) -> Self {
        Self::smollm2_with(batching, None).await
    }

    /// SmolLM2 with a KV-cache budget (None: derived from the memory left).
    pub async fn smollm2_with(batching: Batching, kv_cache_bytes: Option<u64>) -> Self {
        let mut plan = ServePlan::from_args(
            Family::TextGeneration,
            &[format!("smollm2:135m={}", smollm2_dir().display())],
            Warmup { iterations: 1, inputs: vec!["Say hello.".into()], ..Warmup::default() },
            batching,
        )
        .expect("plan");
        for m in &mut plan.models {
            m.kv_cache_bytes = kv_cache_bytes;
        }
        Self::start(plan, Limits { max_body_bytes: 256 << 10, max_inputs: 16, ..Limits::default() }).await
    }

    /// Whisper tiny.en as `whisper:tiny-en`, audio limited to `max_audio_seconds`.
    pub async fn whisper(max_audio_seconds: f64) -> Self {
        let plan = ServePlan::from_args(
            Family::SpeechToText,
            &[format!("whisper:tiny-en={}", whisper_tiny_en_dir().display())],
            Warmup { iterations: 1, ..Warmup::default() },
            Batching::default(),
        )
        .expect("plan");
        Self::start(plan, Limits { max_audio_seconds, max_upload_bytes: 4 << 20, ..Limits::default() }).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn wait_ready(&self) -> serde_json::Value {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return r.json().await.expect("readyz json");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {} never became ready", self.base);
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("server exits cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Whisper tiny.en in CTranslate2's layout (`make fixtures`).
pub fn whisper_tiny_en_dir() -> PathBuf {
    let dir = fixtures_root().join("whisper-tiny-en");
    assert!(
        dir.join("model.bin").is_file(),
        "Whisper fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// One clip of the faster-whisper reference (scripts/whisper_reference.py, run by `make fixtures`).
pub struct SpeechCase {
    pub name: String,
    pub spoken: String,
    /// 16 kHz mono samples, as faster-whisper decoded them (16-bit PCM / 32768).
    pub samples: Vec<f32>,
    pub prompt: Vec<u32>,
    /// faster-whisper's greedy tokens for the first window, and its no-speech probability.
    pub tokens: Vec<u32>,
    pub no_speech_prob: f32,
    pub transcript: String,
    pub language: String,
    pub language_probability: f32,
    /// faster-whisper's segments of the whole clip: (start, end, text).
    pub segments: Vec<(f64, f64, String)>,
    /// The clip in other encodings (file in the reference directory, faster-whisper's text).
    pub encodings: Vec<(PathBuf, String)>,
}

/// The same tiny.en weights as a Hugging Face checkpoint (scripts/whisper_to_hf.py).
pub fn whisper_tiny_en_hf_dir() -> PathBuf {
    let dir = fixtures_root().join("whisper-tiny-en-hf");
    assert!(
        dir.join("model.safetensors").is_file(),
        "Whisper fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// Whisper base (multilingual) in CTranslate2's layout (`make fixtures`).
pub fn whisper_base_dir() -> PathBuf {
    let dir = fixtures_root().join("whisper-base");
    assert!(
        dir.join("model.bin").is_file(),
        "Whisper fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// tiny.en's reference.
pub fn speech_reference() -> Vec<SpeechCase> {
    speech_reference_of("whisper-reference")
}

/// tiny.en's reference directory (the clips as files).
pub fn speech_reference_dir() -> PathBuf {
    fixtures_root().join("whisper-reference")
}

pub fn speech_reference_of(link: &str) -> Vec<SpeechCase> {
    let dir = fixtures_root().join(link);
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|t| t.as_u64().expect("id") as u32).collect()
    };
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| SpeechCase {
            name: c["name"].as_str().expect("name").to_string(),
            spoken: c["spoken"].as_str().expect("spoken").to_string(),
            samples: read_wav_16k_pcm16(&dir.join(c["wav"].as_str().expect("wav"))),
            prompt: ids(&c["prompt"]),
            tokens: ids(&c["tokens"]),
            no_speech_prob: c["no_speech_prob"].as_f64().expect("no_speech_prob") as f32,
            transcript: c["transcript"].as_str().expect("transcript").to_string(),
            language: c["language"].as_str().expect("language").to_string(),
            language_probability: c["language_probability"].as_f64().expect("language_probability") as f32,
            segments: c["segments"]
                .as_array()
                .expect("segments")
                .iter()
                .map(|s| {
                    let t = |k: &str| s[k].as_f64().expect("time");
                    (t("start"), t("end"), s["text"].as_str().expect("text").to_string())
                })
                .collect(),
            encodings: c["encodings"]
                .as_object()
                .map(|m| {
                    m.iter().map(|(k, v)| (dir.join(k), v.as_str().expect("text").to_string())).collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// The Python with faster-whisper and the OpenAI SDK (`make fixtures`).
pub fn reference_python() -> PathBuf {
    let python = fixtures_root().join("whisper-reference-venv/bin/python");
    assert!(python.exists(), "{} missing: run `make fixtures`", python.display());
    python
}

/// The reference's clips: canonical 44-byte-header WAV, 16 kHz mono 16-bit PCM.
fn read_wav_16k_pcm16(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(&bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE", "{} is not a WAV file", path.display());
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    assert_eq!((u16_at(20), u16_at(22), u32_at(24), u16_at(34)), (1, 1, 16_000, 16), "{}", path.display());
    assert_eq!(&bytes[36..40], b"data", "{}", path.display());
    let len = u32_at(40) as usize;
    bytes[44..44 + len]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

/// Word error rate of `got` against `want` (lower-cased words, punctuation dropped).
pub fn word_error_rate(got: &str, want: &str) -> f64 {
    let words = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .map(|w| {
                w.chars().filter(|c| c.is_alphanumeric() || *c == '\'').collect::<String>().to_lowercase()
            })
            .filter(|w| !w.is_empty())
            .collect()
    };
    let (g, w) = (words(got), words(want));
    let mut prev: Vec<usize> = (0..=g.len()).collect();
    for (i, wi) in w.iter().enumerate() {
        let mut cur = vec![i + 1; g.len() + 1];
        for (j, gj) in g.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(wi != gj)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[g.len()] as f64 / w.len().max(1) as f64
}

/// A multipart/form-data body: text fields, then the file part.
pub fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "kiln-test-boundary-7d1c";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    if let Some((file_name, bytes)) = file {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// POST a multipart form (text `fields`, and `file` as `file_name` if given) to `url`; the
/// status and the JSON answer (null if it is not JSON).
pub async fn post_multipart(
    url: &str,
    fields: &[(&str, &str)],
    file: Option<(&str, &[u8])>,
) -> (u16, serde_json::Value) {
    let (content_type, body) = multipart(fields, file);
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// YuNet's ONNX file in a model directory of its own (`make fixtures`).
pub fn yunet_dir() -> PathBuf {
    let dir = fixtures_root().join("yunet");
    assert!(
        dir.join("face_detection_yunet_2023mar.onnx").is_file(),
        "YuNet fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

/// One image of the OpenCV reference (scripts/yunet_reference.py, run by `make fixtures`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FaceCase {
    pub name: String,
    pub file: String,
    pub width: u32,
    pub height: u32,
    pub faces: Vec<ReferenceFace>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReferenceFace {
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub landmarks: [[f32; 2]; 5],
    pub score: f32,
}

/// The images OpenCV's FaceDetectorYN ran on, and what it found.
pub fn face_reference() -> (PathBuf, Vec<FaceCase>) {
    let dir = fixtures_root().join("yunet-reference");
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference json");
    (dir, serde_json::from_value(json["images"].clone()).expect("reference images"))
}

/// Intersection over union of `[x, y, w, h]` boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let (x0, y0) = (a[0].max(b[0]), a[1].max(b[1]));
    let (x1, y1) = ((a[0] + a[2]).min(b[0] + b[2]), (a[1] + a[3]).min(b[1] + b[3]));
    let inter = (x1 - x0).max(0.0) * (y1 - y0).max(0.0);
    inter / (a[2] * a[3] + b[2] * b[3] - inter)
}

/// A face as (box, landmarks, score).
pub type FoundFace = ([f32; 4], [[f32; 2]; 5], f32);

/// Every reference face matched by one found face with IoU at least 0.95, score within 0.01
/// and each landmark within 2 pixels, and nothing else found. `found` is (box, landmarks,
/// score).
pub fn assert_faces_match(case: &str, found: &[FoundFace], want: &[ReferenceFace]) {
    assert_eq!(found.len(), want.len(), "{case}: found {found:?}, OpenCV found {want:?}");
    for w in want {
        let best =
            found.iter().max_by(|a, b| iou(&a.0, &w.bbox).total_cmp(&iou(&b.0, &w.bbox))).expect("a face");
        let overlap = iou(&best.0, &w.bbox);
        assert!(
            overlap >= 0.95,
            "{case}: OpenCV's face {:?} best matched {:?} (IoU {overlap})",
            w.bbox,
            best.0
        );
        assert!((best.2 - w.score).abs() <= 0.01, "{case}: score {} vs OpenCV's {}", best.2, w.score);
        for (g, r) in best.1.iter().zip(&w.landmarks) {
            let d = ((g[0] - r[0]).powi(2) + (g[1] - r[1]).powi(2)).sqrt();
            assert!(d <= 2.0, "{case}: landmark {g:?} vs OpenCV's {r:?} ({d} px apart)");
        }
    }
}
