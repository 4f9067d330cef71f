//! The engine against sentence-transformers' reference vectors, on the real MiniLM weights, and
//! the fast packed encoder against candle's stock BERT.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use kiln_model_server::families::text_embedding::{EmbeddingModel, EncoderSettings, cosine};
use kiln_model_server::kernels::Isa;
use kiln_model_server::models::bert::BertConfig;
use kiln_model_server::models::bert::candle::CandleBert;
use kiln_model_server::models::bert::packed::{PackedBert, PackedOptions};
use kiln_model_server::models::{Architecture, Encoder, Pooling};

fn assert_matches_golden(model: &EmbeddingModel) {
    assert_eq!(model.dimension(), 384);
    let s = model.settings();
    assert_eq!((s.pooling, s.normalize, s.max_seq_length), (Pooling::Mean, true, 256));
    let golden = common::golden();
    let texts: Vec<&str> = golden.iter().map(|g| g.text.as_str()).collect();
    let batched = model.embed(&texts).expect("batch");
    for (g, b) in golden.iter().zip(&batched) {
        let tokens = model.tokenize(&g.text).expect("tokenize");
        assert_eq!(tokens.ids.len(), g.n_tokens, "token count of {:?}", g.text);
        assert_eq!(tokens.truncated, g.n_tokens_untruncated > g.n_tokens);
        let alone = model.embed(&[&g.text]).expect("alone").remove(0);
        let c = cosine(&alone, &g.embedding);
        assert!(c >= 0.999, "cosine {c} for {:?}", g.text);
        // Other inputs in the batch must not change any result.
        let cb = cosine(b, &alone);
        assert!(cb >= 0.99999, "batched differs from alone: {cb} for {:?}", g.text);
    }
}

fn candle_model() -> EmbeddingModel {
    let dir = common::minilm_dir();
    let encoder =
        CandleBert::load(&dir, Architecture::Bert, &candle_core::Device::Cpu).expect("load candle MiniLM");
    let settings = EncoderSettings::read(&dir, encoder.max_positions()).expect("settings");
    EmbeddingModel::with_encoder(&dir, Arc::new(encoder), settings).expect("model")
}

fn packed(isa: Isa, threads: usize) -> PackedBert {
    let options = PackedOptions { threads: Some(threads), isa: Some(isa) };
    let dir = common::minilm_dir();
    let config = BertConfig::read(&dir, Architecture::Bert).expect("MiniLM config");
    PackedBert::load_with(&dir, &config, options).expect("load packed MiniLM")
}

/// Texts of very different lengths: empty ([CLS][SEP] only), short, and one the tokenizer cuts
/// at 256 tokens.
fn mixed_texts() -> Vec<String> {
    vec![
        "A short sentence.".to_string(),
        String::new(),
        "Kiln serves text-embedding models on Kubernetes, one model version per deployment.".to_string(),
        "The quick brown fox jumps over the lazy dog near the riverbank at dawn. ".repeat(30),
        "ok".to_string(),
    ]
}

/// Raw token ids, including a 400-token input (past the tokenizer's cut, within 512 positions).
fn mixed_ids(model: &EmbeddingModel) -> Vec<Vec<u32>> {
    let mut ids: Vec<Vec<u32>> =
        mixed_texts().iter().map(|t| model.tokenize(t).expect("tokenize").ids).collect();
    let long: Vec<u32> = (0..400).map(|i| 1000 + (i * 37) % 20000).collect();
    ids.push(long);
    ids
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], min_cosine: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let mut lowest = f32::INFINITY;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let c = cosine(x, y);
        assert!(c >= min_cosine, "{what}: input {i}: cosine {c}");
        lowest = lowest.min(c);
    }
    eprintln!("{what}: lowest cosine {lowest:.7}");
}

#[test]
fn minilm_matches_the_golden_sample_alone_and_batched() {
    let model = EmbeddingModel::load(&common::minilm_dir()).expect("load MiniLM");
    assert_matches_golden(&model);
}

#[test]
fn reference_encoder_matches_the_golden_sample() {
    assert_matches_golden(&candle_model());
}

#[test]
fn packed_encoder_matches_candle_on_a_mixed_batch() {
    let fast = EmbeddingModel::load(&common::minilm_dir()).expect("load MiniLM");
    let reference = candle_model();
    let texts = mixed_texts();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert!(fast.tokenize(texts[3]).expect("tokenize").truncated, "the long text must hit the 256 cut");
    let a = fast.embed(&texts).expect("packed");
    let b = reference.embed(&texts).expect("candle");
    assert_close(&a, &b, 0.99999, "mean pooling, normalised");

    // Both poolings on raw ids, including inputs longer than the tokenizer would let through.
    let ids = mixed_ids(&fast);
    let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let packed = packed(Isa::best(), 2);
    let candle = CandleBert::load(&common::minilm_dir(), Architecture::Bert, &candle_core::Device::Cpu)
        .expect("load candle");
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let a = packed.encode(&ids, pooling).expect("packed");
        let b = candle.encode(&ids, pooling).expect("candle");
        assert_close(&a, &b, 0.99999, &format!("{pooling:?} pooling"));
    }
}

#[test]
fn every_isa_and_thread_count_gives_the_same_vectors() {
    let model = EmbeddingModel::load(&common::minilm_dir()).expect("load MiniLM");
    let ids = mixed_ids(&model);
    let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let best = packed(Isa::best(), 2).encode(&ids, Pooling::Mean).expect("best");
    let mut others = Vec::new();
    // Each level the CPU has (scalar, AVX2, AVX-512), forced, against the best one.
    for isa in Isa::supported() {
        let encoder = packed(isa, 2);
        assert_eq!(encoder.isa(), isa);
        others.push((format!("{isa:?}"), encoder.encode(&ids, Pooling::Mean).expect("forced ISA")));
    }
    others.push(("1 thread".into(), packed(Isa::best(), 1).encode(&ids, Pooling::Mean).expect("one thread")));
    for (what, other) in &others {
        assert_close(&best, other, 0.999_999, what);
        let max_diff =
            best.iter().flatten().zip(other.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max_diff < 1e-4, "{what}: max difference {max_diff}");
    }
    eprintln!("vector ISA in use: {:?}; levels compared: {:?}", Isa::best(), Isa::supported());
}

#[test]
fn packed_encoder_refuses_bad_inputs_and_handles_empty_ones() {
    let encoder = packed(Isa::best(), 2);
    assert!(encoder.encode(&[&[101, 999_999, 102]], Pooling::Mean).is_err(), "id outside the vocabulary");
    let too_long = vec![1000u32; encoder.max_positions() + 1];
    assert!(encoder.encode(&[&too_long], Pooling::Mean).is_err(), "longer than the positions");
    assert!(encoder.encode(&[], Pooling::Mean).expect("no inputs").is_empty());
    let zero = encoder.encode(&[&[], &[101, 102]], Pooling::Cls).expect("empty id list");
    assert_eq!(zero[0], vec![0.0; 384]);
    assert!(zero[1].iter().any(|v| *v != 0.0));
}
