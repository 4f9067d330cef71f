//! Shared by the integration tests: the real MiniLM weights (`make fixtures`) and the golden
//! reference vectors from ../shared/bench.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

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
