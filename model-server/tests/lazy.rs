//! Several models per pod on the real binary: lazy loading on the first request, one load for
//! concurrent first requests, least-recently-used unloading under a memory budget, idle
//! unloading that hands the memory back, and the 503s a client sees while it cannot be served.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::process::{Proc, free_port, spawn_with, wait_ready};
use serde_json::{Value, json};

struct Server {
    _proc: Proc,
    base: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(models: &[(&str, std::path::PathBuf)], extra: &[&str]) -> Server {
        Self::start_family("text-embedding", models, extra).await
    }

    async fn start_family(family: &str, models: &[(&str, std::path::PathBuf)], extra: &[&str]) -> Server {
        let port = free_port();
        let models: Vec<String> = models.iter().map(|(id, dir)| format!("{id}={}", dir.display())).collect();
        let mut args = vec!["--family", family];
        args.extend_from_slice(extra);
        let proc = spawn_with(port, &models, &args, &[]);
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&base).await;
        Server { _proc: proc, base, http: reqwest::Client::new() }
    }

    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.base)).send().await.expect("get").json().await.expect("json")
    }

    async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.base)).send().await.expect("get").text().await.expect("text")
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.base)).json(&body).send().await.expect("send")
    }

    async fn embed(&self, model: &str, text: &str) -> reqwest::Response {
        self.post("/v1/embeddings", json!({"model": model, "input": text})).await
    }

    async fn embedding(&self, model: &str, text: &str) -> Vec<f32> {
        let resp = self.embed(model, text).await;
        assert_eq!(resp.status(), 200, "{model}: {}", resp.text().await.unwrap_or_default());
        let body: Value = resp.json().await.expect("json");
        serde_json::from_value(body["data"][0]["embedding"].clone()).expect("vector")
    }

    /// `model`'s entry of `/status`.
    async fn model(&self, model: &str) -> Value {
        let status = self.get("/status").await;
        let found = status["models"].as_array().and_then(|m| m.iter().find(|m| m["model"] == model).cloned());
        found.unwrap_or_else(|| panic!("{model} not in {status}"))
    }

    async fn states(&self) -> Vec<(String, String)> {
        let status = self.get("/status").await;
        let mut out: Vec<(String, String)> = status["models"]
            .as_array()
            .expect("models")
            .iter()
            .map(|m| {
                (m["model"].as_str().unwrap_or("").to_string(), m["state"].as_str().unwrap_or("").to_string())
            })
            .collect();
        out.sort();
        out
    }

    async fn resident_bytes(&self) -> u64 {
        self.get("/status").await["residentBytes"].as_u64().expect("residentBytes")
    }

    async fn wait_state(&self, model: &str, state: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let m = self.model(model).await;
            if m["state"] == state {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{model} never became {state}: {m}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{text}"))
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_lazy_copies_take_turns_in_a_budget_for_two() {
    let dir = common::minilm_dir();
    // Each copy is charged its 90.9 MB of weights: two fit in 200Mi, three do not.
    let server = Server::start(
        &[("a:v1", dir.clone()), ("b:v1", dir.clone()), ("c:v1", dir.clone())],
        &["--lazy", "a:v1", "--lazy", "b:v1", "--lazy", "c:v1", "--memory-budget", "200Mi"],
    )
    .await;
    // Ready before any model is loaded: nothing is preloaded.
    let unloaded = |s: &str| vec![("a".into(), s.into()), ("b".into(), s.into()), ("c".into(), s.into())];
    assert_eq!(server.states().await, unloaded("Unloaded"));
    let listed = server.get("/v1/models").await;
    let data = listed["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "{listed}");
    assert!(data.iter().all(|m| m["load"] == "lazy" && m["state"] == "Unloaded"), "{listed}");
    let readyz = server.get("/readyz").await;
    assert_eq!(readyz["models"]["a:v1"]["state"], "Unloaded", "{readyz}");

    // a and b load on demand and both stay.
    let text = "The quick brown fox jumps over the lazy dog.";
    let from_a = server.embedding("a", text).await;
    let from_b = server.embedding("b", text).await;
    assert_eq!(from_a.len(), 384);
    assert!(same(&from_a, &from_b), "the copies give the same vector");
    let states = server.states().await;
    assert_eq!(states[0].1, "Ready", "{states:?}");
    assert_eq!(states[1].1, "Ready", "{states:?}");
    assert_eq!(states[2].1, "Unloaded", "{states:?}");

    // a used again: b is now the least recently used, and c's load unloads it.
    assert!(same(&server.embedding("a", text).await, &from_a));
    assert!(same(&server.embedding("c", text).await, &from_a));
    let b = server.model("b").await;
    assert_eq!(b["state"], "Evicted", "{b}");
    assert_eq!(b["unloads"], 1, "{b}");
    assert_eq!(server.model("a").await["state"], "Ready");
    // b again: now a is the oldest.
    assert!(same(&server.embedding("b", text).await, &from_a));
    assert_eq!(server.model("a").await["state"], "Evicted");
    assert_eq!(server.model("c").await["state"], "Ready");
    let b = server.model("b").await;
    assert_eq!((b["loads"].as_u64(), b["state"].as_str()), (Some(2), Some("Ready")), "{b}");
    assert!(b["loadSeconds"].as_f64().is_some() && b["warmupSeconds"].as_f64().is_some(), "{b}");
    assert_eq!(b["chargeBytes"], 90_868_376u64, "charged its weight file: {b}");

    // Ten concurrent first requests to the evicted a: one load serves them all.
    let loads_before = server.model("a").await["loads"].as_u64().expect("loads");
    let asks = (0..10).map(|i| {
        let server = &server;
        async move { server.embedding("a", &format!("request {i}")).await }
    });
    let answers = futures::future::join_all(asks).await;
    assert!(answers.iter().all(|v| v.len() == 384));
    let a = server.model("a").await;
    assert_eq!(a["loads"].as_u64(), Some(loads_before + 1), "one load for ten first requests: {a}");

    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "kiln_memory_budget_bytes"), (200u64 << 20) as f64);
    let lru = |m: &str| {
        metric(&metrics, &format!("kiln_model_unloads_total{{model=\"{m}\",reason=\"lru\",version=\"v1\"}}"))
    };
    assert_eq!(lru("a") + lru("b") + lru("c"), 3.0, "{metrics}");
    assert_eq!(metric(&metrics, "kiln_model_loads_total{model=\"a\",version=\"v1\"}"), 2.0);
    assert!(metric(&metrics, "kiln_lazy_first_request_seconds_count{model=\"a\",version=\"v1\"}") >= 10.0);
    assert!(metric(&metrics, "kiln_model_load_duration_seconds_count{model=\"b\",version=\"v1\"}") == 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lazy_model_is_unloaded_and_its_memory_returned() {
    let dir = common::minilm_dir();
    // A preloaded model stays; the lazy one goes after a second without requests.
    let server = Server::start(
        &[("pinned:v1", dir.clone()), ("spare:v1", dir.clone())],
        &["--lazy", "spare:v1", "--idle-unload-seconds", "1"],
    )
    .await;
    assert_eq!(server.model("pinned").await["state"], "Ready");
    assert_eq!(server.model("spare").await["state"], "Unloaded");
    // Settle the preloaded model's request path before measuring.
    for i in 0..5 {
        server.embedding("pinned", &format!("settle {i}")).await;
    }
    let before = server.resident_bytes().await;
    server.embedding("spare", "load me").await;
    let loaded = server.resident_bytes().await;
    assert!(loaded > before + (60 << 20), "the load shows in RSS: {before} -> {loaded}");
    server.wait_state("spare", "Evicted", Duration::from_secs(30)).await;
    // The model's thread pool winds down on its own after the unload (rayon does not join its
    // threads), so its last pages may go a moment later: wait for that, within 10 s.
    let settled = |after: u64| after as f64 <= before as f64 * 1.10;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = server.resident_bytes().await;
    while !settled(after) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = server.resident_bytes().await;
    }
    eprintln!("RSS before the load {before}, loaded {loaded}, after the unload {after}");
    assert!(
        settled(after),
        "RSS after the unload ({after}) is within 10% of before the load ({before}); loaded it was {loaded}"
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "kiln_model_unloads_total{model=\"spare\",reason=\"idle\",version=\"v1\"}"),
        1.0
    );
    assert_eq!(metric(&metrics, "kiln_model_resident_bytes{model=\"spare\",version=\"v1\"}"), 0.0);
    // The preloaded model is never unloaded, idle or not.
    assert_eq!(server.model("pinned").await["state"], "Ready");
    // The next request loads it again.
    server.embedding("spare", "back again").await;
    assert_eq!(server.model("spare").await["loads"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_fit_or_is_still_loading_gets_503_with_the_reason() {
    let dir = common::minilm_dir();
    // 50Mi cannot hold the 90.9 MB model, whatever is unloaded.
    let server =
        Server::start(&[("big:v1", dir.clone())], &["--lazy", "big:v1", "--memory-budget", "50Mi"]).await;
    let resp = server.embed("big", "x").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "memory_budget", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("50Mi") && message.contains("big:v1"), "{message}");
    assert_eq!(server.model("big").await["state"], "Unloaded");
    drop(server);

    // A request that may not wait for the load gets 503 model_loading and a Retry-After; the
    // load goes on, and a later request is answered.
    let server =
        Server::start(&[("slow:v1", dir.clone())], &["--lazy", "slow:v1", "--lazy-load-wait-seconds", "0"])
            .await;
    let resp = server.embed("slow", "x").await;
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "model_loading", "{body}");
    server.wait_state("slow", "Ready", Duration::from_secs(60)).await;
    assert_eq!(server.embed("slow", "x").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_text_generation_model_loads_on_its_first_chat() {
    let server = Server::start_family(
        "text-generation",
        &[("smollm2:135m", common::smollm2_dir())],
        &["--lazy", "smollm2:135m", "--kv-cache-memory", "64Mi"],
    )
    .await;
    assert_eq!(server.model("smollm2").await["state"], "Unloaded");
    let chat = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "temperature": 0,
        "max_tokens": 12
    });
    let resp: Value = server.post("/v1/chat/completions", chat).await.json().await.expect("json");
    let answer = resp["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(answer.contains("Paris"), "{resp}");
    let m = server.model("smollm2").await;
    assert_eq!((m["state"].as_str(), m["loads"].as_u64()), (Some("Ready"), Some(1)), "{m}");
    let gguf =
        std::fs::metadata(common::smollm2_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("gguf").len();
    assert_eq!(m["chargeBytes"].as_u64(), Some(gguf + (64 << 20)), "weights plus its KV budget: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_speech_model_loads_on_its_first_transcription() {
    use base64::Engine as _;
    let server = Server::start_family(
        "speech-to-text",
        &[("whisper:tiny-en", common::whisper_tiny_en_dir())],
        &["--lazy", "whisper:tiny-en"],
    )
    .await;
    assert_eq!(server.model("whisper").await["state"], "Unloaded");
    let clip = common::speech_reference().into_iter().find(|c| c.name == "kiln").expect("reference clip");
    let wav = std::fs::read(common::speech_reference_dir().join("kiln.wav")).expect("clip");
    let audio = base64::engine::general_purpose::STANDARD.encode(wav);
    let request = json!({"audio_base64": audio, "language": "en"});
    let resp: Value = server.post("/asr/transcribe", request).await.json().await.expect("json");
    assert_eq!(resp["text"], clip.transcript.as_str(), "{resp}");
    let m = server.model("whisper").await;
    assert_eq!((m["state"].as_str(), m["loads"].as_u64()), (Some("Ready"), Some(1)), "{m}");
    let model_bin =
        std::fs::metadata(common::whisper_tiny_en_dir().join("model.bin")).expect("model.bin").len();
    assert_eq!(m["chargeBytes"].as_u64(), Some(model_bin), "charged CTranslate2's model.bin: {m}");
}
