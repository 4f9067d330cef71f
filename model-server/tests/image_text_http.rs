//! The image-text-embedding family over real HTTP on 127.0.0.1: SigLIP and CLIP served from one
//! pod, `/embed/vision` (JSON base64, a list, a multipart file), `/embed/text` (one or a list)
//! and `/v1/embeddings` through the real OpenAI Python SDK, every answer within cosine 0.9999
//! of transformers' features; and each class of bad input with its status and code.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use base64::Engine as _;
use common::TestServer;
use kiln_model_server::families::text_embedding::cosine;
use kiln_model_server::manifest::{Batching, Family, Warmup};
use kiln_model_server::serve::ServePlan;
use kiln_model_server::state::Limits;
use serde_json::{Value, json};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn reference(name: &str) -> Value {
    let path = data().join("tiny").join(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json")
}

fn image_bytes(file: &str) -> Vec<u8> {
    std::fs::read(data().join("images").join(file)).expect("image")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).expect("vector")
}

async fn server() -> TestServer {
    let tiny = data().join("tiny");
    let plan = ServePlan::from_args(
        Family::ImageTextEmbedding,
        &[
            format!("siglip:tiny={}", tiny.join("siglip").display()),
            format!("clip:tiny={}", tiny.join("clip").display()),
        ],
        Warmup { iterations: 1, ..Warmup::default() },
        Batching::default(),
    )
    .expect("plan");
    let server =
        TestServer::start(plan, Limits { max_upload_bytes: 1 << 20, max_inputs: 16, ..Limits::default() })
            .await;
    server.wait_ready().await;
    server
}

async fn post_json(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(server.url(path)).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post_file(server: &TestServer, model: Option<&str>, file: Option<&[u8]>) -> (u16, Value) {
    let fields: Vec<(&str, &str)> = model.map(|m| ("model", m)).into_iter().collect();
    common::post_multipart(&server.url("/embed/vision"), &fields, file.map(|b| ("frame.png", b))).await
}

fn close(got: &Value, want: &Value, what: &str) {
    let c = cosine(&vector(got), &vector(want));
    assert!(c >= 0.9999, "{what}: cosine {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_towers_answer_through_every_endpoint_as_transformers_computes() {
    let server = server().await;
    for name in ["siglip", "clip"] {
        let r = reference(name);
        let files: Vec<String> = serde_json::from_value(r["images"].clone()).expect("files");
        let dimension = r["image_embeds"][0].as_array().expect("vector").len();
        // One image as base64 JSON.
        let (status, body) = post_json(
            &server,
            "/embed/vision",
            &json!({"model": name, "image_base64": b64(&image_bytes(&files[0]))}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dimension"], dimension);
        assert_eq!(body["model"], format!("{name}:tiny"));
        close(&body["embedding"], &r["image_embeds"][0], &format!("{name} image_base64"));
        // A list, in order.
        let list: Vec<String> = files.iter().map(|f| b64(&image_bytes(f))).collect();
        let (status, body) =
            post_json(&server, "/embed/vision", &json!({"model": name, "images_base64": list})).await;
        assert_eq!(status, 200, "{body}");
        let embeddings = body["embeddings"].as_array().expect("embeddings");
        assert_eq!(embeddings.len(), files.len());
        for (i, got) in embeddings.iter().enumerate() {
            close(got, &r["image_embeds"][i], &format!("{name} images_base64[{i}]"));
        }
        // A multipart file.
        let (status, body) = post_file(&server, Some(name), Some(&image_bytes(&files[1]))).await;
        assert_eq!(status, 200, "{body}");
        close(&body["embedding"], &r["image_embeds"][1], &format!("{name} file"));
        // Texts: one, and a list; the long one is cut and says so.
        let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).expect("texts");
        let (status, body) =
            post_json(&server, "/embed/text", &json!({"model": name, "text": texts[0]})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dimension"], dimension);
        close(&body["embedding"], &r["text_embeds"][0], &format!("{name} text"));
        let (status, body) = post_json(&server, "/embed/text", &json!({"model": name, "text": texts})).await;
        assert_eq!(status, 200, "{body}");
        for (i, got) in body["embeddings"].as_array().expect("embeddings").iter().enumerate() {
            close(got, &r["text_embeds"][i], &format!("{name} text[{i}]"));
        }
        assert_eq!(body["truncated"][4], true, "{body}");
        assert_eq!(body["truncated"][0], false, "{body}");
    }
    // Without `model`, the first model served answers.
    let (status, body) = post_file(&server, None, Some(&image_bytes("alpha-50x30.png"))).await;
    assert_eq!((status, body["model"].clone()), (200, json!("siglip:tiny")), "{body}");

    // OpenAI's SDK (base64 encoding by default) against CLIP's text tower.
    let r = reference("clip");
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
texts = json.loads(sys.argv[2])
out = client.embeddings.create(model="clip", input=texts)
floats = client.embeddings.create(model="clip:tiny", input=texts[0], encoding_format="float")
print(json.dumps({"data": [d.embedding for d in out.data], "model": out.model,
                  "tokens": out.usage.prompt_tokens, "one": floats.data[0].embedding}))
"#;
    let python = common::reference_python();
    let (base, texts) = (server.base.clone(), r["texts"].to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(base)
            .arg(texts)
            .output()
            .expect("python")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "the SDK failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["model"], "clip:tiny");
    for (i, v) in got["data"].as_array().expect("data").iter().enumerate() {
        close(v, &r["text_embeds"][i], &format!("SDK text {i}"));
    }
    close(&got["one"], &r["text_embeds"][0], "SDK float text");
    assert!(got["tokens"].as_u64().unwrap() > 10, "{got}");

    // Counted per model, like every family's requests.
    let metrics = reqwest::get(server.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("kiln_requests_total{code=\"200\",model=\"clip\""), "{metrics}");
    let status: Value =
        reqwest::get(server.url("/status")).await.expect("status").json().await.expect("json");
    assert_eq!(status["family"], "image-text-embedding");
    let siglip =
        status["models"].as_array().expect("models").iter().find(|m| m["model"] == "siglip").expect("siglip");
    assert_eq!(siglip["imageSize"], json!({"width": 32, "height": 32}), "{status}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_and_requests_are_refused_with_status_and_code() {
    let server = server().await;
    let code = |body: &Value| body["error"]["code"].as_str().unwrap_or_default().to_string();
    let vision = |body: Value| {
        let server = &server;
        async move { post_json(server, "/embed/vision", &body).await }
    };
    // Not an image at all, and a format this server does not decode (BMP): 415, naming what to send.
    let (status, body) = vision(json!({"image_base64": b64(b"definitely not an image")})).await;
    assert_eq!((status, code(&body).as_str()), (415, "unsupported_image"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("JPEG, PNG, WebP or GIF"), "{body}");
    // A PNG cut short: 400.
    let png = image_bytes("rings-200x120.png");
    let (status, body) =
        vision(json!({"images_base64": [b64(&image_bytes("alpha-50x30.png")), b64(&png[..png.len() / 2])]}))
            .await;
    assert_eq!((status, code(&body).as_str()), (400, "invalid_image"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("images_base64[1]"),
        "names the item: {body}"
    );
    // A decompression bomb: a valid PNG header claiming 60000 × 60000 pixels.
    let mut bomb = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bomb),
        &[0; 3],
        1,
        1,
        image::ExtendedColorType::Rgb8,
    )
    .expect("png");
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let (status, body) = post_file(&server, Some("clip"), Some(&bomb)).await;
    assert_eq!((status, code(&body).as_str()), (413, "image_too_large"), "{body}");
    // Larger than the upload limit (1 MiB here).
    let (status, body) = post_file(&server, None, Some(&vec![0u8; (1 << 20) + 10])).await;
    assert_eq!(status, 413, "{body}");
    // Base64 that is not.
    let (status, body) = vision(json!({"image_base64": "***"})).await;
    assert_eq!((status, code(&body).as_str()), (400, "invalid_base64"), "{body}");
    // Nothing, both, an empty list, too many, a wrong type.
    let (status, body) = vision(json!({})).await;
    assert_eq!((status, code(&body).as_str()), (400, "missing_image"), "{body}");
    let png = b64(&image_bytes("alpha-50x30.png"));
    let (status, body) = vision(json!({"image_base64": png, "images_base64": [png]})).await;
    assert_eq!((status, code(&body).as_str()), (400, "ambiguous_input"), "{body}");
    let (status, body) = vision(json!({"images_base64": []})).await;
    assert_eq!((status, code(&body).as_str()), (400, "empty_input"), "{body}");
    let (status, body) = vision(json!({"images_base64": vec![png.clone(); 65]})).await;
    assert_eq!((status, code(&body).as_str()), (413, "too_many_inputs"), "{body}");
    let (status, body) = vision(json!({"image_base64": 7})).await;
    assert_eq!((status, code(&body).as_str()), (422, "invalid_image_base64"), "{body}");
    // A form without its file.
    let (status, body) = post_file(&server, Some("clip"), None).await;
    assert_eq!((status, code(&body).as_str()), (400, "missing_file"), "{body}");
    // Texts: missing, empty list, an unknown model.
    let (status, body) = post_json(&server, "/embed/text", &json!({})).await;
    assert_eq!((status, code(&body).as_str()), (400, "missing_text"), "{body}");
    let (status, body) = post_json(&server, "/embed/text", &json!({"text": []})).await;
    assert_eq!((status, code(&body).as_str()), (400, "empty_input"), "{body}");
    let (status, body) = post_json(&server, "/embed/text", &json!({"text": "x", "model": "bert"})).await;
    assert_eq!((status, code(&body).as_str()), (404, "model_not_found"), "{body}");
    // Another family's endpoint names this one's.
    let (status, body) = post_json(&server, "/v1/chat/completions", &json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("image-text-embedding"), "{body}");
    // The server still answers after all that.
    let (status, _) = post_json(&server, "/embed/text", &json!({"text": "still here"})).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}
