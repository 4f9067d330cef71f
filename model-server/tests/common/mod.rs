//! Shared by the integration tests: the real MiniLM weights (`make fixtures`) and the golden
//! reference vectors from ../shared/bench.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod faulty_http;

use std::path::PathBuf;

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
    let root = std::env::var_os("KILN_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kiln/fixtures")
    });
    let dir = root.join("minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM fixture missing at {}: run `make fixtures`",
        dir.display()
    );
    dir
}

pub struct Golden {
    pub text: String,
    pub n_tokens: usize,
    pub n_tokens_untruncated: usize,
    pub embedding: Vec<f32>,
}

pub fn golden() -> Vec<Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/golden-minilm-sample.json");
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
use kiln_model_server::serve::{self, ServePlan};
use kiln_model_server::state::Limits;

/// A server running in this process on 127.0.0.1; dropped → shut down.
pub struct TestServer {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(plan: ServePlan, limits: Limits) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve::run(plan, listener, limits, Duration::ZERO, async move {
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
        Self::start(plan, Limits { max_body_bytes: 64 << 10, max_inputs: 16 }).await
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
