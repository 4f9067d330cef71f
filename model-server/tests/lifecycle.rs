//! Process-level behaviour: fallback from the manifest, SIGTERM drain, one copy of the weights.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestServer;
use common::process::{Proc, exit_status, free_port, rss_kib, spawn_with, wait_ready};
use kiln_model_server::families::text_embedding::cosine;
use kiln_model_server::manifest::{Batching, Family, Manifest, ModelEntry, ModelRef, ModelSource, Warmup};
use kiln_model_server::pull::PullOptions;
use kiln_model_server::serve::ServePlan;
use kiln_model_server::state::Limits;
use serde_json::{Value, json};

fn scratch(name: &str) -> common::Scratch {
    common::scratch(name)
}

fn entry(name: &str, version: &str, source: &Path, fallback: Option<ModelRef>, serve: bool) -> ModelEntry {
    ModelEntry {
        name: name.into(),
        version: version.into(),
        source: ModelSource { uri: format!("file://{}/", source.display()), ..Default::default() },
        memory_bytes: None,
        fallback,
        serve,
        kv_cache_bytes: None,
        load: Default::default(),
    }
}

/// A source for minilm:v2 that pulls fine but cannot load (config only, no weights).
fn broken_v2_source(dir: &Path) -> PathBuf {
    let src = dir.join("src-v2");
    std::fs::create_dir_all(&src).expect("mkdir v2");
    std::fs::copy(common::minilm_dir().join("config.json"), src.join("config.json")).expect("copy");
    src
}

/// Writes the manifest and pulls it into `<dir>/cache` the way the init container does.
async fn pulled(dir: &Path, manifest: &Manifest) -> (PathBuf, PathBuf) {
    let path = dir.join("manifest.json");
    std::fs::write(&path, manifest.to_json()).expect("write manifest");
    let cache = dir.join("cache");
    let opts = PullOptions { in_place: true, ..PullOptions::default() };
    kiln_model_server::pull::pull_manifest(manifest, &cache, &opts).await.expect("pull");
    (path, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_model_is_served_by_its_fallback_and_status_says_so() {
    let dir = scratch("fallback");
    let v2 = broken_v2_source(&dir);
    let manifest = Manifest::new(
        Family::TextEmbedding,
        vec![
            entry("minilm", "v2", &v2, Some(ModelRef::new("minilm", "v1")), true),
            entry("minilm", "v1", &common::minilm_dir(), None, false),
        ],
        Warmup { iterations: 1, ..Warmup::default() },
        Batching::default(),
    );
    let (path, cache) = pulled(&dir, &manifest).await;
    let plan = ServePlan::from_manifest(&path, &cache).expect("plan");
    let server = TestServer::start(plan, Limits::default()).await;
    let ready = server.wait_ready().await;
    let v2 = &ready["models"]["minilm:v2"];
    assert_eq!(v2["state"], "FallenBack", "{ready}");
    assert_eq!(v2["servedBy"], "minilm:v1");
    assert!(v2["error"].as_str().is_some_and(|e| e.contains("model.safetensors")), "{v2}");

    let client = reqwest::Client::new();
    let resp: Value = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": "minilm:v2", "input": "a"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let golden = common::golden();
    let a = golden.iter().find(|g| g.text == "a").expect("golden a");
    let got: Vec<f32> = resp["data"][0]["embedding"]
        .as_array()
        .expect("vector")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(cosine(&got, &a.embedding) >= 0.999, "v1 answered for v2");
    let status: Value =
        client.get(server.url("/status")).send().await.expect("send").json().await.expect("json");
    let states: Vec<(String, String)> = status["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| {
            (
                format!("{}:{}", m["model"].as_str().unwrap(), m["version"].as_str().unwrap()),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(states.contains(&("minilm:v2".into(), "FallenBack".into())), "{states:?}");
    assert!(states.contains(&("minilm:v1".into(), "Ready".into())), "{states:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fallback_the_server_stays_unready_with_the_error() {
    let dir = scratch("nofallback");
    let v2 = broken_v2_source(&dir);
    let manifest = Manifest::new(
        Family::TextEmbedding,
        vec![entry("minilm", "v2", &v2, None, true)],
        Warmup::default(),
        Batching::default(),
    );
    let (path, cache) = pulled(&dir, &manifest).await;
    let server =
        TestServer::start(ServePlan::from_manifest(&path, &cache).expect("plan"), Limits::default()).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let r = client.get(server.url("/readyz")).send().await.expect("readyz");
        assert_eq!(r.status(), 503, "never ready without the model");
        let body: Value = r.json().await.expect("json");
        if body["models"]["minilm:v2"]["state"] == "Failed" {
            break body;
        }
        assert!(Instant::now() < deadline, "never reported the failure: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body["models"]["minilm:v2"]["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(client.get(server.url("/healthz")).send().await.expect("healthz").status(), 200);
    let refused =
        client.post(server.url("/embed/text")).json(&json!({"text": "x"})).send().await.expect("send");
    assert_eq!(refused.status(), 503);
    let err: Value = refused.json().await.expect("json");
    assert_eq!(err["error"]["code"], "model_failed");
    server.shutdown().await;
}

fn spawn_server(port: u16, extra: &[&str]) -> Proc {
    spawn_with(port, &[format!("minilm:v2={}", common::minilm_dir().display())], extra, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_requests_then_exits_zero() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = spawn_server(port, &["--drain-delay-seconds", "1", "--max-batch-size", "4"]);
    wait_ready(&base).await;
    let client = reqwest::Client::new();
    let long = "a request that takes a little while to embed ".repeat(20);
    // Queue work, then signal while it is in flight.
    let inflight: Vec<_> = (0..12)
        .map(|_| {
            let client = client.clone();
            let url = format!("{base}/v1/embeddings");
            let body = json!({"input": vec![long.clone(); 8]});
            tokio::spawn(
                async move { client.post(url).json(&body).send().await.map(|r| r.status().as_u16()) },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = server.0.id();
    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    // Readiness drops at once, but a client that has not yet seen the endpoint go is still
    // served during the drain delay: a rollout loses nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = client.get(format!("{base}/readyz")).send().await.expect("readyz while draining");
    assert_eq!(ready.status(), 503);
    let late =
        client.post(format!("{base}/embed/text")).json(&json!({"text": "late"})).send().await.expect("late");
    assert_eq!(late.status(), 200);
    for task in inflight {
        assert_eq!(task.await.expect("join").expect("accepted request completes"), 200);
    }
    let status = exit_status(&mut server, Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_does_not_grow_with_concurrency() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = spawn_server(port, &[]);
    wait_ready(&base).await;
    let pid = server.0.id();
    let client = reqwest::Client::new();
    let round = |conns: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let tasks: Vec<_> = (0..conns)
                .map(|i| {
                    let client = client.clone();
                    let url = format!("{base}/embed/text");
                    tokio::spawn(async move {
                        for j in 0..4 {
                            let r = client
                                .post(&url)
                                .json(&json!({"text": format!("sentence {i} {j} of a burst")}))
                                .send()
                                .await
                                .expect("send");
                            assert_eq!(r.status(), 200);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("join");
            }
        }
    };
    round(1).await;
    let after_one = rss_kib(pid);
    round(64).await;
    let after_many = rss_kib(pid);
    // The weights (87 MiB) are loaded once: 64 connections may add buffers, never a copy.
    assert!(
        after_many < after_one + 60 * 1024,
        "RSS grew from {after_one} KiB to {after_many} KiB with 64 connections"
    );
}

/// A model whose worker thread dies (a failpoint in debug builds makes its batcher panic):
/// its requests get 503 with the reason instead of hanging, readiness turns 503 and says why,
/// work already running on the other model finishes, and the process exits non-zero so the
/// kubelet restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_fails_its_model_and_the_process_exits_non_zero_after_draining() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = common::minilm_dir().display().to_string();
    let models = [format!("healthy:v1={dir}"), format!("doomed:v1={dir}")];
    let mut server = spawn_with(
        port,
        &models,
        &["--drain-delay-seconds", "1", "--max-batch-size", "2"],
        &[("KILN_FAILPOINTS", "batch-panic:doomed")],
    );
    wait_ready(&base).await;
    let client = reqwest::Client::new();
    // Work for the healthy model, in flight while the other dies.
    let long = "a request that keeps the healthy model busy for a while ".repeat(20);
    let busy: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/v1/embeddings"));
            let body = json!({"model": "healthy", "input": vec![long.clone(); 8]});
            tokio::spawn(
                async move { client.post(url).json(&body).send().await.map(|r| r.status().as_u16()) },
            )
        })
        .collect();
    let resp = client
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": "doomed", "input": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let err: Value = resp.json().await.expect("json");
    assert_eq!(err["error"]["code"], "model_failed", "{err}");
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("panicked"), "{err}");
    // The model is marked Failed right after its callers are told; readiness says so.
    let mut body = Value::Null;
    for _ in 0..100 {
        let ready = client.get(format!("{base}/readyz")).send().await.expect("readyz");
        assert_eq!(ready.status(), 503);
        body = ready.json().await.expect("json");
        if body["models"]["doomed:v1"]["state"] == "Failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(body["models"]["doomed:v1"]["state"], "Failed", "{body}");
    assert!(body["models"]["doomed:v1"]["error"].as_str().unwrap_or_default().contains("panicked"), "{body}");
    for task in busy {
        assert_eq!(task.await.expect("join").expect("the healthy model's requests complete"), 200);
    }
    let status = exit_status(&mut server, Duration::from_secs(30)).await;
    assert!(!status.success(), "exit status {status}: a dead model must restart the pod");
}

/// The same for a text-generation scheduler: a stream running when it dies ends with an error
/// event and `[DONE]` instead of hanging, and the process exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_generation_scheduler_ends_its_streams_with_the_reason() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let models = [format!("smollm2:135m={}", common::smollm2_dir().display())];
    let mut server = spawn_with(
        port,
        &models,
        &["--family", "text-generation", "--drain-delay-seconds", "0"],
        &[("KILN_FAILPOINTS", "step-panic")],
    );
    wait_ready(&base).await;
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "the stream starts before the scheduler's first step");
    let body = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends instead of hanging")
        .expect("body");
    assert!(body.contains("model_failed") && body.contains("panicked"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let status = exit_status(&mut server, Duration::from_secs(30)).await;
    assert!(!status.success(), "exit status {status}");
}
