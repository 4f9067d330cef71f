//! The compute device as a user meets it: `--device` on the real binary, the device in
//! `/status` and `kiln_device_info`, and the GPU path's parity with the reference vectors,
//! which runs where a CUDA device opens and says "skipped: no CUDA device" everywhere else.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::Command;

use common::TestServer;
use kiln_model_server::device::{ComputeDevice, DeviceRequest};
use kiln_model_server::families::text_embedding::{EmbeddingModel, cosine};
use kiln_model_server::manifest::{Batching, Family, Warmup};
use kiln_model_server::serve::ServePlan;
use kiln_model_server::state::Limits;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kiln-model-server");

fn serve_with_device(device: &str) -> (bool, String) {
    let model = format!("minilm:v1={}", common::minilm_dir().display());
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--warmup-iterations", "0", "--model", &model])
        .args(["--device", device])
        .output()
        .expect("run serve");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_build_refuses_a_gpu_at_start_and_names_the_image_that_has_one() {
    let (ok, stderr) = serve_with_device("cuda:0");
    assert!(!ok, "a CPU build must not serve when asked for a GPU");
    assert!(
        stderr.contains("device cuda:0: this build has no CUDA support") && stderr.contains("-cuda"),
        "{stderr}"
    );
}

#[test]
fn a_device_that_is_not_one_is_refused_with_the_accepted_forms() {
    let (ok, stderr) = serve_with_device("gpu0");
    assert!(!ok);
    assert!(stderr.contains("expected auto, cpu, cuda or cuda:N"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_name_the_device() {
    let plan = ServePlan::from_args(
        Family::TextEmbedding,
        &[format!("minilm:v1={}", common::minilm_dir().display())],
        Warmup { iterations: 0, ..Warmup::default() },
        Batching::default(),
    )
    .expect("plan");
    let server = TestServer::start(plan, Limits::default()).await;
    server.wait_ready().await;
    let status: Value =
        reqwest::get(server.url("/status")).await.expect("status").json().await.expect("json");
    assert_eq!(status["device"]["device"], "cpu", "{status}");
    let name = status["device"]["name"].as_str().expect("a name");
    assert!(name.starts_with("cpu (row kernels"), "{name}");
    let metrics = reqwest::get(server.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let line = metrics.lines().find(|l| l.starts_with("kiln_device_info{")).expect("kiln_device_info");
    assert!(line.contains("device=\"cpu\"") && line.ends_with(" 1"), "{line}");
    server.shutdown().await;
}

/// BERT on the GPU (candle's BERT with cuBLAS) against sentence-transformers' vectors.
#[test]
fn gpu_embeddings_match_the_reference_vectors() {
    let device = match ComputeDevice::open(DeviceRequest::Cuda(0)) {
        Ok(device) => device,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    println!("running on {} ({})", device.label(), device.name());
    let model = EmbeddingModel::load_on(&common::minilm_dir(), &device).expect("load on the GPU");
    let golden = common::golden();
    let texts: Vec<&str> = golden.iter().map(|g| g.text.as_str()).collect();
    let got = model.embed(&texts).expect("embed on the GPU");
    for (g, v) in golden.iter().zip(&got) {
        let c = cosine(v, &g.embedding);
        assert!(c >= 0.999, "{:?}: cosine {c} against the reference", g.text);
    }
}
