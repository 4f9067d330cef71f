//! The face-detection family over real HTTP on 127.0.0.1: `curl -F file=@image` as a user
//! would, JSON base64 one image or a list, the request settings, and each class of bad input
//! with its status and code; every face against OpenCV's `cv2.FaceDetectorYN` on the same ONNX
//! file (`make fixtures`).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use base64::Engine as _;
use common::{FaceCase, TestServer};
use kiln_model_server::manifest::{Batching, Family, Warmup};
use kiln_model_server::serve::ServePlan;
use kiln_model_server::state::Limits;
use serde_json::{Value, json};

async fn server(batching: Batching) -> TestServer {
    let plan = ServePlan::from_args(
        Family::FaceDetection,
        &[format!("yunet:2023mar={}", common::yunet_dir().display())],
        Warmup { iterations: 1, ..Warmup::default() },
        batching,
    )
    .expect("plan");
    let server = TestServer::start(plan, Limits { max_upload_bytes: 4 << 20, ..Limits::default() }).await;
    server.wait_ready().await;
    server
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The faces of one answer, as (box, landmarks, score).
fn faces(body: &Value) -> Vec<common::FoundFace> {
    body["faces"]
        .as_array()
        .unwrap_or_else(|| panic!("no faces in {body}"))
        .iter()
        .map(|f| {
            (
                serde_json::from_value(f["box"].clone()).expect("box"),
                serde_json::from_value(f["landmarks"].clone()).expect("landmarks"),
                f["score"].as_f64().expect("score") as f32,
            )
        })
        .collect()
}

fn matches(case: &FaceCase, body: &Value, how: &str) {
    assert_eq!(body["image"], json!({"width": case.width, "height": case.height}), "{how}: {body}");
    common::assert_faces_match(&format!("{} {how}", case.name), &faces(body), &case.faces);
}

async fn post_json(server: &TestServer, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(server.url("/face/detect")).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post_form(server: &TestServer, fields: &[(&str, &str)], file: Option<&[u8]>) -> (u16, Value) {
    common::post_multipart(&server.url("/face/detect"), fields, file.map(|b| ("frame.jpg", b))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_json_and_lists_give_opencvs_faces() {
    let (dir, cases) = common::face_reference();
    let server = server(Batching::default()).await;
    // curl, as the docs show it: every reference image, the EXIF-rotated JPEG included.
    for case in &cases {
        let (file, url) = (format!("file=@{}", dir.join(&case.file).display()), server.url("/face/detect"));
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl").args(["-sS", "--fail-with-body", "-F", &file, &url]).output()
        })
        .await
        .expect("join")
        .expect("curl runs (make fixtures installs it)");
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stdout));
        let body: Value = serde_json::from_slice(&out.stdout).expect("json");
        matches(case, &body, "via curl");
        assert_eq!(body["model"], "yunet:2023mar");
    }
    // One image as base64 JSON, then all of them as one list (several sizes in one request).
    let astronaut = cases.iter().find(|c| c.name == "astronaut").expect("astronaut");
    let bytes = |c: &FaceCase| std::fs::read(dir.join(&c.file)).expect("image");
    let (status, body) = post_json(&server, &json!({"image_base64": b64(&bytes(astronaut))})).await;
    assert_eq!(status, 200, "{body}");
    matches(astronaut, &body, "as base64");
    let all: Vec<String> = cases.iter().map(|c| b64(&bytes(c))).collect();
    let (status, body) = post_json(&server, &json!({"images_base64": all})).await;
    assert_eq!(status, 200, "{body}");
    let detections = body["detections"].as_array().expect("a list answers a list");
    assert_eq!(detections.len(), cases.len());
    for (case, d) in cases.iter().zip(detections) {
        matches(case, d, "in a list");
    }
    // Settings: a threshold above every face finds none; top_k 1 keeps the best, in a form too.
    let collage = cases.iter().find(|c| c.name == "collage").expect("collage");
    let collage_b64 = b64(&bytes(collage));
    let (status, body) =
        post_json(&server, &json!({"image_base64": collage_b64, "score_threshold": 0.99})).await;
    assert_eq!((status, faces(&body).len()), (200, 0), "{body}");
    let (status, body) = post_form(&server, &[("top_k", "1")], Some(&bytes(collage))).await;
    assert_eq!((status, faces(&body).len()), (200, 1), "{body}");
    let (status, body) = post_form(&server, &[("score_threshold", "0.95")], Some(&bytes(collage))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(faces(&body).len(), collage.faces.iter().filter(|f| f.score >= 0.95).count(), "{body}");
    // What the pod says about itself.
    let status: Value =
        reqwest::get(server.url("/status")).await.expect("status").json().await.expect("json");
    let text = status.to_string();
    assert!(text.contains("\"scoreThreshold\"") && text.contains("maxDetectPixels"), "{text}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_and_settings_are_refused_with_status_and_code() {
    let (dir, cases) = common::face_reference();
    let server = server(Batching::default()).await;
    let code = |body: &Value| body["error"]["code"].as_str().unwrap_or_default().to_string();
    let png = std::fs::read(dir.join(&cases[0].file)).expect("image");
    let one = b64(&png);
    for (body, status, want) in [
        (json!({"image_base64": b64(b"not an image")}), 415, "unsupported_image"),
        (json!({"image_base64": b64(&png[..png.len() / 2])}), 400, "invalid_image"),
        (json!({"image_base64": "***"}), 400, "invalid_base64"),
        (json!({}), 400, "missing_image"),
        (json!({"images_base64": []}), 400, "empty_input"),
        (json!({"images_base64": vec!["aW1hZ2U="; 65]}), 413, "too_many_inputs"),
        (json!({"image_base64": one, "score_threshold": 1.5}), 400, "invalid_threshold"),
        (json!({"image_base64": one, "nms_threshold": -0.1}), 400, "invalid_threshold"),
        (json!({"image_base64": one, "score_threshold": "high"}), 422, "invalid_threshold"),
        (json!({"image_base64": one, "top_k": 0}), 400, "invalid_top_k"),
        (json!({"image_base64": one, "top_k": 100000}), 400, "invalid_top_k"),
        (json!({"image_base64": one, "top_k": -3}), 422, "invalid_top_k"),
        (json!({"image_base64": 7}), 422, "invalid_image_base64"),
    ] {
        let (got, answer) = post_json(&server, &body).await;
        assert_eq!((got, code(&answer).as_str()), (status, want), "{answer}");
    }
    let (status, body) = post_form(&server, &[("top_k", "many")], Some(&png)).await;
    assert_eq!((status, code(&body).as_str()), (400, "invalid_top_k"), "{body}");
    let (status, body) = post_form(&server, &[], None).await;
    assert_eq!((status, code(&body).as_str()), (400, "missing_file"), "{body}");
    let (status, body) = post_form(&server, &[], Some(&vec![0u8; (4 << 20) + 1])).await;
    assert_eq!(status, 413, "{body}");
    // Another family's endpoint names this one.
    let r =
        reqwest::Client::new().post(server.url("/embed/vision")).json(&json!({})).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 404);
    let body: Value = r.json().await.expect("json");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("face-detection"), "{body}");
    // Still serving.
    let (status, _) = post_form(&server, &[], Some(&png)).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

/// A bounded queue: a burst larger than it gets 429 with Retry-After, the rest their faces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_queue_is_refused_with_429() {
    let (dir, cases) = common::face_reference();
    let server = server(Batching { max_batch_size: 1, max_delay_milliseconds: 0, max_queue_depth: 2 }).await;
    let collage = cases.iter().find(|c| c.name == "collage").expect("collage");
    let body = json!({"image_base64": b64(&std::fs::read(dir.join(&collage.file)).expect("image"))});
    let client = reqwest::Client::new();
    let burst = (0..24).map(|_| {
        let (client, url, body) = (client.clone(), server.url("/face/detect"), body.clone());
        tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().await.expect("json"))
        })
    });
    let (mut ok, mut full) = (0, 0);
    for r in futures::future::join_all(burst).await {
        let (status, retry, body) = r.expect("task");
        match status {
            200 => {
                ok += 1;
                matches(collage, &body, "in a burst");
            }
            429 => {
                full += 1;
                assert_eq!(
                    (retry.as_deref(), body["error"]["code"].as_str()),
                    (Some("1"), Some("queue_full"))
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok}, full {full}");
    server.shutdown().await;
}
