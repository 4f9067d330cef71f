//! Architectures chosen from the checkpoint, checked against the reference implementation:
//! tiny random-weight BERT and XLM-RoBERTa checkpoints written by `scripts/tiny_models.py` with
//! transformers, and the vectors sentence-transformers computed on them (committed under
//! tests/data/tiny). An architecture the build does not run is refused by name.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use kiln_model_server::device::ComputeDevice;
use kiln_model_server::families::text_embedding::{EmbeddingModel, EncoderSettings, cosine};
use kiln_model_server::loader::{ModelDir, ModelDirs};
use kiln_model_server::manifest::{Batching, Family, ModelRef, Warmup};
use kiln_model_server::models::bert::candle::CandleBert;
use kiln_model_server::models::{Architecture, Encoder};
use kiln_model_server::serve::ServePlan;
use kiln_model_server::state::PlannedModel;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};

/// Cosine between our vectors and the reference's: float16 weights, float32 arithmetic on both
/// sides; a wrong position offset or token type moves it far below this.
const PARITY: f32 = 0.9999;

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny").join(name)
}

struct Reference {
    sentences: Vec<String>,
    tokens: Vec<Vec<u32>>,
    vectors: BTreeMap<String, Vec<Vec<f32>>>,
}

fn reference(dir: &Path) -> Reference {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference"))
            .expect("reference json");
    let floats =
        |v: &Value| v.as_array().expect("array").iter().map(|x| x.as_f64().expect("f") as f32).collect();
    Reference {
        sentences: json["sentences"]
            .as_array()
            .expect("sentences")
            .iter()
            .map(|s| s.as_str().expect("s").into())
            .collect(),
        tokens: json["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect())
            .collect(),
        vectors: json["vectors"]
            .as_object()
            .expect("vectors")
            .iter()
            .map(|(pooling, vs)| (pooling.clone(), vs.as_array().expect("vs").iter().map(floats).collect()))
            .collect(),
    }
}

/// A scratch copy of the checkpoint `dir`.
fn copy_of(dir: &Path, name: &str) -> common::Scratch {
    let copy = common::scratch(name);
    for entry in walk(dir) {
        let target = copy.join(entry.strip_prefix(dir).expect("inside"));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&entry, &target).expect("copy");
    }
    copy
}

/// A copy of `dir` with its sentence-transformers pooling switched to `pooling`.
fn with_pooling(dir: &Path, pooling: &str) -> common::Scratch {
    let copy = copy_of(dir, "pooling");
    let config = json!({
        "word_embedding_dimension": 64,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
    });
    std::fs::write(copy.join("1_Pooling/config.json"), config.to_string()).expect("pooling config");
    copy
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

fn check_parity(dir: &Path, pooling: &str, what: &str) {
    let model = EmbeddingModel::load(dir).unwrap_or_else(|e| panic!("{what}: {e}"));
    check_model_parity(&model, dir, pooling, what);
}

/// The same checks on candle's model of `architecture` on `device`: the code a GPU runs.
fn check_candle_parity(
    dir: &Path,
    architecture: Architecture,
    device: &ComputeDevice,
    pooling: &str,
    what: &str,
) {
    let what = format!("{what} (candle on {})", device.label());
    let encoder =
        CandleBert::load(dir, architecture, device.candle()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let settings = EncoderSettings::read(dir, encoder.max_positions()).expect("settings");
    let model = EmbeddingModel::with_encoder(dir, Arc::new(encoder), settings).expect("model");
    check_model_parity(&model, dir, pooling, &what);
}

fn check_model_parity(model: &EmbeddingModel, dir: &Path, pooling: &str, what: &str) {
    let r = reference(dir);
    assert_eq!(model.dimension(), 64);
    for (i, sentence) in r.sentences.iter().enumerate() {
        let tokens = model.tokenize(sentence).expect("tokenize");
        assert_eq!(tokens.ids, r.tokens[i], "{what}: token ids of {sentence:?}");
    }
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let ours = model.embed(&texts).expect("embed");
    let mut worst = 1.0f32;
    for (i, (v, want)) in ours.iter().zip(&r.vectors[pooling]).enumerate() {
        let c = cosine(v, want);
        worst = worst.min(c);
        assert!(c >= PARITY, "{what}, {pooling} pooling: {:?}: cosine {c}", r.sentences[i]);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{what}: normalized as the model asks ({norm})");
    }
    eprintln!("{what}, {pooling} pooling: worst cosine {worst:.7}");
}

#[test]
fn xlm_roberta_matches_sentence_transformers_with_cls_and_mean_pooling() {
    // As BGE-M3 ships: CLS pooling, normalized.
    check_parity(&tiny("xlm-roberta"), "cls", "xlm-roberta");
    // As multilingual-e5 ships: mean pooling over the same weights.
    let mean = with_pooling(&tiny("xlm-roberta"), "mean");
    check_parity(&mean, "mean", "xlm-roberta");
}

/// The GPU path of both encoders on the CPU, every run, and on CUDA device 0 where one opens.
#[test]
fn the_gpu_path_of_both_encoders_matches_sentence_transformers() {
    for device in &common::devices() {
        check_candle_parity(&tiny("xlm-roberta"), Architecture::XlmRoberta, device, "cls", "xlm-roberta");
        let mean = with_pooling(&tiny("xlm-roberta"), "mean");
        check_candle_parity(&mean, Architecture::XlmRoberta, device, "mean", "xlm-roberta");
        check_candle_parity(&tiny("bert"), Architecture::Bert, device, "mean", "bert");
        let cls = with_pooling(&tiny("bert"), "cls");
        check_candle_parity(&cls, Architecture::Bert, device, "cls", "bert");
    }
}

#[test]
fn bert_matches_sentence_transformers_with_mean_and_cls_pooling() {
    check_parity(&tiny("bert"), "mean", "bert");
    let cls = with_pooling(&tiny("bert"), "cls");
    check_parity(&cls, "cls", "bert");
}

fn plan(models: &[(ModelRef, &Path, bool, Option<ModelRef>)]) -> ServePlan {
    let mut dirs = ModelDirs::new();
    let mut planned = Vec::new();
    for (id, dir, serve, fallback) in models {
        dirs.insert(id.clone(), ModelDir { path: dir.to_path_buf(), pinned: None, source: None });
        planned.push(PlannedModel {
            serve: *serve,
            fallback: fallback.clone(),
            ..PlannedModel::served(id.clone())
        });
    }
    ServePlan {
        family: Family::TextEmbedding,
        models: planned,
        dirs,
        warmup: Warmup { iterations: 1, ..Warmup::default() },
        batching: Batching::default(),
        residency: Default::default(),
    }
}

/// XLM-RoBERTa served over HTTP as a user calls it: the same vectors as the reference, and an
/// embedding pod refuses another family's endpoint with a 404 that names its family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_is_served_through_the_openai_endpoint() {
    let dir = tiny("xlm-roberta");
    let r = reference(&dir);
    let server =
        TestServer::start(plan(&[(ModelRef::new("bge", "tiny"), &dir, true, None)]), Default::default())
            .await;
    server.wait_ready().await;
    let client = reqwest::Client::new();
    let resp: Value = client
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": "bge", "input": r.sentences}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let data = resp["data"].as_array().expect("data");
    assert_eq!(data.len(), r.sentences.len(), "{resp}");
    for (i, item) in data.iter().enumerate() {
        let v: Vec<f32> = item["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("f") as f32)
            .collect();
        assert!(cosine(&v, &r.vectors["cls"][i]) >= PARITY, "{:?}", r.sentences[i]);
    }
    // The long sentence was cut at the model's limit and says so.
    assert_eq!(data.last().expect("last")["truncated"], true, "{resp}");
    let wrong = client
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 404);
    let err: Value = wrong.json().await.expect("json");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("text-generation endpoint") && message.contains("serves the text-embedding family"),
        "{err}"
    );
    server.shutdown().await;
}

/// The tiny BERT with its weights rewritten by `edit` (name, dtype, shape, bytes of each
/// tensor).
fn with_tensors(edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> common::Scratch {
    let copy = copy_of(&tiny("bert"), "tensors");
    let bytes = std::fs::read(copy.join("model.safetensors")).expect("read");
    let file = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (name.clone(), TensorView::new(*dtype, shape.clone(), data).expect("view"))
        })
        .collect();
    safetensors::serialize_to_file(views, None, &copy.join("model.safetensors")).expect("write");
    copy
}

/// A checkpoint whose tensors do not fit its config is refused at load, naming the tensor and
/// what is wrong with it.
#[test]
fn a_missing_misshapen_or_integer_tensor_is_refused_by_name() {
    let up = "encoder.layer.1.intermediate.dense.weight";
    let load_error = |dir: &Path| match EmbeddingModel::load(dir) {
        Ok(_) => panic!("loaded a broken checkpoint"),
        Err(e) => e.to_string(),
    };
    let missing = with_tensors(|t| t.retain(|(name, ..)| name != up));
    let e = load_error(&missing);
    assert!(e.contains(&format!("no tensor {up}")), "{e}");

    let transposed = with_tensors(|t| {
        for (name, _, shape, _) in t.iter_mut() {
            if name == up {
                shape.reverse();
            }
        }
    });
    let e = load_error(&transposed);
    assert!(e.contains(up) && e.contains("expected [128, 64]"), "{e}");

    let integer = with_tensors(|t| {
        for (name, dtype, ..) in t.iter_mut() {
            if name == up {
                *dtype = Dtype::I16;
            }
        }
    });
    let e = load_error(&integer);
    assert!(e.contains(up) && e.contains("I16") && e.contains("F16"), "{e}");
}

/// A checkpoint whose `model_type` the build does not run is refused at load, naming what it
/// found and what it runs; the model goes Failed with that message, and its fallback serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_type_is_refused_by_name_and_the_fallback_serves() {
    let unknown = copy_of(&tiny("bert"), "mpnet");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(unknown.join("config.json")).expect("config"))
            .expect("json");
    config["model_type"] = json!("mpnet");
    std::fs::write(unknown.join("config.json"), config.to_string()).expect("write");

    let (v2, v1) = (ModelRef::new("m", "v2"), ModelRef::new("m", "v1"));
    let with_fallback =
        plan(&[(v2.clone(), &unknown, true, Some(v1.clone())), (v1.clone(), &tiny("bert"), false, None)]);
    let server = TestServer::start(with_fallback, Default::default()).await;
    let ready = server.wait_ready().await;
    let m = &ready["models"]["m:v2"];
    assert_eq!(m["state"], "FallenBack", "{ready}");
    let error = m["error"].as_str().unwrap_or_default();
    assert!(error.contains("\"mpnet\"") && error.contains("bert, xlm-roberta"), "{error}");
    let resp = reqwest::Client::new()
        .post(server.url("/embed/text"))
        .json(&json!({"model": "m:v2", "text": "served by the fallback"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    server.shutdown().await;

    // Without a fallback: Failed, and the request says why.
    let alone = plan(&[(v2.clone(), &unknown, true, None)]);
    let server = TestServer::start(alone, Default::default()).await;
    let client = reqwest::Client::new();
    let mut body = Value::Null;
    for _ in 0..200 {
        body = client.get(server.url("/readyz")).send().await.expect("readyz").json().await.expect("json");
        if body["models"]["m:v2"]["state"] == "Failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(body["models"]["m:v2"]["state"], "Failed", "{body}");
    let refused =
        client.post(server.url("/embed/text")).json(&json!({"text": "x"})).send().await.expect("send");
    assert_eq!(refused.status(), 503);
    let err: Value = refused.json().await.expect("json");
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("mpnet"), "{err}");
    server.shutdown().await;
}
