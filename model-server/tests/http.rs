//! The HTTP API on real MiniLM weights over real HTTP on 127.0.0.1.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::TestServer;
use kiln_model_server::families::text_embedding::cosine;
use kiln_model_server::manifest::Batching;
use serde_json::{Value, json};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_through_both_endpoints_and_batches_equal_singles() {
    let server = TestServer::minilm(1, Batching::default()).await;
    server.wait_ready().await;
    let client = reqwest::Client::new();
    let golden = common::golden();

    let texts: Vec<&str> = golden.iter().map(|g| g.text.as_str()).collect();
    let batch: Value = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": texts}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(batch["model"], "minilm:v2");
    assert_eq!(batch["object"], "list");
    let total: usize = golden.iter().map(|g| g.n_tokens).sum();
    assert_eq!(batch["usage"]["prompt_tokens"], total, "usage counts real tokens");
    let data = batch["data"].as_array().expect("data");
    assert_eq!(data.len(), golden.len());

    for (i, g) in golden.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        let from_batch = floats(&data[i]["embedding"]);
        let single: Value = client
            .post(server.url("/embed/text"))
            .json(&json!({"text": g.text}))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(single["dimension"], 384);
        assert_eq!(single["model"], "minilm:v2");
        assert_eq!(single["truncated"], g.n_tokens_untruncated > g.n_tokens);
        let alone = floats(&single["embedding"]);
        assert!(cosine(&alone, &g.embedding) >= 0.999, "golden via /embed/text: {:?}", g.text);
        assert!(cosine(&from_batch, &g.embedding) >= 0.999, "golden via /v1/embeddings: {:?}", g.text);
        assert!(cosine(&from_batch, &alone) >= 0.99999, "batch equals single: {:?}", g.text);
    }

    // base64 carries the same little-endian f32s.
    let b64: Value = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": "minilm:v2", "input": "a", "encoding_format": "base64"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().expect("b64 string"))
        .expect("base64");
    let decoded: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let a = golden.iter().find(|g| g.text == "a").expect("golden 'a'");
    assert!(cosine(&decoded, &a.embedding) >= 0.999);

    let models: Value =
        client.get(server.url("/v1/models")).send().await.expect("send").json().await.expect("json");
    assert_eq!(models["data"][0]["id"], "minilm:v2");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_json_with_the_right_status_and_the_server_keeps_serving() {
    let server = TestServer::minilm(0, Batching::default()).await;
    server.wait_ready().await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>| {
        client.post(server.url(path)).header("content-type", "application/json").body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (post("/v1/embeddings", br#"{"input": "x""#.to_vec()), 400, "invalid_json"),
        (post("/v1/embeddings", b"[1,2]".to_vec()), 422, "invalid_body"),
        (post("/v1/embeddings", br#"{"input": 42}"#.to_vec()), 422, "invalid_input"),
        (post("/v1/embeddings", br#"{"input": [1, 2]}"#.to_vec()), 422, "invalid_input"),
        (post("/v1/embeddings", br#"{"input": []}"#.to_vec()), 400, "empty_input"),
        (post("/v1/embeddings", br#"{"model": "minilm"}"#.to_vec()), 400, "missing_input"),
        (post("/v1/embeddings", br#"{"model": "gpt-4", "input": "x"}"#.to_vec()), 404, "model_not_found"),
        (post("/v1/embeddings", br#"{"model": "minilm:v9", "input": "x"}"#.to_vec()), 404, "model_not_found"),
        (post("/v1/embeddings", br#"{"model": 7, "input": "x"}"#.to_vec()), 422, "invalid_model"),
        (
            post("/v1/embeddings", br#"{"input": "x", "dimensions": 128}"#.to_vec()),
            400,
            "dimensions_not_supported",
        ),
        (
            post("/v1/embeddings", br#"{"input": "x", "encoding_format": "int8"}"#.to_vec()),
            400,
            "invalid_encoding_format",
        ),
        (
            post("/v1/embeddings", serde_json::to_vec(&json!({"input": vec!["x"; 17]})).unwrap()),
            413,
            "too_many_inputs",
        ),
        (
            post("/v1/embeddings", serde_json::to_vec(&json!({"input": "y".repeat(70_000)})).unwrap()),
            413,
            "body_too_large",
        ),
        (post("/v1/embeddings", b"{\"input\": \"\xff\xfe\"}".to_vec()), 400, "invalid_utf8"),
        (post("/embed/text", br#"{"text": ["x"]}"#.to_vec()), 422, "invalid_text"),
        (post("/embed/text", br#"{}"#.to_vec()), 400, "missing_text"),
        (client.get(server.url("/v2/nothing")), 404, "unknown_path"),
        (client.get(server.url("/v1/embeddings")), 405, "method_not_allowed"),
    ];
    for (req, status, code) in cases {
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{code}: body is not JSON: {e}"));
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
    }
    // An over-long input is truncated at 256 tokens and says so.
    let long = "word ".repeat(600);
    let ok: Value = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"input": [long, "short"]}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(ok["data"][0]["truncated"], true);
    assert!(ok["data"][1].get("truncated").is_none());
    assert_eq!(ok["usage"]["prompt_tokens"], 256 + 3);
    // Still serving; errors were counted under the model's labels.
    let metrics = client.get(server.url("/metrics")).send().await.expect("send").text().await.expect("text");
    assert!(metrics.contains(r#"kiln_requests_total{code="422",model="minilm",version="v2"}"#), "{metrics}");
    assert!(
        metrics.contains(r#"kiln_requests_total{code="200",model="minilm",version="v2"} 1"#),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_200_only_after_warmup() {
    // Many warmup passes so the loading and warming states are observable.
    let server = TestServer::minilm(40, Batching::default()).await;
    let client = reqwest::Client::new();
    let health = client.get(server.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200, "healthz is 200 while loading");
    let mut saw = Vec::new();
    let mut loading_503 = 0;
    let ready = loop {
        let r = client.get(server.url("/readyz")).send().await.expect("readyz");
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("json");
        let state = body["models"]["minilm:v2"]["state"].as_str().unwrap_or_default().to_string();
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503);
        assert_eq!(body["ready"], false);
        assert!(["Unloaded", "Loading", "Warming"].contains(&state.as_str()), "{body}");
        if saw.last() != Some(&state) {
            saw.push(state);
        }
        // Requests before readiness are refused cleanly, not queued behind the load.
        let early =
            client.post(server.url("/embed/text")).json(&json!({"text": "x"})).send().await.expect("send");
        if early.status() != 200 {
            assert_eq!(early.status(), 503);
            assert_eq!(early.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        }
        // Even a request whose validation needs the model (`dimensions`) is a 503 while it
        // loads, never a 400 that tells the client its request was wrong.
        let dims = client
            .post(server.url("/v1/embeddings"))
            .json(&json!({"input": "x", "dimensions": 128}))
            .send()
            .await
            .expect("send");
        match dims.status().as_u16() {
            503 => loading_503 += 1,
            400 => {
                let now = client.get(server.url("/readyz")).send().await.expect("readyz").status();
                assert_eq!(now, 200, "a 400 for `dimensions` while the model was still loading");
            }
            other => panic!("dimensions while loading: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(saw.iter().any(|s| s == "Warming"), "warming was visible before ready: {saw:?}");
    assert!(loading_503 > 0, "a request with `dimensions` was answered 503 while loading");
    let m = &ready["models"]["minilm:v2"];
    assert_eq!(m["state"], "Ready");
    assert!(m["warmupSeconds"].as_f64().expect("warmup seconds") > 0.0);
    assert!(m["loadSeconds"].as_f64().expect("load seconds") > 0.0);
    let metrics = client.get(server.url("/metrics")).send().await.expect("send").text().await.expect("text");
    assert!(metrics.contains(r#"kiln_model_ready{model="minilm",version="v2"} 1"#));
    assert!(metrics.contains("kiln_model_warmup_seconds"));
    assert!(metrics.contains("kiln_queue_depth 0"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server =
        TestServer::minilm(0, Batching { max_batch_size: 1, max_delay_milliseconds: 0, max_queue_depth: 2 })
            .await;
    server.wait_ready().await;
    let client = reqwest::Client::new();
    let long = "several words make this a slower input to embed ".repeat(20);
    let burst = (0..40).map(|_| {
        let client = client.clone();
        let url = server.url("/v1/embeddings");
        let body = json!({"input": [long.clone(), long.clone(), long.clone(), long.clone()]});
        tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_string());
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("json body");
            (status, retry, body)
        })
    });
    let results = futures::future::join_all(burst).await;
    let mut ok = 0;
    let mut full = 0;
    for r in results {
        let (status, retry, body) = r.expect("task");
        match status {
            200 => ok += 1,
            429 => {
                full += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "queue_full");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok}, full {full}");
    server.shutdown().await;
}

/// The queue bounds memory, not only request count: tokens waiting per model are limited,
/// a request that could never fit is 413, and only JSON is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bounds_waiting_tokens_and_only_json_is_accepted() {
    let plan = kiln_model_server::serve::ServePlan::from_args(
        kiln_model_server::manifest::Family::TextEmbedding,
        &[format!("minilm:v2={}", common::minilm_dir().display())],
        kiln_model_server::manifest::Warmup { iterations: 0, ..Default::default() },
        Batching { max_batch_size: 1, max_delay_milliseconds: 0, max_queue_depth: 64 },
    )
    .expect("plan");
    let limits = kiln_model_server::state::Limits {
        max_body_bytes: 256 << 10,
        max_inputs: 16,
        max_queued_tokens: 1000,
        ..Default::default()
    };
    let server = TestServer::start(plan, limits).await;
    server.wait_ready().await;
    let client = reqwest::Client::new();
    let long = "several words make this a slower input to embed ".repeat(40); // cut at 256 tokens
    // Eight inputs of 256 tokens can never fit a 1000-token queue.
    let r = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"input": vec![long.clone(); 8]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["error"]["code"], "too_many_tokens", "{err}");
    assert!(err["error"]["message"].as_str().unwrap_or("").contains("1000"), "{err}");
    // Three inputs (768 tokens) fit alone; a burst of them fills the token budget long before
    // the 64 requests the queue would count, and the rest get 429 with Retry-After.
    let burst = (0..12).map(|_| {
        let (client, url) = (client.clone(), server.url("/v1/embeddings"));
        let body = json!({"input": vec![long.clone(); 3]});
        async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            let retry = r.headers().get("retry-after").is_some();
            (r.status().as_u16(), retry, r.json::<Value>().await.expect("json"))
        }
    });
    let (mut ok, mut full) = (0, 0);
    for (status, retry, body) in futures::future::join_all(burst).await {
        match status {
            200 => ok += 1,
            429 => {
                full += 1;
                assert!(retry, "429 without Retry-After");
                assert!(body["error"]["message"].as_str().unwrap_or("").contains("tokens"), "{body}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok}, refused {full}");
    // Not JSON: 415, whatever the body.
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
        let mut req = client.post(server.url("/v1/embeddings")).body(r#"{"input": "x"}"#);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status(), 415, "{content_type:?}");
        let err: Value = r.json().await.expect("json");
        assert_eq!(err["error"]["code"], "unsupported_media_type");
    }
    // JSON with parameters, and +json types, are JSON.
    for content_type in ["application/json; charset=utf-8", "application/vnd.kiln+json"] {
        let r = client
            .post(server.url("/embed/text"))
            .header("content-type", content_type)
            .body(r#"{"text": "x"}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{content_type}");
    }
    server.shutdown().await;
}
